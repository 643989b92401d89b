"""Run ``referral-proxy`` (the proxy, ``move`` or ``recover``) with a journal-step hook, for tests.

    python tests/faultproxy.py --kill-at copied:2 -- --config proxy.toml
    python tests/faultproxy.py --pause-at aside:1 --pause-dir DIR -- move --config C alice Work b3

``--kill-at STEP[:N]``: SIGKILL this process right after the N-th (default 1st) journal
write of STEP (journal.Step values). ``--pause-at STEP[:N]`` (repeatable): there, write DIR/paused
(holding the step name), then wait until DIR/resume appears (the whole process stops
meanwhile, as a slow backend would stop it), remove it and go on. The hook is given to
the production code as ``on_step`` (cli.main); nothing in the package reads this file.
``--store-lock-wait S``: an SQLite map store waits S seconds (not store.LOCK_WAIT) for another
process's lock before a write fails (tests hold the lock past it without waiting 10 s each).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path


def _point(spec: str) -> tuple[str, int]:
    step, _, n = spec.partition(":")
    return step, int(n or 1)


def make_hook(kill_at: str | None, pause_at: list[str], pause_dir: str | None):
    seen: dict[str, int] = {}
    kill = _point(kill_at) if kill_at else None
    pauses = {_point(p) for p in pause_at}

    def hook(entry) -> None:
        step = entry.step.value
        seen[step] = seen.get(step, 0) + 1
        if kill == (step, seen[step]):
            sys.stderr.write(f"faultproxy: killed at {step}:{seen[step]}\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if (step, seen[step]) in pauses:
            d = Path(pause_dir or ".")
            (d / "paused.tmp").write_text(f"{step}:{seen[step]}")
            (d / "paused.tmp").rename(d / "paused")  # whole, or not there
            deadline = time.monotonic() + 120
            while not (d / "resume").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            (d / "resume").unlink(missing_ok=True)

    return hook


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(prog="faultproxy")
    parser.add_argument("--kill-at")
    parser.add_argument("--pause-at", action="append", default=[])
    parser.add_argument("--pause-dir")
    parser.add_argument("--store-lock-wait", type=float)
    opts = parser.parse_args(argv[:split])
    if opts.store_lock_wait is not None:
        from referral_proxy import store

        store.LOCK_WAIT = opts.store_lock_wait
    from referral_proxy.cli import main as cli_main

    return cli_main(argv[split + 1:], on_step=make_hook(opts.kill_at, opts.pause_at, opts.pause_dir))


if __name__ == "__main__":
    sys.exit(main())
