"""The proxy's own refusals of pipelined commands come after the answer of an APPEND before
them, as Dovecot, which runs commands one after the other, answers them (docs/design.md:
"holds the proxy's own refusals of later commands until the APPENDs before them are
answered"). Before this, a referral (SELECT aside, after a wait), NO [CANNOT] for a reserved
name, and a referred APPEND were sent at once: `b NO [REFERRAL ...]` before `a OK [APPENDUID ...]`."""

from __future__ import annotations

import pytest
from createrelay import SlowRelay
from imapwire import Wire
from mailcheck import contents
from test_moves import MASTERS

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]
# A message the backend takes a while to store: the commands after it are read meanwhile.
BIG = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 4000

FOLLOWERS = [
    b"b STATUS Shared/Projects (MESSAGES)\r\n",
    b"b CREATE Shared/New\r\n",
    b"b DELETE Shared/Projects\r\n",
    b"b SUBSCRIBE Shared/Projects\r\n",
    b"b RENAME Work Shared/Work\r\n",
    b"b RENAME Shared/Projects Shared/P2\r\n",
    b"b APPEND Shared/Projects {5+}\r\nhello\r\n",
    b"b APPEND referral-proxy-staging-x {5+}\r\nhello\r\n",
    b"b STATUS referral-proxy-staging-x (MESSAGES)\r\n",
    b"b RENAME Work referral-proxy-aside-x\r\n",
    b"b COPY 1 Shared/Projects\r\n",
    b"b APPEND Work {0+}\r\n\r\n",  # the proxy's own answers of an APPEND it sends nothing of (probe 2, stop 49)
    b"b APPEND Work (\\Seen) {0+}\r\n\r\n",
    b"b APPEND INBOX UTF8 (~{5+}\r\nhello)\r\n",
]


