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
