"""What a MOVE / COPY across tells the client of its selected mailbox, besides its answer.

Probe 2 of stop 48: (1) the proxy's own STATUS and UID SEARCH on the client's source connection
during a MOVE across dropped the untagged responses they brought: another session's EXPUNGE or a
delivery's EXISTS was never told, and the client's message numbers went out of step with the
server's (10 of 40 rounds; a STORE by number then flags the wrong message). (2) A CONTEXT=SEARCH
update (RFC 5267) a transfer's own command brought named the proxy's tag (``TAG "rp4"``), not the
client's. Real Dovecot; the client's view is rebuilt from what it was told, as a client does.
"""

from __future__ import annotations

import collections
import re
import threading
import time

import pytest
from imapwire import Wire
from movecheck import census, seed
from test_cut_delete import _backend, _exchange, _result
from test_moves import RULES, ids
from twisted.internet import defer

from referral_proxy.mailops import status, still_there

pytestmark = pytest.mark.usefixtures("clean_mail")


def test_status_and_still_there_keep_the_other_untagged_responses():
    conn = _backend()
    others: list[bytes] = []
    d = defer.ensureDeferred(status(conn, "Work", others))
    _exchange(conn, b"STATUS Work (UIDVALIDITY UIDNEXT MESSAGES)",
              b"* 3 EXPUNGE\r\n* STATUS Work (MESSAGES 4 UIDNEXT 9 UIDVALIDITY 7)\r\n* 4 EXISTS\r\nTAG OK done\r\n")
    assert _result(d).uidnext == 9
    d = defer.ensureDeferred(still_there(conn, [5, 6], others))
    _exchange(conn, b"UID SEARCH UID 5:6", b"* 2 EXPUNGE\r\n* SEARCH 6\r\nTAG OK done\r\n")
    assert _result(d) == [6]
    assert others == [b"* 3 EXPUNGE\r\n", b"* 4 EXISTS\r\n", b"* 2 EXPUNGE\r\n"]


def test_an_expunge_after_a_body_fetch_went_wrong_is_kept_for_the_client():
    """Probe 6 of stop 48: another session expunged UID 2 while a COPY across read the bodies: Dovecot
    sent UID 3's body where UID 2's was expected, then ``* 2 EXPUNGE``; the read failed (the COPY answers
    NO [EXPUNGEISSUED]) and dropped the EXPUNGE: the client's message numbers drifted, and its next
    STORE by number flagged the wrong message. The error carries it now; the stray body is not relayed."""
    from referral_proxy.copystream import _Bodies
    from referral_proxy.mailops import TransferError

    conn = _backend()
    bodies: list[int] = []
    d = defer.ensureDeferred(_Bodies(conn, [1, 2, 3], lambda uid, _size: bodies.append(uid), lambda _data: None,
                                     lambda: None).run())
    _exchange(conn, b"UID FETCH 1:3 (UID BODY.PEEK[])",
              b"* 1 FETCH (UID 1 BODY[] {3}\r\nabc)\r\n* 3 FETCH (UID 3 BODY[] {3}\r\nxyz)\r\n"
              b"* 2 EXPUNGE\r\n* 2 FETCH (FLAGS (\\Seen))\r\nTAG OK done\r\n")
    with pytest.raises(TransferError) as e:
        _result(d)
    assert bodies == [1]
    assert e.value.others == (b"* 2 EXPUNGE\r\n", b"* 2 FETCH (FLAGS (\\Seen))\r\n")


class _View:
    """The client's message numbers -> UIDs, from the untagged responses it was given only."""

    def __init__(self) -> None:
        self.uids: list[int | None] = []

    def told(self, lines: list[bytes]) -> None:
        for line in lines:
            if m := re.match(rb"\* (\d+) EXPUNGE\r\n", line):
                del self.uids[int(m.group(1)) - 1]
            elif m := re.match(rb"\* (\d+) EXISTS\r\n", line):
                n = int(m.group(1))
                assert n >= len(self.uids), f"EXISTS {n} below the {len(self.uids)} messages the client knows"
                self.uids += [None] * (n - len(self.uids))
            elif m := re.match(rb"\* (\d+) FETCH \(.*UID (\d+)", line):
                self.uids[int(m.group(1)) - 1] = int(m.group(2))


