"""The admin move's progress line (movecli.ProgressBar) while mail delivered to a source during the move is
carried along: its totals grow with it. Probe B (this stop) saw ``157/76 messages ... ETA -2s``."""

from __future__ import annotations

import io
import re

from referral_proxy.copystream import Progress
from referral_proxy.movecli import ProgressBar


def test_carried_mail_grows_the_totals_instead_of_passing_them():
    out = io.StringIO()
    bar = ProgressBar(2, 200, out)
    progress = Progress(on_message=bar)
    for size in (100, 100, 100, 100):  # two more than planned: they reached the source meanwhile
        progress.add(size)
    lines = [line for line in out.getvalue().splitlines() if line]
    last = lines[-1]
    done, total = map(int, re.search(r"(\d+)/(\d+) messages", last).groups())
    assert done == total == 4, lines
    assert "0.4/0.0 MB" not in last and "ETA -" not in out.getvalue(), lines
    assert last.startswith("[" + "#" * 30 + "]"), lines
