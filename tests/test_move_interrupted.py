"""Ctrl-C on ``referral-proxy move``: exit 1, said in words, no traceback.

Probe r2 (stop 50): SIGINT at any step exited 1 with nothing but the progress bar (the operator not told
whether anything changed, nor that recovery finishes or undoes it); after the commit point the right text
came, then "Unhandled error in Deferred ... ReactorNotRunning".
"""

from __future__ import annotations

import signal

import pytest
from movecheck import move_paused, seed
from test_moves import MASTERS, ids


@pytest.mark.parametrize("step", ["copied:1", "committed:1", "placed:1"])
def test_an_interrupted_move_says_what_is_left_and_to_whom(proxy_factory, fleet, clean_mail, tmp_path, step):
    seed(fleet["b1"], "carol", "Work", ids("int", 5))
    mover = move_paused(proxy_factory(MASTERS), pause := tmp_path / "pause", step, "carol", "Work", "b3")
    mover.send_signal(signal.SIGINT)  # taken once it runs again
    (pause / "resume").touch()
    out = mover.communicate(timeout=300)[0].decode(errors="replace")
    assert mover.returncode == 1, out
    assert "Traceback" not in out and "Unhandled" not in out, out
    assert "referral-proxy recover" in out, out