def _churn(fleet, stop: threading.Event, going: threading.Event) -> None:
    """Another session on b1: a delivery to Work, then its oldest filler expunged, again and again."""
    with fleet["b1"].client("carol") as m:
        m.select("Work")
        n = 0
        while not stop.is_set():
            going.set()
            n += 1
            m.append("Work", None, None, b"Subject: filler\r\nMessage-ID: <f%d@t>\r\n\r\nx\r\n" % n)
            found = m.uid("SEARCH", "SUBJECT", "filler")[1][0].split()
            if len(found) > 6:
                m.uid("STORE", found[0], "+FLAGS", "(\\Deleted)")
                typ, _ = m._simple_command("UID", "EXPUNGE", found[0].decode())  # (imaplib's uid() has no EXPUNGE)
                assert typ == "OK"


def test_a_move_across_tells_the_client_every_expunge_and_exists_of_others(proxy_factory, fleet):
    proxy = proxy_factory(rules=RULES)
    seed(fleet["b1"], "carol", "Work", [])
    seed(fleet["b3"], "carol", "Shared/P", [])
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    view = _View()
    view.told(w.cmd(b"s", b"SELECT Work"))
    stop = threading.Event()
    out_of_step = []
    for rnd in range(60):
        seed(fleet["b1"], "carol", "Work", ids(f"m{rnd}", 3), size=60000, create=False)
        stop.clear()
        going = threading.Event()
        churn = threading.Thread(target=_churn, args=(fleet, stop, going))
        churn.start()
        going.wait(30)
        try:
            view.told(w.cmd(b"n0", b"NOOP"))  # (the session's view takes in the new messages)
            found = w.cmd(b"f", b"UID SEARCH SUBJECT m%d-" % rnd)
            view.told(found)
            uids = [line for line in found if line.startswith(b"* SEARCH")][0].split()[2:]
            moved = w.cmd(b"m", b"UID MOVE " + b",".join(uids) + b" Shared/P")
            assert len(uids) == 3 and moved[-1].startswith(b"m OK"), (found, moved)
            view.told(moved)
        finally:
            stop.set()
            churn.join()
        time.sleep(0.1)
        view.told(w.cmd(b"n", b"NOOP"))
        truth = [int(m.group(1)) for line in w.cmd(b"u", b"FETCH 1:* (UID)")
                 if (m := re.match(rb"\* \d+ FETCH \(UID (\d+)\)", line))]
        if len(view.uids) != len(truth) or any(u is not None and u != t for u, t in zip(view.uids, truth)):
            out_of_step.append(rnd)
        view.uids = list(truth)  # (FETCH 1:* told the client every UID: judged afresh next round)
    assert not out_of_step, f"the client's message numbers out of step after rounds {out_of_step}"


def _work_selected(proxy_factory, fleet, prefix: str) -> Wire:
    """carol's Work on b1 (five messages *prefix*-0..4) selected through a proxy; Shared/P on b3, empty."""
    proxy = proxy_factory(rules=RULES)
    seed(fleet["b1"], "carol", "Work", ids(prefix, 5))
    seed(fleet["b3"], "carol", "Shared/P", [])
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    w.cmd(b"s", b"SELECT Work")
    return w


def test_a_context_search_update_a_move_across_brings_names_the_clients_tag(proxy_factory, fleet):
    w = _work_selected(proxy_factory, fleet, "c")
    assert w.cmd(b"s1", b"SEARCH RETURN (UPDATE) ALL")[-1].startswith(b"s1 OK")
    told = w.cmd(b"m1", b"MOVE 2 Shared/P") + w.cmd(b"m2", b"UID MOVE 4:5 Shared/P") + w.cmd(b"c1", b"COPY 1 Shared/P")
    updates = [line for line in told if line.startswith(b"* ESEARCH")]
    assert updates, told
    assert all(b'(TAG "s1")' in line for line in updates), updates


