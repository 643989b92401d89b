"""A RENAME across does not wait for good on an APPEND whose client stopped reading (probe w3, stop 52).

A client pipelines big FETCHes and an ``APPEND Work {n+}`` and then reads nothing: the proxy stops reading
its backend (flow.py), Dovecot stops working through the commands behind its unsent answers, and the APPEND,
holding Work's turn, is never answered. A RENAME of Work to another backend waited for it: answered after
10 s "still being emptied", after which Far/Work answered NO [INUSE] to everything, and the admin move of the
user failed [INUSE], for as long as the client stayed connected (320 s: Dovecot then dropped the connection,
unseen behind the paused transport). Such a client is cut off after unread.STALLED_TURN seconds, as one whose
MOVE's answer it never reads. Judged by a census and by what another client reaches, within a bound on a
hang (never a measure)."""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import census, judge, seed
from test_move_turn_unread_answer import _stalled_reader
from test_moves import MASTERS, RULES

pytestmark = pytest.mark.usefixtures("clean_mail")

BOUND = 120.0  # seconds: a bound on a hang, not a measure


def test_a_rename_across_does_not_wait_for_good_on_an_append_its_client_never_reads(proxy_factory, fleet):
    inbox = [f"in-{i}@t" for i in range(40)]
    seed(fleet["b1"], "carol", "INBOX", inbox, size=200_000)
    seed(fleet["b1"], "carol", "Work", ["w-0@t"])
    proxy = proxy_factory(MASTERS, rules=RULES)
    stalled = _stalled_reader(proxy.host, proxy.port)
    stalled.login("carol")
    assert stalled.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    message = b"Message-Id: <appended@t>\r\nSubject: x\r\n\r\nbody\r\n"
    stalled.send(b"f0 FETCH 1:* BODY[]\r\nf1 FETCH 1:* BODY[]\r\nf2 FETCH 1:* BODY[]\r\n"
                 b"a1 APPEND Work {%d+}\r\n%s\r\n" % (len(message), message))  # and never reads again
    time.sleep(1)
    other = Wire(proxy.host, proxy.port, timeout=BOUND)
    other.login("carol")
    assert other.cmd(b"r", b"RENAME Work Shared/Work")[-1].startswith(b"r OK")
    deadline, answer = time.monotonic() + BOUND, b""
    while time.monotonic() < deadline:
        answer = other.cmd(b"e", b"EXAMINE Shared/Work")[-1]
        if not answer.startswith(b"e NO [INUSE]"):
            break
        time.sleep(1)
    assert answer.startswith(b"e OK"), answer
    stalled.close()
    counts, where = census(fleet, "carol")
    assert judge(counts, inbox + ["w-0@t"]) == ([], []), where
    assert counts["appended@t"] <= 1 and {where[i][0] for i in ["w-0@t"]} == {("b3", "Shared/Work")}


def test_a_client_still_sending_its_appends_literal_is_not_cut_off(proxy_factory, fleet):
    """Probe x2 (stop 52): the watch looked at the client's output only: a client that read nothing while it
    uploaded an APPEND's 300 KB literal over 15 s (its answers read after the last byte, as direct Dovecot
    serves it) was reset at 10 s. Bytes still arriving from it count as a client at work."""
    seed(fleet["b1"], "carol", "INBOX", [f"in-{i}@t" for i in range(40)], size=200_000)
    seed(fleet["b1"], "carol", "Work", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    client = _stalled_reader(proxy.host, proxy.port)
    client.login("carol")
    assert client.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    body = b"Message-Id: <uploaded@t>\r\nSubject: x\r\n\r\n" + b"y" * 299_000 + b"\r\n"
    client.send(b"f0 FETCH 1:* BODY[]\r\nf1 FETCH 1:* BODY[]\r\na1 APPEND Work {%d+}\r\n" % len(body))
    chunks = [body[i:i + 20_000] for i in range(0, len(body), 20_000)]
    for chunk in chunks:  # 15 s of uploading, reading nothing
        client.send(chunk)
        time.sleep(1)
    client.send(b"\r\n")
    assert client.until_tagged(b"a1")[-1].startswith(b"a1 OK")
    client.close()
    counts, where = census(fleet, "carol")
    assert counts["uploaded@t"] == 1, where.get("uploaded@t")
