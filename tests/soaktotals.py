#!/usr/bin/env python3
"""Totals over soak runs' summary lines (the ``1 runs, ...`` line of ``tests/soak.py --runs 1``, as a loop
collects them, one a run, in a summary file), with what the clients' commands were answered (soakanswers.py).

    python3 tests/soaktotals.py /tmp/soakA26/summary ...      (or on stdin)

Its first line is the one /tmp/totals.sh prints (runs, ops, kills, lost, dup, unreachable, faults);
the second adds up the runs' ``answers:`` (counts summed; of the waits, the longest and the slow ones summed).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from soakanswers import Answers, parse  # noqa: E402

RUN = re.compile(r"1 runs, (\d+) operations, (\d+) kills")
FIGURES = (("lost", "lost"), ("duplicated", "dup"), ("unreachable", "unreachable"), ("faults", "faults"))


def totals(lines: list[str]) -> list[str]:
    """The two lines of totals of the summary *lines* (those that are no run's: skipped)."""
    figures = dict.fromkeys(["runs", "ops", "kills"] + [name for _, name in FIGURES], 0)
    answers = Answers()
    for line in lines:
        run = RUN.search(line)
        if not run:
            continue
        figures["runs"] += 1
        figures["ops"] += int(run[1])
        figures["kills"] += int(run[2])
        for word, name in FIGURES:
            found = re.search(word + r" (\d+)", line)
            if found:
                figures[name] += int(found[1])
        answers.update(parse(line))
    return [" ".join(f"{k} {n}" for k, n in figures.items()), answers.text()]


def main(argv: list[str]) -> int:
    lines = [line for path in argv for line in Path(path).read_text(errors="replace").splitlines()] if argv \
        else sys.stdin.read().splitlines()
    print("\n".join(totals(lines)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
