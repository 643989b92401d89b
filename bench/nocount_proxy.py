#!/usr/bin/env python3
"""``referral-proxy`` with the Observer's per-command counting switched off: the "before" of
bench/bench_metrics_cost.py (nothing in the package reads this file).

    python bench/nocount_proxy.py --config proxy.toml

The three hooks the session calls for every read, every write and every command
(``client_in``, ``client_out``, ``command``) do nothing, so no byte, command, result or
duration is counted; everything else (sessions, logins, the ID to backends, the loop
guard, the logs) is as shipped.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def switch_off_counting() -> None:
    from referral_proxy.observe import Observer

    def nothing(self: Any, session: Any, data: Any) -> None:
        pass

    Observer.client_in = nothing  # type: ignore[method-assign]
    Observer.client_out = nothing  # type: ignore[method-assign]
    Observer.command = nothing  # type: ignore[method-assign]


if __name__ == "__main__":
    switch_off_counting()
    from referral_proxy.cli import main

    sys.exit(main(sys.argv[1:]))
