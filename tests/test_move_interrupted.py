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


def test_a_whole_user_move_to_where_a_rule_already_points_names_the_mail_left_behind(proxy_factory, fleet, clean_mail):
    """Probe r2 (stop 50): the default re-pointed at b2 before carol's mail was moved, then `move carol '*' b2`
    said "on b2 already" and exited 0, her mail on b1 out of every client's reach, not a word of it: now named, exit 1."""
    from movecheck import cli

    seed(fleet["b1"], "carol", "INBOX", ids("left", 4))
    proxy = proxy_factory(MASTERS)
    text = proxy.config_path.read_text()
    assert 'default = "b1"' in text
    proxy.config_path.write_text(text.replace('default = "b1"', 'default = "b2"'))
    moved = cli("move", "--config", str(proxy.config_path), "carol", "*", "b2")
    assert moved.returncode == 1 and "is on b2 already" in moved.stdout, moved.stdout + moved.stderr
    assert "carol's INBOX on b1 holds 4 message(s), which no client reaches" in moved.stderr, moved.stderr
