"""A RENAME across whose checks meet another move half done is not answered from that half state.

On main (helper attack17, 1 of 8 rounds of ``RENAME A FarB`` against ``RENAME FarB A`` from two
sessions at once, ``Far*`` on b2): a's move had created FarB on b2 and not yet emptied A; b's
checks (renamecheck.py: run before anything is reserved) found both, and b got NO [ALREADYEXISTS],
where Dovecot, one RENAME after the other, answers NONEXISTENT (before a) or OK (after a): b's checks
began before a reserved its names and looked at FarB after a created it. A refusal of the checks while
another operation holds one of the names is now left to Mover.rename, which meets the holder (NO
[INUSE] for a move under way): the first test, on a memory map (fails on main). The second, a's proxy
stopped right after that CREATE and b on a second proxy of the same map, held on main too (b's RENAME
met the reservation first); judged by the answers and a census of every backend."""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, faulty, seed, wait_paused
from test_moves import MASTERS
from twisted.internet.defer import ensureDeferred

from referral_proxy import renamecheck
from referral_proxy.config import MapConfig
from referral_proxy.journal import Reservation
from referral_proxy.mailops import TransferError
from referral_proxy.routing import MailboxMap
from referral_proxy.store import MemoryStore

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Far*", "backend": "b2"}, {"mailbox": "Shared*", "backend": "b3"}]
IDS = ["a-1@t", "a-2@t"]


def _settled(coroutine):
    result: list = []
    ensureDeferred(coroutine).addBoth(result.append)
    assert result, "it waited"
    return result[0]


@pytest.mark.parametrize("held", [[], [Reservation("A"), Reservation("referral-proxy-aside-0a1b2c3d"),
                                       Reservation("FarB")]], ids=["free", "held"])
def test_a_refusal_met_while_another_move_holds_a_name_is_left_to_the_move(monkeypatch, held):
    mailbox_map = MailboxMap(MapConfig(default="b1"), MemoryStore())
    if held:
        _settled(mailbox_map.begin_move("carol", "move", held, {}))  # a's RENAME A FarB, under way

    async def half_done(*_args):
        raise TransferError("[ALREADYEXISTS] Mailbox already exists")  # FarB there, A not emptied yet

    monkeypatch.setattr(renamecheck, "checked", half_done)
    mover = type("M", (), {"mailbox_map": mailbox_map, "user": "carol"})()
    outcome = _settled(renamecheck.refused_before(mover, "FarB", "A", "b2", "b1"))
    if held:
        assert outcome is None  # Mover.rename meets a's reservation: NO [INUSE]
    else:
        assert "ALREADYEXISTS" in str(outcome.value), outcome  # nobody in the way: the refusal stands


def _wire(proxy) -> Wire:
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    return w


def test_a_rename_back_while_the_first_is_half_done_is_inuse_not_alreadyexists(proxy_factory, fleet, tmp_path):
    seed(fleet["b1"], "carol", "A", IDS)
    store = {"map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}", "recovery_check_seconds": 3600}}
    pause = tmp_path / "pause"
    pause.mkdir()
    paused = proxy_factory({**MASTERS, **store}, rules=RULES,
                           command=faulty("--pause-at", "created:1", "--pause-dir", str(pause)))
    other = proxy_factory({**MASTERS, **store}, rules=RULES)
    a, b = _wire(paused), _wire(other)
    a.send(b"a RENAME A FarB\r\n")
    assert wait_paused(pause, "created:1") == "created:1"  # FarB made on b2, A not emptied yet
    reply = b.cmd(b"b", b"RENAME FarB A")
    (pause / "resume").touch()
    assert a.until_tagged(b"a")[-1].startswith(b"a OK")
    assert reply[-1].startswith(b"b NO [INUSE]"), reply
    again = b.cmd(b"c", b"RENAME FarB A")
    assert again[-1].startswith(b"c OK"), again
    _counts, where = census(fleet, "carol")
    assert {i: where[i] for i in IDS} == {i: [("b1", "A")] for i in IDS}, where
