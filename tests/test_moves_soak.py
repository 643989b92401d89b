"""The randomized soak of cross-server moves, bounded for CI (the long form: ``python tests/soak.py``)."""

from __future__ import annotations

import pytest
from soak import one_run

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
