"""stayalive.Waiting with in-memory sessions and a fake clock: the line goes to a session whose relayed
commands or APPENDs waited a whole period unanswered (between responses, if it reads), to no other; one
session's trouble stops neither the others nor the next look (the soak of stop 49: an APPEND unanswered
raised in the look, and the LoopingCall stopped for good)."""

from __future__ import annotations

from twisted.internet.task import Clock

from referral_proxy.lean import SmallSet
from referral_proxy.phase import Phase
from referral_proxy.stayalive import LINE, SECONDS, Waiting


class _Obj:
    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


class _Session:
    def __init__(self, *, in_flight: int = 0, appends: tuple = (), idle: bool = False, phase: Phase = Phase.AUTHENTICATED,
                 between: bool = True, backed_up: bool = False) -> None:
        self.phase, self.sent = phase, []
        self.idle = _Obj(current=object() if idle else None)
        self.relay = _Obj(in_flight=in_flight, answered=0)
        self.appends = _Obj(unanswered=SmallSet())
        for append in appends:
            self.appends.unanswered.add(append)
        self.flow = _Obj(out=_Obj(between_responses=between), output_backed_up=backed_up)
        self.written = 0
        self.ctx = _Obj(observer=_Obj(written_to=lambda session: session.written))

    def send(self, data: bytes) -> None:
        self.sent.append(data)
        self.written += len(data)


def _looks(sessions, n: int) -> Clock:
    clock = Clock()
    watch = Waiting(clock, sessions)
    watch.start()
    for _ in range(n):
        clock.advance(SECONDS)
    watch.stop()
    return clock


def test_the_line_goes_to_a_session_waiting_a_whole_period_and_to_no_other():
    waiting, appending = _Session(in_flight=1), _Session(appends=(object(),))
    idle, quiet, unauthenticated = _Session(in_flight=1, idle=True), _Session(), _Session(in_flight=1, phase=Phase.NOT_AUTHENTICATED)
    mid_response, not_reading = _Session(in_flight=1, between=False), _Session(in_flight=1, backed_up=True)
    _looks([waiting, appending, idle, quiet, unauthenticated, mid_response, not_reading], 3)
    assert waiting.sent == [LINE, LINE] and appending.sent == [LINE, LINE]  # the first look only notes them
    assert idle.sent == quiet.sent == unauthenticated.sent == mid_response.sent == not_reading.sent == []


def test_an_answer_between_two_looks_means_no_line():
    s = _Session(in_flight=1)
    clock = Clock()
    watch = Waiting(clock, [s])
    watch.start()
    clock.advance(SECONDS)
    s.relay.answered += 1  # one answered, another sent: it heard from its backend
    clock.advance(SECONDS)
    assert s.sent == []
    clock.advance(SECONDS)
    assert s.sent == [LINE]
    watch.stop()


def test_a_session_being_written_to_gets_no_line():
    s = _Session(in_flight=1)  # a long FETCH streaming its answer
    clock = Clock()
    watch = Waiting(clock, [s])
    watch.start()
    for _ in range(3):
        s.written += 4096
        clock.advance(SECONDS)
    assert s.sent == []
    watch.stop()


def test_a_session_that_raises_stops_neither_the_others_nor_the_next_look():
    broken, waiting = _Session(in_flight=1), _Session(in_flight=1)
    broken.relay = None  # any trouble
    _looks([broken, waiting], 3)
    assert waiting.sent == [LINE, LINE]
