"""The randomized soak of cross-server moves, bounded for CI (the long form: ``python tests/soak.py``)."""

from __future__ import annotations

import pytest
from soak import faults, one_run

pytestmark = pytest.mark.usefixtures("clean_mail")

SEEDS = [7, 31]  # fixed: a failure here is reproducible with `python tests/soak.py --runs 1 --seed N --seconds 12`


@pytest.mark.parametrize("seed", SEEDS)
def test_soak_nothing_lost_nothing_duplicated(fleet, tmp_path, seed):
    figures = one_run(fleet, tmp_path / "soak", seed, seconds=12.0)
    print(figures.line())
    assert sum(n for k, n in figures.ops.items() if k.startswith("kill")) > 0
    assert not figures.lost, f"lost: {figures.lost[:10]}"
    assert not figures.duplicated, f"duplicated: {figures.duplicated[:10]}"
    assert not figures.unreachable, f"unreachable: {figures.unreachable[:10]}"
    assert not figures.faults, f"the proxy failed itself: {figures.faults[:5]}"


def test_a_proxy_fault_in_a_log_is_found(tmp_path):
    (tmp_path / "proxy.log").write_text("... [referral_proxy.session#info] session 1 start\n"
                                        "... [referral_proxy.session#critical] session 2: command failed\n"
                                        "... a NO [SERVERBUG] Internal proxy error\n"
                                        '... result=failed why="[SERVERBUG] Internal error occurred." (Dovecot\'s)\n')
    (tmp_path / "recover.log").write_text("recovery: carol: Work -> Proj (b1 -> b3), at drained: finished\n")
    assert [line.split(": ", 1)[0] for line in faults(tmp_path)] == ["proxy.log", "proxy.log"]


def test_a_move_whose_answer_was_lost_after_a_backend_kill_may_leave_a_second_copy():
    """Seed 49164 (tests/test_rename_move_stalled.py): b1 killed; 0.7 s later a MOVE within b1 stalls
    on the lock the kill left and its answer is lost (a proxy kill); it commits minutes later, after
    a RENAME took its source elsewhere: two copies, Dovecot's. One answered, or with no backend kill
    before it, is allowed none; nor one lost longer than LOCK_STALL after the kill."""
    import time

    from soak import LOCK_STALL, Ledger

    ledger = Ledger()
    killed = time.monotonic() - 300.0
    ledger.history.append((killed, -1, "KILL b1"))
    ledger.backend_died("stalled@t", killed + 0.7, lost=True)
    ledger.backend_died("answered@t", killed + 0.7, answered=True)
    ledger.backend_died("refused@t", killed + 0.7)  # answered NO
    ledger.backend_died("late@t", killed + LOCK_STALL + 1.0, lost=True)
    ledger.settle()
    assert dict(ledger.copies_maybe) == {"stalled@t": 1}
