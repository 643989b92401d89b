"""A change (STORE, EXPUNGE) in a selected mailbox a whole-user move took elsewhere, sent after the move
ended and before the relocation watch's BYE, is refused: relayed, it changed the drained old place and
the copy at the new place kept the message (soak B seed 51255: an OLDMOVE out of INBOX -- UID COPY
across, under way through the whole `move carol '*' b2`, then UID STORE \\Deleted and UID EXPUNGE
answered OK on the old INBOX -- left the message twice: the COPY's and the moved INBOX's).

The session is kept "under way" through the move (a command line whose literal the client holds
back: the watch waits for it, as it waited for the soak's COPY), then the held command, the STORE and
the EXPUNGE go in one write. Census by content on the backends.
"""

from __future__ import annotations

import re

import pytest
from imapwire import Wire
from movecheck import census, cli, seed
from test_moves import MASTERS, RULES, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


def _answers(w: Wire, tags: list[bytes]) -> tuple[dict[bytes, bytes], list[bytes]]:
    """The tagged answers of *tags* (each its status), or those that came before the proxy closed."""
    got: dict[bytes, bytes] = {}
    lines: list[bytes] = []
    try:
        while len(got) < len(tags):
            line = w.line()
            lines.append(line)
            for tag in tags:
                if line.startswith(tag + b" "):
                    got[tag] = line.split(b" ")[1]
    except (ConnectionError, OSError):
        pass
    return got, lines


def _copied_across_and_held(proxy, mailbox: bytes, message_id: bytes) -> tuple[Wire, int]:
    """A session selected in *mailbox* that copied *message_id* across to Shared/x (b3), then kept under
    way by a command whose literal it holds back (the relocation watch waits for it): (session, UID)."""
    w = Wire(proxy.host, proxy.port, timeout=120)
    assert w.cmd(b"a", b"LOGIN carol secret")[-1].startswith(b"a OK")
    assert w.cmd(b"b", b"SELECT " + mailbox)[-1].startswith(b"b OK")
    found = w.cmd(b"c", b'UID SEARCH HEADER Message-ID "<' + message_id + b'>"')
    uid = int(re.search(rb"\* SEARCH (\d+)", b"".join(found)).group(1))
    copied = w.cmd(b"d", b"UID COPY %d Shared/x" % uid)  # across: b1 -> b3
    assert copied[-1].startswith(b"d OK"), copied
    w.send(b"h UID SEARCH TEXT {3}\r\n")  # held: the session is under way until the literal comes
    assert w.line().startswith(b"+"), "no continuation for the literal"
    return w, uid


@pytest.mark.parametrize("what", ["*", "INBOX"])
def test_an_expunge_in_the_old_inbox_after_a_whole_user_move_is_not_lost_to_a_second_copy(proxy_factory, fleet,
                                                                                           what):
    inbox = ids("in", 3)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b3"], "carol", "Shared/x", [])  # the rules' place of Shared/*: no whole-user move takes it
    proxy = proxy_factory(MASTERS, rules=RULES)
    w, uid = _copied_across_and_held(proxy, b"INBOX", b"in-0@t")
    moved = cli("move", "--config", str(proxy.config_path), "carol", what, "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    w.send(b"zzz\r\ns UID STORE %d +FLAGS.SILENT (\\Deleted)\r\ne UID EXPUNGE %d\r\n" % (uid, uid))
    answers, lines = _answers(w, [b"h", b"s", b"e"])
    w.sock.close()
    counts, where = census(fleet, "carol")
    if answers.get(b"s") == b"OK" and answers.get(b"e") == b"OK":  # moved, as the client was told
        assert counts["in-0@t"] == 1, (dict(where), lines)
    else:  # refused (or the session ended first): the original stays, beside the COPY's
        assert counts["in-0@t"] == 2, (dict(where), lines)
    assert all(counts[m] == 1 for m in inbox[1:]), dict(where)


def test_an_expunge_in_a_mailbox_another_session_renamed_across_is_refused(proxy_factory, fleet):
    """The same after another session's RENAME across of the selected mailbox (soak C seed 85027: an OLDMOVE
    out of INBOX/Sub/x, its COPY under way while another session RENAMEd INBOX/Sub/x to Proj on another
    backend, then STORE and EXPUNGE answered OK by the drained old place: the message twice). The old name
    stays routed where it was (the rules), so the map does not tell: the move that took it does."""
    work = ids("w", 3)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/x", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    w, uid = _copied_across_and_held(proxy, b"Work", b"w-0@t")
    r = Wire(proxy.host, proxy.port, timeout=120)
    assert r.cmd(b"a", b"LOGIN carol secret")[-1].startswith(b"a OK")
    renamed = r.cmd(b"r", b'RENAME Work "Archive/W"')  # across: b1 -> b2 (Archive/*); "Work" stays b1's
    assert renamed[-1].startswith(b"r OK"), renamed
    made = r.cmd(b"n", b"CREATE Work")  # a new Work where the old one was: Dovecot's session goes on in it
    assert made[-1].startswith(b"n OK"), made
    w.send(b"zzz\r\ns UID STORE %d +FLAGS.SILENT (\\Deleted)\r\ne UID EXPUNGE %d\r\n" % (uid, uid))
    answers, lines = _answers(w, [b"h", b"s", b"e"])
    w.sock.close()
    counts, where = census(fleet, "carol")
    # The proxy's own refusal, not whatever Dovecot's session, stale in the new Work, says (here NO
    # [SERVERBUG] to the STORE and OK to the EXPUNGE; in the soak OK to both)
    assert any(line.startswith(b"s NO [INUSE]") for line in lines), lines
    assert any(line.startswith(b"e NO [INUSE]") for line in lines), lines
    assert counts["w-0@t"] == 2, (dict(where), lines)  # refused: the original stays, beside the COPY's
    assert all(counts[m] == 1 for m in work[1:]), dict(where)
