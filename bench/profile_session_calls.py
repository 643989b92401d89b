#!/usr/bin/env python3
"""Where a whole session's Python goes in the real proxy: cProfile over N sessions.

bench_stress_cpu.py counts a SESSION's instructions exactly (connect, greeting, LOGIN
taking the parked backend connection, LOGOUT, close) but callgrind cannot see Python
functions. This runs the same sessions against a real proxy process started under
cProfile (this script, ``--child``, wraps ``python -m referral_proxy``): 20 sessions
to warm up (the keepalive parks the backend connection), the profile reset (SIGUSR1),
N sessions, the profile written (SIGUSR2); then the top functions by own time and by
calls, per session. Times are cProfile's (its overhead inflates small functions); the
call counts are exact.

    python bench/profile_session_calls.py --count 2000 [--tree /path/to/checkout] [--out FILE.prof]
"""

from __future__ import annotations

import argparse
import os
import pstats
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(out: str, argv: list[str]) -> None:
    """The proxy under cProfile: SIGUSR1 starts the profile afresh, SIGUSR2 writes it to *out*."""
    import cProfile
    import runpy

    prof = [cProfile.Profile()]

    def reset(*_args: object) -> None:
        prof[0].disable()
        prof[0] = cProfile.Profile()
        prof[0].enable()

    def dump(*_args: object) -> None:
        prof[0].disable()
        prof[0].dump_stats(out)

    signal.signal(signal.SIGUSR1, reset)
    signal.signal(signal.SIGUSR2, dump)
    sys.argv = ["referral_proxy", *argv]
    prof[0].enable()
    runpy.run_module("referral_proxy", run_name="__main__")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent), help="checkout to measure")
    ap.add_argument("--count", type=int, default=2000, help="sessions profiled (2000)")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--out", help="keep the profile (pstats) here")
    args = ap.parse_args()

    from _common import USER, Dovecot, ProxyProcess, _ProxyProcess, install_signal_handlers, make_root
    from bench_stress_cpu import session_once

    install_signal_handlers()
    root = make_root("rp-sesscalls-")
    d = Dovecot("sesscalls", "127.0.0.2", root / "b1")
    p: ProxyProcess | None = None
    prof = root / "session.prof"
    try:
        d.start()
        password = d.password(USER)
        (root / "p").mkdir()
        p = ProxyProcess(root / "p", d)
        _ProxyProcess.start(p, timeout=120, new_group=True, tied_to_parent=True,
                            env={"PYTHONPATH": str(Path(args.tree).resolve())},
                            command=[os.path.realpath(sys.executable), __file__, "--child", str(prof)])
        assert p.process is not None
        for _ in range(20):
            session_once(p.port, password)
        os.kill(p.process.pid, signal.SIGUSR1)
        time.sleep(0.5)
        for _ in range(args.count):
            session_once(p.port, password)
        os.kill(p.process.pid, signal.SIGUSR2)
        for _ in range(100):
            if prof.exists():
                break
            time.sleep(0.05)
        time.sleep(0.5)
        stats = pstats.Stats(str(prof))
        rows = []
        for (path, line, name), (_cc, calls, own, cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
            where = path.split("site-packages/")[-1].split("referral_proxy/")[-1]
            rows.append((own, calls, cum, f"{where}:{line} {name}"))
        n = args.count
        print(f"{sum(r[1] for r in rows) / n:.0f} Python-level calls per session ({args.tree})")
        for title, key in (("own time", lambda r: -r[0]), ("calls", lambda r: -r[1])):
            print(f"\nby {title}: own us, cumulative us, calls per session")
            for own, calls, cum, what in sorted(rows, key=key)[:args.top]:
                print(f"{own / n * 1e6:8.1f} {cum / n * 1e6:9.1f} {calls / n:6.1f}  {what}")
        if args.out:
            shutil.copy(prof, args.out)
    finally:
        if p is not None:
            p.stop()
        d.stop()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
