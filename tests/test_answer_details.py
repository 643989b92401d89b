"""Answers a client acts on, exact, against real Dovecots (ownfleet.py: b1 127.0.0.70, b2 .71 with Q and
Q/*, b3 .72 with S/* and no MULTIAPPEND). Found by this stop's hostile probe A, each failing on 9008653:

* a COPY, MOVE or RENAME into a backend without MULTIAPPEND is refused ``NO [CANNOT]``, as the README says
  (the refusal had no code), and nothing moves; a COPY or MOVE of one message is carried out;
* an APPEND to a mailbox this session DELETEd (or RENAMEd away) since it took the session's last message is
  refused before its literal, as directly: the proxy's own ``+`` (appends.Taker) had the client upload the
  whole message for a NO [TRYCREATE] after it;
* with ``referrals = "never"`` no mailbox is remote: ``LIST (REMOTE)`` marks none ``\\Remote`` (the proxy
  serves them all, and announces no MAILBOX-REFERRALS)."""

from __future__ import annotations

import signal
import time

import pytest
from imapwire import Wire
from movecheck import census, cli
from ownfleet import own_dovecots, own_proxy


@pytest.fixture(scope="module")
def codes_fleet():
    with own_dovecots("codes", 70) as backends:
        yield backends


def _login(proxy) -> Wire:
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("alice", "secret")
    return w


def _reset(codes_fleet) -> None:
    for d in codes_fleet.values():
        d.reset_mail("alice")


def test_copy_move_rename_into_a_backend_without_multiappend_are_cannot(proxy_factory, codes_fleet):
    _reset(codes_fleet)
    proxy = own_proxy(proxy_factory, codes_fleet)
    w = _login(proxy)
    assert w.cmd(b"c1", b"CREATE Src")[-1].startswith(b"c1 OK")
    assert w.cmd(b"c2", b"CREATE S/dst")[-1].startswith(b"c2 OK")
    for i in (1, 2):
        msg = b"Subject: keep\r\nMessage-Id: <keep-%d@t>\r\n\r\nkeep me\r\n" % i
        w.send(b"a APPEND Src {%d+}\r\n" % len(msg) + msg + b"\r\n")
        assert w.until_tagged(b"a")[-1].startswith(b"a OK")
    assert w.cmd(b"s", b"SELECT Src")[-1].startswith(b"s OK")
    for tag, command in ((b"e", b"COPY 1:2 S/dst"), (b"f", b"MOVE 1:* S/dst"), (b"g", b"UID MOVE 1:* S/dst")):
        answer = w.cmd(tag, command)[-1]
        assert answer.startswith(tag + b" NO [CANNOT] "), answer
    # One message is one APPEND, atomic anywhere: copied and moved (probe h1 of stop 58: refused too)
    assert w.cmd(b"x", b"COPY 1 S/dst")[-1].startswith(b"x OK [COPYUID "), "COPY of one"
    assert w.cmd(b"y", b"UID MOVE 2 S/dst")[-1].startswith(b"y OK"), "MOVE of one"
    assert w.cmd(b"u", b"UNSELECT")[-1].startswith(b"u OK")
    answer = w.cmd(b"h", b"RENAME Src S/new")[-1]
    assert answer.startswith(b"h NO [CANNOT] "), answer
    w.close()
    counts, where = census(None, "alice", codes_fleet.values())
    assert dict(counts) == {"keep-1@t": 2, "keep-2@t": 1}, counts
    assert sorted(box for _b, box in where["keep-1@t"]) == ["S/dst", "Src"] and [box for _b, box in where["keep-2@t"]] == ["S/dst"], where


def test_an_empty_mailbox_is_not_moved_to_a_backend_without_multiappend_either(proxy_factory, codes_fleet):
    """Probe g2: a RENAME across of an EMPTY mailbox to b3 was taken, while another session's APPEND to it
    was under way; the message, answered OK, was left in the move's private mailbox on b1 for good (the
    drain carries late mail in one MULTIAPPEND, which b3 cannot take) and recovery failed every 2 s. Now
    refused up front as with messages in it (README), the admin `move` too; the APPEND lands in the mailbox."""
    _reset(codes_fleet)
    proxy = own_proxy(proxy_factory, codes_fleet)
    w, other = _login(proxy), _login(proxy)
    msg = b"Subject: late\r\nMessage-Id: <late-1@t>\r\n\r\nlate\r\n"
    assert w.cmd(b"c", b"CREATE Empty")[-1].startswith(b"c OK")
    other.send(b"a APPEND Empty {%d+}\r\n" % len(msg) + msg)  # its last CRLF withheld: under way
    time.sleep(0.5)
    answer = w.cmd(b"r", b"RENAME Empty S/e")[-1]
    other.send(b"\r\n")
    assert other.until_tagged(b"a")[-1].startswith(b"a OK"), answer
    assert answer.startswith(b"r NO [CANNOT] "), answer
    moved = cli("move", "--config", str(proxy.config_path), "alice", "Empty", "b3")
    assert moved.returncode != 0 and "[CANNOT]" in moved.stdout + moved.stderr, moved.stdout + moved.stderr
    w.close()
    other.close()
    counts, where = census(None, "alice", codes_fleet.values())
    assert dict(counts) == {"late-1@t": 1} and where["late-1@t"] == [("codesb1", "Empty")], (counts, where)


