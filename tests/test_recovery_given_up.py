"""An entry this process gave up (disowned: a MOVE across whose destination mailbox another session deleted while
its copies were checked, probe v2 of stop 52) is swept at the next check's time, not at the 30-second sweep: until
then its names answered NO [INUSE] (a COPY or MOVE out of the source waited 10 s and was refused). One that another
process left unowned waits for the sweep, as before (test_journal counts the sweeps)."""

from __future__ import annotations

from types import SimpleNamespace

from storehelp import now
from twisted.internet import task

from referral_proxy import recovery
from referral_proxy.config import MapConfig
from referral_proxy.journal import Reservation
from referral_proxy.routing import MailboxMap, MemoryStore


def test_an_entry_this_process_gives_up_is_swept_at_the_next_check(monkeypatch):
    sweeps: list[int] = []

    async def recover_all(*_a, **_k) -> list[str]:
        sweeps.append(1)
        return []

    monkeypatch.setattr(recovery, "recover_all", recover_all)
    monkeypatch.setattr(recovery, "carry_old_homes", recover_all)
    config, clock = MapConfig(default="b1", recovery_check_seconds=2), task.Clock()
    m = MailboxMap(config, MemoryStore())
    sweep = recovery.RecoverySweep(clock, lambda: SimpleNamespace(map=config), m)
    sweep.start()
    assert len(sweeps) == 2  # start-up: recover_all and carry_old_homes
    entry = now(m.begin_move("carol", "move-messages", [Reservation("Work")], {}, settle=False))
    clock.advance(10)
    assert len(sweeps) == 2  # owned by this live process: left alone
    now(m.disown(entry))
    clock.advance(2.5)
    assert len(sweeps) == 4  # swept at the check's time, not in 30 s
    sweep.stop()
