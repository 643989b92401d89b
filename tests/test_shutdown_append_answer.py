"""A graceful stop (SIGTERM) right after a MULTIAPPEND's last byte (hostile round h1).

The backend has the whole command and commits it; direct Dovecot, sent SIGTERM at that moment,
answers the APPEND (``a OK [APPENDUID ...]``) and then says ``* BYE Server shutting down``. The
proxy said BYE and closed at once: the messages were saved, the client never heard so, and a
client that APPENDs again on its next connection saves every message twice. Judged on the backend:
the messages are there once if and only if the client was answered OK, before the BYE."""

from __future__ import annotations

import signal
import time

import pytest
from createrelay import SlowRelay
from imapwire import Wire
from movecheck import body, census, seed

pytestmark = pytest.mark.usefixtures("clean_mail")

SIZE = 30_000_000  # Dovecot takes a moment to save it: the stop comes before its answer


def _to_the_end(w: Wire) -> list[bytes]:
    """Every line *w* receives until the proxy closes the connection."""
    lines = w.lines_until(ConnectionError, OSError)
    w.close()
    return lines


@pytest.mark.parametrize("run", range(2))
def test_an_append_sent_whole_before_sigterm_is_answered_before_the_bye(proxy_factory, fleet, run):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    first, second = body("stop-1@t", SIZE), body("stop-2@t", SIZE)
    w.send(b"a APPEND INBOX {%d+}\r\n" % len(first) + first + b" {%d+}\r\n" % len(second) + second)
    time.sleep(1.5)  # both literals on their way to the backend
    w.send(b"\r\n")  # the command's end: from now on the backend may commit it
    proxy.process.send_signal(signal.SIGTERM)
    lines = _to_the_end(w)
    proxy.process.wait(30)
    counts, where = census(fleet, "carol")
    saved = [counts["stop-1@t"], counts["stop-2@t"]]
    answers = [line[:80] for line in lines if line.startswith(b"a ")]
    bye = next((i for i, line in enumerate(lines) if line.startswith(b"* BYE")), len(lines))
    if saved == [1, 1]:
        assert answers and answers[0].startswith(b"a OK"), (answers, lines[:3], dict(where))
        assert lines.index(next(x for x in lines if x.startswith(b"a "))) < bye, lines[:3]
    else:
        assert saved == [0, 0], dict(where)
        assert not answers or not answers[0].startswith(b"a OK"), answers


def _behind_slow(proxy_factory, fleet, name: str, pattern: bytes, seconds: float):
    """A relay holding *name*'s answers with *pattern* *seconds* late, a proxy (Shared/* on b3) reaching *name*
    through it, and a client logged in as carol."""
    backend = fleet[name]
    relay = SlowRelay(backend.host, backend.port, pattern, seconds)
    relay.start()
    proxy = proxy_factory({"backends": {name: {"endpoint": relay.endpoint()}}},
                          rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    return relay, proxy, w


def test_a_copy_across_under_way_at_sigterm_is_answered_before_the_bye_and_nothing_after_it(proxy_factory, fleet):
    """Probe h3 of stop 58: the stop waited for relayed commands and APPENDs, not for a command the proxy
    carries out itself: a COPY across under way was cut, and its answer (NO [UNAVAILABLE], or a MOVE's
    "will be retried" that recovery then finished) came AFTER ``* BYE Server shutting down``, where Dovecot
    writes nothing. Now such a command is waited for as the others (3 s at most), and nothing follows a BYE."""
    ids = [f"stopcopy-{i}@t" for i in range(3)]
    seed(fleet["b1"], "carol", "Src", ids)
    with fleet["b3"].client("carol") as m:
        m.create("Shared/Dst")
    relay, proxy, w = _behind_slow(proxy_factory, fleet, "b3", b"OK [APPENDUID ", 1.0)  # the copy's answer: late
    try:
        assert w.cmd(b"s", b"SELECT Src")[-1].startswith(b"s OK")
        w.send(b"t UID COPY 1:* Shared/Dst\r\n")
        time.sleep(0.4)
        proxy.process.send_signal(signal.SIGTERM)
        lines = _to_the_end(w)
        proxy.process.wait(30)
    finally:
        relay.close()
    said = [line[:40] for line in lines if not line.startswith(b"* OK Hang")]
    assert len(said) == 2 and said[0].startswith(b"t OK [COPYUID ") and said[1].startswith(b"* BYE "), said
    where = census(fleet, "carol")[1]
    assert all(sorted(where[i]) == [("b1", "Src"), ("b3", "Shared/Dst")] for i in ids), dict(where)


def test_a_rename_across_past_its_commit_at_sigterm_is_answered_ok_before_the_bye(proxy_factory, fleet):
    """Probe j1 of stop 59: a RENAME across still finishing (the source set aside, emptied) when the proxy stopped
    got only ``* BYE``: the client never heard that its mailbox was renamed, which it was (recovery finished it).
    Past its commit point the move is the client's whatever comes; a stop now answers it at once, as the proxy
    does after ANSWER_WITHIN anyway: ``OK ... the old mailbox is still being emptied``, then BYE."""
    ids = [f"stoprename-{i}@t" for i in range(3)]
    seed(fleet["b1"], "carol", "Src", ids)
    relay, proxy, w = _behind_slow(proxy_factory, fleet, "b1", b"OK Rename completed", 8.0)  # the RENAME aside
    try:
        w.send(b"t RENAME Src Shared/Dst\r\n")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(("b3", "Shared/Dst") not in census(fleet, "carol")[1][i]
                                                  for i in ids):
            time.sleep(0.05)
        time.sleep(1.0)  # copied, verified, committed: the source's RENAME aside waits for its answer
        proxy.process.send_signal(signal.SIGTERM)
        lines = _to_the_end(w)
        proxy.process.wait(30)
        said = [line[:80] for line in lines if not line.startswith(b"* OK Hang")]
        assert len(said) == 2 and said[0].startswith(b"t OK Rename completed (1 mailbox(es), 3 message(s)") \
            and b"still being emptied" in lines[0] and said[1].startswith(b"* BYE "), said
        proxy.start()  # its start-up recovery finishes the move
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            where = census(fleet, "carol")[1]
            if all(sorted(where[i]) == [("b3", "Shared/Dst")] for i in ids):
                break
            time.sleep(0.5)
        assert all(sorted(where[i]) == [("b3", "Shared/Dst")] for i in ids), dict(where)
    finally:
        relay.close()