@pytest.mark.parametrize("unmake", [b"DELETE E20", b"RENAME E20 E21"], ids=["delete", "rename"])
def test_an_append_to_a_mailbox_this_session_unmade_is_refused_before_its_literal(proxy_factory, codes_fleet,
                                                                                    unmake):
    _reset(codes_fleet)
    proxy = own_proxy(proxy_factory, codes_fleet)
    w = _login(proxy)
    first = b"Subject: one\r\n\r\nhello\r\n"
    assert w.cmd(b"a", b"CREATE E20")[-1].startswith(b"a OK")
    w.send(b"b APPEND E20 {%d}\r\n" % len(first))
    assert w.line().startswith(b"+ ")
    w.send(first + b"\r\n")
    assert w.until_tagged(b"b")[-1].startswith(b"b OK")
    assert w.cmd(b"c", unmake)[-1].startswith(b"c OK")
    w.send(b"d APPEND E20 {%d}\r\n" % len(first))
    answer = w.line()
    assert answer.startswith(b"d NO [TRYCREATE] "), answer  # no "+": the client sends nothing of it
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    w.close()
    with codes_fleet["b1"].client("alice") as m:
        typ, data = m.list('""', "E2*")
    assert [x.rsplit(b" ", 1)[1] for x in data if x] == ([] if unmake.startswith(b"DELETE") else [b"E21"])


def test_never_mode_marks_no_mailbox_remote(proxy_factory, codes_fleet):
    _reset(codes_fleet)
    proxy = own_proxy(proxy_factory, codes_fleet, referrals="never")
    w = _login(proxy)
    assert w.cmd(b"c", b"CREATE Q/x")[-1].startswith(b"c OK")
    assert w.cmd(b"d", b"CREATE Here")[-1].startswith(b"d OK")
    lines = w.cmd(b"l", b'LIST (REMOTE) "" "*"')
    assert lines[-1].startswith(b"l OK"), lines
    listed = {x.rstrip().rsplit(b" ", 1)[1]: x for x in lines if x.startswith(b"* LIST ")}
    assert b"Q/x" in listed and b"Here" in listed, lines  # every backend's, as one store
    assert not [x for x in listed.values() if b"\\Remote" in x], lines
    assert w.cmd(b"s", b"SELECT Q/x")[-1].startswith(b"s OK")  # served here, not referred
    w.close()


@pytest.mark.parametrize("cut", ["mid-literal", "between-messages"])
def test_a_staged_multiappend_cut_by_sigterm_leaves_no_staging_mailbox(proxy_factory, codes_fleet, cut):
    """A graceful stop during a staged MULTIAPPEND (b3 has no MULTIAPPEND): nothing reaches the target, and
    the staging mailbox is gone when the proxy has exited (it was left until a proxy started again)."""
    _reset(codes_fleet)
    proxy = own_proxy(proxy_factory, codes_fleet)
    w = _login(proxy)
    assert w.cmd(b"c", b"CREATE S/t")[-1].startswith(b"c OK")
    first = b"Subject: one\r\nMessage-Id: <stage-1@t>\r\n\r\nhello\r\n"
    second = b"x" * (50_000 if cut == "mid-literal" else 100_000)  # of 100,000: cut in it, or after it
    w.send(b"a APPEND S/t {%d+}\r\n" % len(first) + first + b" {100000+}\r\n" + second)
    time.sleep(1.0)  # the staging mailbox made, the first message in it
    proxy.process.send_signal(signal.SIGTERM)
    assert proxy.process.wait(30) == 0
    w.close()
    with codes_fleet["b3"].client("alice") as m:
        typ, data = m.list('""', "*")
    names = [x.rsplit(b" ", 1)[1].strip(b'"') for x in data if x]
    assert not [n for n in names if n.lower().startswith(b"referral-proxy-")], names
    counts, where = census(None, "alice", codes_fleet.values())
    assert dict(counts) == {}, dict(where)