def test_refusals_after_an_unanswered_append_come_after_its_answer(proxy_factory, fleet):
    with fleet["b1"].client("alice") as m:
        m.create("Work")
        m.append("INBOX", "", None, b"Subject: one\r\n\r\none\r\n")
    with fleet["b3"].client("alice") as m:
        m.create("Shared/Projects")
    proxy = proxy_factory(rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login()
    assert w.cmd(b"r", b'RLIST "" "*"')[-1].startswith(b"r OK")  # referral-aware from now on
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    wrong = []
    for follower in FOLLOWERS:
        w.send(b"a APPEND INBOX {%d+}\r\n%s\r\n" % (len(BIG), BIG) + follower + b"c NOOP\r\n")
        tags = [line.split(b" ", 1)[0] for line in w.until_tagged(b"c") if not line.startswith(b"* ")]
        if tags != [b"a", b"b", b"c"]:
            wrong.append((follower.split(b"\r\n")[0], tags))
    w.close()
    assert wrong == []
    # Nothing of the refused commands happened: b3 holds nothing, INBOX every big message once.
    assert contents(fleet["b3"], "alice", "Shared/Projects") == []
    assert len(contents(fleet["b1"], "alice", "INBOX")) == 1 + len(FOLLOWERS)


ORDERED = {  # written after "a SELECT INBOX\r\nb IDLE\r\n" and its "+"
    "after-done": (b"DONE\r\nc ID NIL\r\nd BOGUS\r\ne NOOP\r\n", [b"b", b"c", b"d", b"e"]),
    "bad-done": (b"NOTDONE\r\nabc\r\nc NOOP\r\n", [b"b", b"abc", b"c"]),
}


def _tags(w: Wire, last: bytes) -> list[bytes]:
    tags = []
    while not tags or tags[-1] != last:
        line = w.line()
        if not line.startswith((b"*", b"+")):
            tags.append(line.split(b" ", 1)[0])
    return tags


@pytest.mark.parametrize("case", ORDERED)
def test_refusals_after_a_relayed_command_come_after_its_answer(proxy_factory, fleet, case):
    """The proxy's own BAD of a command pipelined after a relayed one (IDLE, then an unknown command) came
    first: `d BAD Unknown command` before IDLE's `b OK Idle completed` (probe t2 of stop 51). Dovecot answers
    in order; so does the proxy now. And `a SELECT INBOX`, `b IDLE foo` (refused by the proxy): a before b."""
    data, order = ORDERED[case]
    proxy = proxy_factory()
    for host, port in ((fleet["b1"].host, fleet["b1"].port), (proxy.host, proxy.port)):
        w = Wire(host, port, timeout=30)
        w.login()
        w.send(b"a SELECT INBOX\r\nb IDLE\r\n")
        while not w.line().startswith(b"+"):
            pass
        w.send(data)
        assert _tags(w, order[-1]) == order, (host, case)
        w.close()
    for bad in (b"IDLE foo", b"ENABLE a{b", b'RLIST "" (x y)'):  # refused by the proxy (the last two: probe u1)
        w = Wire(proxy.host, proxy.port, timeout=30)
        w.login()
        w.send(b"a SELECT INBOX\r\nb " + bad + b"\r\nc NOOP\r\n")
        assert _tags(w, b"c") == [b"a", b"b", b"c"], bad
        w.close()


def test_a_command_whose_connection_went_before_it_was_sent_holds_no_refusal_back():
    """A command relayed once the other backends are quiet (pool.ready_for), whose own backend connection closed
    meanwhile, is answered NO [UNAVAILABLE] and never sent; it stayed counted in flight, and every refusal of
    the proxy's own after it was held for good, the reading stopped (probe u1 of stop 51: a hang since ac369b9)."""
    from referral_proxy.backend import BackendUnavailable
    from referral_proxy.imap.grammar import Arguments
    from referral_proxy.testing.fakes import SessionHarness

    h = SessionHarness()
    h.login()
    conn = h.backend
    conn.closed = True  # (as its connectionLost leaves it)
    relay = h.session.relay
    with pytest.raises(BackendUnavailable):
        relay.send(conn, b"e", "NOOP", Arguments((), ()))
    with pytest.raises(BackendUnavailable):
        relay.send_line(conn, b"f", b"NOOP\r\n")
    assert relay.in_flight == 0
    h.session.appends.after_answers(b"g BAD Unknown command BOGUS\r\n")
    assert h.to_client().endswith(b"g BAD Unknown command BOGUS\r\n")


OWN = [  # commands the proxy carries out itself (session.run), pipelined after a relayed one not answered yet
    b"b RENAME Work Archive/Work\r\n",
    b"b UID COPY 1 Archive/X\r\n",
    b"b RENAME Work Work2\r\n",
]


@pytest.mark.parametrize("follower", OWN, ids=["rename-across", "copy-across", "rename-here"])
def test_what_the_proxy_carries_out_itself_is_answered_after_the_relayed_command_before_it(
        proxy_factory, fleet, follower):
    """Probe h3 of stop 58: ``x STATUS S/o`` (relayed) then ``y STATUS Rbig`` (answered from a move's view)
    in one write: y's answer came first. Now a command the proxy carries out itself waits for the answers
    of the commands before it (appends.in_turn), as Dovecot, running them one after the other, answers."""
    with fleet["b1"].client("alice") as m:
        m.create("Work")
        m.append("INBOX", "", None, b"Subject: one\r\n\r\none\r\n")
    with fleet["b2"].client("alice") as m:
        m.create("Archive/X")
    with fleet["b3"].client("alice") as m:
        m.create("Shared/Projects")
    b3 = fleet["b3"]
    relay = SlowRelay(b3.host, b3.port, b"* STATUS Shared/Projects ", 1.5)
    relay.start()
    try:
        backends = {b: dict(MASTERS["backends"][b]) for b in ("b1", "b2", "b3")}
        backends["b3"]["endpoint"] = relay.endpoint()
        proxy = proxy_factory({"backends": backends}, rules=RULES + [{"mailbox": "Archive/*", "backend": "b2"}])
        w = Wire(proxy.host, proxy.port, timeout=60)
        w.login()
        assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        w.send(b"a STATUS Shared/Projects (MESSAGES)\r\n" + follower + b"c NOOP\r\n")
        tags = [line.split(b" ", 1)[0] for line in w.until_tagged(b"c") if not line.startswith(b"* ")]
        w.close()
    finally:
        relay.close()
    assert tags == [b"a", b"b", b"c"], tags

