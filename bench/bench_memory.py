#!/usr/bin/env python3
"""Memory per idle logged-in session: where each byte goes, this checkout beside another.

    python bench/bench_memory.py                          # this checkout, 500 sessions
    python bench/bench_memory.py --compare main --sessions 1000 --top 15

One real Dovecot (tmpfs) and, for each target (this checkout; with ``--compare REV`` also
that revision, exported with ``git archive``), taken in turn and rotated every round:

* **traced**: the proxy under tracemalloc (``referral_proxy/testing/memtrace.py``);
  ``--warm`` idle sessions (LOGIN as alice, NOOP), a snapshot, ``--sessions`` more, a
  snapshot: Python heap bytes per session, the growth grouped by traceback and by line,
  and the live objects per session by type;
* **plain**: the proxy as it runs, the same sessions twice: PSS (``smaps_rollup``) with
  2N minus with N, / N, as ``bench_peers.py``'s memory row measures it.

Kernel socket buffers (two sockets a session) are not in either figure: ``ss -tm``
of idle sockets shows what they hold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PROXY_HOST,
    REPO_ROOT,
    USER,
    Harness,
    ProxyProcess,
    dovecot_available,
    install_signal_handlers,
    log,
    run_cli,
)
from peers import tree_pss_bytes  # noqa: E402

from referral_proxy.testing import memtrace  # noqa: E402

RAISED = "".join(f"{k} = 100000\n" for k in (
    "max_connections", "max_connections_per_ip", "max_unauthenticated_per_ip", "max_connections_per_user"))
RAISED += "login_penalty = 0\n"


def open_sessions(port: int, password: str, n: int) -> list[memtrace.IdleClient]:
    return [memtrace.IdleClient(PROXY_HOST, port, USER, password) for _ in range(n)]


def wait_backend_idle(h: Harness, keep: int = 0, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while len(h.dovecot.sessions(USER)) > keep and time.monotonic() < deadline:
        time.sleep(0.1)


def start_proxy(h: Harness, name: str, tree: Path, trace_dir: Path | None) -> ProxyProcess:
    workdir = h.root / name
    workdir.mkdir()
    proxy = ProxyProcess(workdir, h.dovecots, proxy_extra=RAISED)
    command = memtrace.command(trace_dir) if trace_dir is not None else None
    ProxyProcess.__mro__[1].start(proxy, command=command, env={"PYTHONPATH": str(tree)}, timeout=30,
                                  new_group=True, tied_to_parent=True)
    return proxy


def measure_traced(h: Harness, name: str, tree: Path, args: argparse.Namespace, password: str) -> dict:
    trace_dir = h.root / f"{name}-trace"
    trace_dir.mkdir()
    proxy = start_proxy(h, name, tree, trace_dir)
    clients: list[memtrace.IdleClient] = []
    try:
        clients += open_sessions(proxy.port, password, args.warm)
        time.sleep(0.5)
        before = memtrace.request_snapshot(proxy.pid, trace_dir, 1)
        clients += open_sessions(proxy.port, password, args.sessions)
        time.sleep(0.5)
        after = memtrace.request_snapshot(proxy.pid, trace_dir, 2)
        n = args.sessions
        return {
            "heap_per_session": memtrace.per_session(before, after, n),
            "by_traceback": memtrace.top_lines(before, after, n, args.top, "traceback"),
            "by_line": memtrace.top_lines(before, after, n, args.top, "lineno")[:-1],
        }
    finally:
        for c in clients:
            c.close()
        proxy.stop()
        wait_backend_idle(h)


def measure_pss(h: Harness, name: str, tree: Path, args: argparse.Namespace, password: str) -> float:
    proxy = start_proxy(h, name, tree, None)
    clients: list[memtrace.IdleClient] = []
    try:
        samples = []
        for _ in range(2):
            clients += open_sessions(proxy.port, password, args.sessions)
            time.sleep(0.5)
            samples.append(tree_pss_bytes(proxy.pid))
        return (samples[1] - samples[0]) / args.sessions
    finally:
        for c in clients:
            c.close()
        proxy.stop()
        wait_backend_idle(h)


def export(rev: str, into: Path) -> str:
    """*rev* of this repository as a tree of files in *into*; its short commit."""
    commit = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", commit], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return commit


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", help="also measure this git revision (e.g. main)")
    ap.add_argument("--sessions", type=int, default=500, help="idle sessions measured (500)")
    ap.add_argument("--warm", type=int, default=50, help="idle sessions before the first snapshot (50)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--top", type=int, default=12, help="growth entries shown (12)")
    ap.add_argument("--skip-pss", action="store_true", help="tracemalloc only")
    ap.add_argument("--json")
    args = ap.parse_args()
    reason = dovecot_available()
    if reason:
        print(f"bench_memory: {reason}", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    install_signal_handlers()
    here = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "referral_proxy"],
                           capture_output=True, text=True).stdout.strip()
    targets = [(f"this ({here}{'+changes' if dirty else ''})", REPO_ROOT)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="rp-memory-") as old, Harness() as h:
        if args.compare:
            targets.append((f"{args.compare} ({export(args.compare, Path(old))})", Path(old)))
        h.start()
        h.proxy.stop()  # the harness's own proxy is not measured
        password = h.dovecot.password(USER)
        for r in range(args.rounds):
            order = targets[r % len(targets):] + targets[:r % len(targets)]
            for label, tree in order:
                key = f"{label.split()[0]}-{r}"
                log(f"round {r + 1}: {label}, traced")
                res = results.setdefault(label, {"heap": [], "pss": [], "detail": None})
                t = measure_traced(h, f"{key}-traced", tree, args, password)
                res["heap"].append(t["heap_per_session"])
                res["detail"] = t
                if not args.skip_pss:
                    log(f"round {r + 1}: {label}, PSS")
                    res["pss"].append(measure_pss(h, f"{key}-plain", tree, args, password))
    load = os.getloadavg()
    print(f"\n{args.sessions} idle logged-in sessions (after {args.warm}), {args.rounds} round(s); "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}\n")
    print("| target | Python heap per session (tracemalloc) | PSS per session |\n|---|---|---|")
    for label, res in results.items():
        pss = f"{statistics.median(res['pss']) / 1024:.2f} KB" if res["pss"] else "-"
        print(f"| {label} | {statistics.median(res['heap']) / 1024:.2f} KB "
              f"({', '.join(f'{x:.0f}' for x in res['heap'])} B) | {pss} "
              f"({', '.join(f'{x:.0f}' for x in res['pss'])} B) |")
    for label, res in results.items():
        print(f"\n## {label}: the heap's growth per session, by traceback (innermost first)\n")
        print("\n".join(res["detail"]["by_traceback"]))
        print(f"\n## {label}: by line\n")
        print("\n".join(res["detail"]["by_line"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli("bench_memory", main))
