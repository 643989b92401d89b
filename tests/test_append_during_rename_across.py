"""An APPEND to Work (or Work/x) already under way when a RENAME of Work to another backend begins.

The move copies Work's mail, then sets each source aside (a RENAME to a private name) and empties
it. Dovecot 2.3.19 answers an APPEND whose mailbox another session RENAMEs in the middle of its
literal either NO [SERVERBUG] ("open(.Work.x/tmp/...) failed": soak C seed 75536) or "NO Mailbox was
deleted under us" with the message kept under the new name (appendturns.py): the client, told NO,
APPENDs again. The move's RENAME aside now waits for the APPENDs under way to the mailbox and its
children, as a client's RENAME on one backend does: the APPEND is answered OK, and the move carries
its message. Judged by a census of the backends, by content.
"""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import census, seed
from test_moves import MASTERS, RULES, _exactly_once, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("into", ["Work", "Work/x"])
def test_an_append_under_way_is_waited_for_by_the_set_aside(proxy_factory, fleet, into):
    work, child = ids("work", 4), ids("child", 3)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Work/x", child)
    proxy = proxy_factory(MASTERS, rules=RULES)
    appender, renamer = Wire(proxy.host, proxy.port, timeout=120), Wire(proxy.host, proxy.port, timeout=120)
    for w in (appender, renamer):
        w.login("carol")
    body = b"Message-Id: <slow@t>\r\nSubject: slow\r\n\r\n" + b"body line\r\n" * 50
    appender.send(b"a APPEND " + into.encode() + b" {%d}\r\n" % len(body))
    assert appender.line().startswith(b"+")
    appender.send(body[:20])  # and stops: the APPEND is under way at Dovecot
    renamer.send(b"r RENAME Work Shared/W\r\n")
    time.sleep(4)  # the copy, the drain until quiet: the move reaches its RENAME aside meanwhile
    appender.send(body[20:] + b"\r\n")
    appended = appender.until_tagged(b"a")[-1]
    renamed = renamer.until_tagged(b"r")[-1]
    assert renamed.startswith(b"r OK"), renamed
    deadline = time.monotonic() + 60
    while not _no_entries(proxy):
        assert time.monotonic() < deadline, "the move never ended"
        time.sleep(0.2)
    assert appended.startswith(b"a OK"), appended  # before: NO [SERVERBUG], the client's message not saved
    _exactly_once(fleet, proxy, "carol", work + child + ["slow@t"])
    counts, where = census(fleet, "carol")
    assert where["slow@t"] == [("b3", "Shared/W" + into[len("Work"):])], where
