"""RENAME INBOX to a name another backend owns leaves alone a session that has INBOX selected
(RFC 3501 6.3.5: INBOX's messages move, INBOX stays, empty; README: the proxy's RENAME across does so).

On main (helper attack17): session b SELECTs (or IDLEs in) INBOX; session a's ``RENAME INBOX Far/Old``
(``Far*`` on b2) ends b with ``* BYE Your mail moved to another server``: the move holds INBOX, and
the watch (relocation.py) ended every session whose selected mailbox a move holds. INBOX is never
renamed aside nor moved (new mail still reaches it, the home stays): b now stays selected in INBOX
and is told the messages were expunged, as Dovecot tells a session whose messages another one
expunged (Dovecot 2.3 itself refuses RENAME INBOX: ``NO [CANNOT] Renaming INBOX isn't supported``,
and ends no session either). The renaming session's own INBOX selected is still refused (``NO [INUSE]
Close (or unselect)``: test_moves_inbox_case.py). Judged by b's answers and a census of every backend
(every message once, in Far/Old)."""

from __future__ import annotations

import time

import pytest
from imapwire import Wire
from movecheck import census, deliver, seed
from race_pairs13 import _sessions

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Far*", "backend": "b2"}, {"mailbox": "Shared*", "backend": "b3"}]
IDS = [f"in-{k}@t" for k in range(4)]


def _ok_no_bye(lines: list[bytes], tag: bytes) -> None:
    assert lines[-1].startswith(tag + b" OK") and not any(x.startswith(b"* BYE") for x in lines), lines


def _selected_sees_the_rename(a: Wire, b: Wire, new: bytes, idle: bool) -> None:
    """b has INBOX selected (IDLE in it if *idle*); a RENAMEs INBOX to *new*: b stays, sees 4 EXPUNGEs."""
    assert b.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    if idle:
        b.send(b"i IDLE\r\n")
        assert b.line().startswith(b"+ ")
    assert a.cmd(b"a", b"RENAME INBOX " + new)[-1].startswith(b"a OK")
    time.sleep(1.5)  # past the watch's next look (relocation.CHECK_SECONDS)
    lines = []
    if idle:
        b.send(b"DONE\r\n")
        lines = b.until_tagged(b"i")
        _ok_no_bye(lines, b"i")
    lines += b.cmd(b"n", b"NOOP")
    _ok_no_bye(lines, b"n")
    assert sum(x.startswith(b"* ") and x.endswith(b" EXPUNGE\r\n") for x in lines) == len(IDS), lines


@pytest.mark.parametrize("idle, workers", [(False, 1), (True, 1), (False, 2)], ids=["selected", "idle", "two-workers"])
def test_a_session_with_inbox_selected_stays_when_inbox_is_renamed_across(proxy_factory, fleet, idle, workers):
    seed(fleet["b1"], "carol", "INBOX", IDS)
    if workers == 1:
        proxy = proxy_factory(rules=RULES)
        a, b = _sessions(proxy)
    else:  # each session on its own worker: the move seen through the store
        from test_workers import one_on_each
        proxy = proxy_factory(rules=RULES, workers=2)
        a, b = one_on_each(proxy, proxy.pid, "carol").values()
    _selected_sees_the_rename(a, b, b"Far/Old", idle)
    assert deliver(fleet["b1"], "carol", "INBOX", "new@t") == "INBOX"  # INBOX stays b's: new mail shows
    lines = b.cmd(b"n", b"NOOP")
    assert b"* 1 EXISTS\r\n" in lines, lines
    _counts, where = census(fleet, "carol")
    assert {i: where[i] for i in IDS} == {i: [("b2", "Far/Old")] for i in IDS}, where
    assert where["new@t"] == [("b1", "INBOX")], where

