"""A MOVE across through proxy A, killed after its destination committed and before A read the
APPENDUID; before recovery a client of proxy B (same PostgreSQL map) moves the copy on (soak B,
seed 55095, dup21b).

The soak: ``c2 MOVE o-INBOX-16 INBOX -> Archive/B`` (b1 -> b2) through proxy0, no answer (proxy0
SIGKILLed 55 ms later; b2's log: proxy0's connection "reset by peer (APPEND finished 0.007 secs
ago) in=5124": the copy committed 7 ms before the kill, its APPENDUID never journaled);
``c0 MOVE o-INBOX-16 Archive/B -> INBOX/Sub/*`` (b2 -> b1) through proxy1, OK 0.2 s after the
kill (proxy1's RENAME Archive/B Shared/A 50 ms before it: NO [INUSE], the dead entry's names
held; a MOVE of messages out of it is not held off by them); proxy1's check took proxy0's entry over 3.5 s later ("the owner of journal
entries 35 is gone") and said "MOVE INBOX -> Archive/B (b1 -> b2), at move-appending: the destination
never committed, or every copy was moved on before recovery (nothing ties one found elsewhere to the
move): nothing moved". INBOX/Sub/* was then RENAMEd (on b1, Dovecot's own) to Work/c, then Shared:
the census found the message in b1 Shared and b1 INBOX.

Not Dovecot's: the MOVE was the proxy's own (copy, then expunge; journaled), and the duplicate is
recovery19's rule (movefinish._never_committed_or_moved_on): with the MULTIAPPEND's outcome
unknown and no copy where it saved it, nothing ties a message found elsewhere to the move (seed
49002: another instance of the content re-saved in the window was taken for it and the source
went: once where the user made two), so the source stays -- twice rather than ever once where
two were made. Here it is measured with two proxies and the copy moved on through the second,
as in the soak; the soak allows one more copy for a MOVE whose answer was lost when a
recovery said so of it (tests/soak.py: Ledger.lost_moves, kept_in_doubt).

A's connection to b2 goes through a relay that, once it has passed A's APPEND to b2 on, passes
nothing back: Dovecot commits the copy, A never reads the APPENDUID (the soak's window: between
the MULTIAPPEND's last byte and the journal write of its UIDs). Judged by a census of the backends.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from createrelay import Relay, _close
from movecheck import census, cli, judge, seed, through_proxy
from test_several_proxies import _config, _entries, _logged_in, ids

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Archive/*", "backend": "b2"}]


class _Muting(Relay):
    """A relay that, once a client line holding `` APPEND `` has gone up, passes nothing down
    (``muted`` set then): the backend commits, its answer never reaches the proxy."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(host, port)
        self.muted = threading.Event()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                if up and b" APPEND " in data:
                    self.muted.set()  # before the backend can answer it
                if not up and self.muted.is_set():
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)


def _uid_of(backend, mailbox: str) -> list[bytes]:
    with backend.client("carol") as m:
        assert m.select(f'"{mailbox}"')[0] == "OK"
        typ, data = m.uid("SEARCH", "ALL")
        return data[0].split() if typ == "OK" and data and data[0] else []


