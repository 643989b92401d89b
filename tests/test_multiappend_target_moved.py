"""RFC 3502: a MULTIAPPEND is atomic, all messages or none, also when a second session, through
the proxy, moves its target to another server (a RENAME across backends), or renames another
server's mailbox onto the target's name, between two of its messages. Judged by a census of every
backend (by Message-Id), never by the answer, once the move has ended: the five new messages are
each there once if the APPEND was answered OK, nowhere if NO, and the target's old messages are each
there once. (The move's RENAME aside waits for the APPEND under way, appendturns.MoverTurn: it
carries the five after the RENAME's answer.)
test_multiappend_rfc.py's target deleted or renamed covers the same with the second session
straight on the backend, within it."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from imapwire import Wire
from movecheck import body, census, journal_empty, seed
from test_multiappend_rfc import _limited

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]
NEW = [f"new-{i}@t" for i in range(5)]
OLD = ["old-1@t", "old-2@t"]


@pytest.fixture(scope="module")
def no_multiappend():
    d = _limited("moved-nomulti", "127.0.0.42", "IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ UIDPLUS UNSELECT "
                 "NAMESPACE CHILDREN MOVE")  # the proxy stages a MULTIAPPEND there
    d.start()
    yield d
    d.stop()


@pytest.mark.parametrize("meanwhile", ["RENAME Target Shared/T", "RENAME Shared/T2 Target"])
@pytest.mark.parametrize("sync", [False, True], ids=["literal+", "sync"])
@pytest.mark.parametrize("staging", [False, True], ids=["multiappend", "staging"])
def test_a_target_moved_across_servers_mid_multiappend_gets_all_or_none(proxy_factory, fleet, no_multiappend,
                                                                        staging, sync, meanwhile):
    home = no_multiappend if staging else fleet["b1"]
    home.reset_mail("carol")
    masters = {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD}
    backends = {b: dict(masters) for b in ("b1", "b2", "b3")}
    backends["h"] = {"endpoint": home.endpoint, "url": home.url, **masters}
    proxy = proxy_factory({"backends": backends, "map": {"default": "h"}}, rules=RULES)
    if meanwhile.startswith("RENAME Shared/T2"):
        seed(fleet["b3"], "carol", "Shared/T2", OLD)
        seed(home, "carol", "Target", [])
    else:
        seed(home, "carol", "Target", OLD)
    appender, mover = Wire(proxy.host, proxy.port), Wire(proxy.host, proxy.port)
    appender.login("carol")
    mover.login("carol")
    appender.send(b"a APPEND Target")
    answer = b""
    for i, mid in enumerate(NEW):
        data = body(mid, 400)
        if i == 2:
            time.sleep(0.3)  # the first two on their way (an interleaving, not an assertion)
            mover.cmd(b"b", meanwhile.encode())  # whatever it answers: OK, or NO [INUSE]
        if sync:
            appender.send(b" {%d}\r\n" % len(data))
            line = appender.line()
            if not line.startswith(b"+"):
                answer = line
                break
            appender.send(data)
        else:
            appender.send(b" {%d+}\r\n" % len(data) + data)
    if not answer:
        appender.send(b"\r\n")
        answer = appender.until_tagged(b"a")[-1]
    assert appender.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    appender.close()
    mover.close()
    deadline = time.monotonic() + 60  # the move, answered, may still be carrying what the APPEND saved
    while not journal_empty(proxy):
        assert time.monotonic() < deadline, "the move never ended"
        time.sleep(0.2)
    every = {**fleet.backends, "h": home} if staging else fleet.backends  # (b1 is home: counted once)
    counts, where = census(SimpleNamespace(backends=every), "carol")
    appended = [counts[mid] for mid in NEW]
    assert appended == ([1] * 5 if answer.startswith(b"a OK") else [0] * 5), (answer, dict(where))
    assert [counts[mid] for mid in OLD] == [1, 1], dict(where)
    assert set(counts) <= set(NEW + OLD), dict(where)  # nothing else: no staging copy left behind