@pytest.mark.parametrize("message_set, copied", [(b"9,*", None), (b"*,9", None), (b"2,7,*", None),
                                                 (b"1:*,9", [0, 1, 2, 3, 4]), (b"2,*", [1, 4])])
def test_a_number_past_the_last_beside_a_star_is_refused_whole(proxy_factory, fleet, message_set, copied):
    """COPY / MOVE across ``9,*`` of 5 messages: BAD, nothing copied (RFC 3501: 9 is no message; Dovecot
    2.3.19's own COPY 9,* panics its imap process). ``1:*,9`` is every message, as Dovecot takes it."""
    w = _work_selected(proxy_factory, fleet, "s")
    for verb in (b"COPY", b"MOVE") if copied is None else (b"COPY",):
        answer = w.cmd(b"c", verb + b" " + message_set + b" Shared/P")[-1]
        assert answer.startswith(b"c BAD" if copied is None else b"c OK"), (verb, answer)
    counts, _where = census(fleet, "carol")
    assert counts == collections.Counter(ids("s", 5) + [f"s-{i}@t" for i in copied or []])


def _selected(proxy_factory, fleet, mailbox: bytes) -> Wire:
    """carol logged in with *mailbox* selected: Work on b1, Shared/P on b3, a message in each."""
    proxy = proxy_factory(rules=RULES)
    seed(fleet["b1"], "carol", "Work", ids("w", 1))
    seed(fleet["b3"], "carol", "Shared/P", ids("p", 1))
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    w.cmd(b"s", b"SELECT " + mailbox)
    return w


@pytest.mark.parametrize("enabler", [b"FETCH 1 (MODSEQ)", b"STATUS Work (HIGHESTMODSEQ)", b"UID FETCH 1:* (FLAGS) (CHANGEDSINCE 1)",
                                     b"SEARCH MODSEQ 1", None])
def test_condstore_enabled_by_a_command_holds_on_every_backend_of_the_session(proxy_factory, fleet, enabler):
    """RFC 7162 3.1: a command using CONDSTORE enables it for the rest of the session; a SELECT on another
    backend then says HIGHESTMODSEQ and a flag change's FETCH its MODSEQ, as one Dovecot does (probe 6,
    stop 48: only an explicit ENABLE was carried). Without such a command: neither (the control)."""
    w = _selected(proxy_factory, fleet, b"Work")
    if enabler is not None:
        assert w.cmd(b"e", enabler)[-1].startswith(b"e OK")
    selected = b"".join(w.cmd(b"t", b"SELECT Shared/P"))
    stored = b"".join(w.cmd(b"f", b"STORE 1 +FLAGS (\\Flagged)"))
    assert (b"[HIGHESTMODSEQ " in selected, b"MODSEQ (" in stored) == ((True, True) if enabler else (False, False)), (
        selected, stored)


def test_condstore_enabled_by_a_command_to_another_backend_tells_the_selected_mailboxs_highestmodseq(
        proxy_factory, fleet):
    """RFC 7162 3.1: CONDSTORE enabled while a mailbox is selected: Dovecot says * OK [HIGHESTMODSEQ n] of it.
    Enabled by a STATUS of a mailbox on another backend, the proxy's ENABLE to the selected one brought it and
    dropped it: the client never had its starting HIGHESTMODSEQ (probe 1 of stop 49). Now it is told, with
    the next command there at the latest (before any MODSEQ of that mailbox)."""
    w = _selected(proxy_factory, fleet, b"Shared/P")
    told = b"".join(w.cmd(b"e", b"STATUS Work (HIGHESTMODSEQ)") + w.cmd(b"n", b"NOOP"))
    assert re.search(rb"\* OK \[HIGHESTMODSEQ \d+\]", told), told
    assert told.count(b"[HIGHESTMODSEQ") == 1, told