@pytest.mark.parametrize("moved_on", ["across, through B", "within b2, straight at Dovecot"])
def test_a_killed_moves_copy_moved_on_through_the_other_proxy_leaves_the_source(proxy_factory, fleet, pg_dsn,
                                                                                moved_on):
    inbox, there = ids("inbox", 3), ids("there", 2)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Next", [])
    seed(fleet["b2"], "carol", "Archive/B", there)
    seed(fleet["b2"], "carol", "Archive/C", [])
    relay = _Muting(fleet["b2"].host, fleet["b2"].port)
    relay.start()
    a_config = _config(pg_dsn)
    a_config["backends"]["b2"]["endpoint"] = relay.endpoint()
    a = proxy_factory(a_config, rules=RULES)
    b_config = _config(pg_dsn)
    b_config["map"]["recovery_check_seconds"] = 3600  # B's check slowed: the copy moves on first, then `recover`
    b = proxy_factory(b_config, rules=RULES)
    try:
        on_a = _logged_in(a)
        assert on_a.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
        on_a.send(b"m UID MOVE 2 Archive/B\r\n")  # inbox-1
        assert relay.muted.wait(60), "A never appended to b2"
        deadline = time.monotonic() + 60
        while len(_uid_of(fleet["b2"], "Archive/B")) < 3:  # Dovecot committed the copy
            assert time.monotonic() < deadline, "the copy never committed on b2"
            time.sleep(0.02)
        a.kill()  # its MOVE unanswered, its entry at move-appending without the copy's UID
        assert on_a.closed(30)
        assert _entries(pg_dsn) == 1
        copy_uid = _uid_of(fleet["b2"], "Archive/B")[-1]
        if moved_on.startswith("across"):  # the soak's: c0's MOVE through proxy1, to b1
            on_b = _logged_in(b)
            assert on_b.cmd(b"s", b"SELECT Archive/B")[-1].startswith(b"s OK")
            reply = on_b.cmd(b"m", b"UID MOVE " + copy_uid + b" Next")
            assert reply[-1].startswith(b"m OK"), reply
            on_b.close()
        else:
            with fleet["b2"].client("carol") as m:
                m.select('"Archive/B"')
                assert m.uid("MOVE", copy_uid.decode(), '"Archive/C"')[0] == "OK"
        recovered = cli("recover", "--config", str(b.config_path))
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        assert "at move-appending: the destination never committed, or every copy was moved on" in recovered.stdout, \
            recovered.stdout
        assert "MOVE INBOX -> Archive/B (b1 -> b2)" in recovered.stdout, recovered.stdout
        assert _entries(pg_dsn) == 0
        counts, where = census(fleet, "carol")
        # never lost; twice, where the client's MOVE (answer lost) made one: recovery's doubt, by rule
        assert judge(counts, inbox + there) == ([], [inbox[1]])
        moved_to = ("b1", "Next") if moved_on.startswith("across") else ("b2", "Archive/C")
        assert sorted(where[inbox[1]]) == sorted([("b1", "INBOX"), moved_to]), where
        assert {i: n for i, n in counts.items() if n != 1} == {inbox[1]: 2}, where
        for proxy in (b,):
            reached = through_proxy(proxy, "carol")
            assert {i: n for i, n in reached.items() if n != 1} == {inbox[1]: 2}
    finally:
        relay.close()


def test_the_soak_allows_a_second_copy_only_for_a_lost_move_a_recovery_left_in_doubt(tmp_path):
    """Seed 55095's proxy1.log line (the soak judge, tests/soak.py): the lost MOVE between the two mailboxes
    it names may have left a second copy; a MOVE answered, or lost between other mailboxes, none."""
    from soak import Ledger, kept_in_doubt

    (tmp_path / "proxy1.log").write_text(
        "2026-12-03T00:29:07.094Z [referral_proxy.recovery#warn] recovery: carol: MOVE INBOX -> Archive/B (b1 -> b2), "
        "at move-appending: the destination never committed, or every copy was moved on before recovery (nothing "
        "ties one found elsewhere to the move): nothing moved\n")
    (tmp_path / "recover.log").write_text(
        "carol: MOVE Shared/50% off -> Proj (b3 -> b1), at move-appending: the destination never committed: "
        "nothing moved\n")
    (tmp_path / "proxy0.log").write_text(
        "... [referral_proxy.movefinish#info] recovery: Work on b1 was renamed Work/c: followed\n"
        "... recovery: carol: MOVE Work/c -> Shared/* (b1 -> b3), at move-appending: the destination never "
        "committed, or every copy was moved on before recovery (nothing ties one found elsewhere to the move): "
        "nothing moved\n")
    assert kept_in_doubt(tmp_path) == {("INBOX", "Archive/B"), ("Work", "Shared/*")}
    ledger = Ledger()
    ledger.lost_moves += [("o-INBOX-16@soak", "INBOX", "Archive/B"), ("other@t", "Archive/B", "INBOX"),
                          ("never@t", "Shared/50% off", "Proj"), ("renamed@t", "Work", "Shared/*")]
    ledger.kept_in_doubt(kept_in_doubt(tmp_path))
    assert dict(ledger.copies_maybe) == {"o-INBOX-16@soak": 1, "renamed@t": 1}
