"""race_hang.py's matrix (a backend SIGSTOPped at each step of a COPY/MOVE/RENAME across servers)
with ``answer_timeout = 2`` (stall.py): the stopped backend stays stopped 17 s, well past the
timeout, so wherever the step is a read the connection is cut and the client answered; then the
backend resumes (SIGCONT: it finishes whatever it had) or is killed and restarted. Census exact
either way: a cut read never costs or doubles a message. Not collected (slow):
``python3 -m pytest -s tests/race_stall.py`` (prints what each client heard while stopped). 44 of 44
passed (11 min, 2026-12-02); answered NO [UNAVAILABLE] while stopped (a cut read): the MOVE at
move-appending:1 and the COPY at start with b1, the source, stopped; every other case is a
write or a new login and waits as on main (stayalive lines, then the journal finishes it)."""

from __future__ import annotations

import pytest
from race_hang import CASES, MASTERS, hang_at

pytestmark = pytest.mark.usefixtures("clean_mail")

T = 2
CONFIG = {"backends": {b: {**MASTERS["backends"][b], "answer_timeout": T} for b in MASTERS["backends"]}}


@pytest.mark.parametrize("op,step,stopped,after", CASES)
def test_a_backend_stopped_past_its_answer_timeout_at_a_step(proxy_factory, fleet, tmp_path, op, step, stopped, after):
    print(op, step, stopped, after, hang_at(proxy_factory, fleet, tmp_path, op, step, stopped, after, CONFIG))
