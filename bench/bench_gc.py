#!/usr/bin/env python3
"""What the garbage collector costs the proxy under the stress mix, per collector setting.

One Dovecot (tmpfs) and one proxy per setting of ``gc.set_threshold`` (``--thresholds``;
``""`` = as shipped, ``service.tune_gc``) and per checkout (``--trees``), each started with ``bench/gc_site`` on its
PYTHONPATH (its sitecustomize times every collection and applies the setting); the stress
mix (loadgen.py: 100 users, 20 clients) against each in turn, the order rotated every
round.  Per setting, medians of the rounds: proxy CPU per op (user + system, /proc),
collections per 1000 ops by generation, collector time per op, the longest pause, and the
Python heap's growth is left to bench_memory.py (the threshold bounds how many young
objects wait for a collection, not what a session keeps).

    python bench/bench_gc.py --rounds 3 --seconds 8 --thresholds ",700:10:10,100000:20:20"
    python bench/bench_gc.py --trees ",/work/main" --thresholds ""    # two builds, interleaved
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import dovecot_available, install_signal_handlers, log, signalled_json  # noqa: E402
from bench_peers import STRESS_PASSWORD, bench_root  # noqa: E402
from loadgen import LoadConfig, numbered_users, run_load  # noqa: E402
from peers import ReferralProxyTarget, stop_all, tree_cpu_user_system  # noqa: E402

from referral_proxy.fleet import Dovecot  # noqa: E402

SITE = Path(__file__).resolve().parent / "gc_site"


def _gc_stats(stats_dir: Path, pid: int) -> dict:
    """The proxy's collector figures now (it rewrites them on SIGUSR2)."""
    return signalled_json(stats_dir / f"gc.{pid}.json", pid)


def _stress(target: ReferralProxyTarget, seconds: float) -> int:
    cfg = LoadConfig(host=target.host, port=target.port, users=numbered_users("user%d", 100, STRESS_PASSWORD),
                     clients=20, processes=4, seconds=seconds, intervals=1, warmup=0.5)
    return run_load(cfg).interval_ops[0]


def measure(target: ReferralProxyTarget, stats_dir: Path, seconds: float) -> dict:
    """One interval of the stress mix: CPU and collections per op."""
    pid = target.cpu_root
    assert pid is not None
    g0, (u0, s0) = _gc_stats(stats_dir, pid), tree_cpu_user_system(pid)
    ops = max(_stress(target, seconds), 1)
    g1, (u1, s1) = _gc_stats(stats_dir, pid), tree_cpu_user_system(pid)
    return {"ops": ops, "cpu_us": (u1 - u0 + s1 - s0) / ops * 1e6,
            "per_1000": [(b - a) / ops * 1000 for a, b in zip(g0["collections"], g1["collections"])],
            "gc_us": sum(b - a for a, b in zip(g0["cpu_seconds"], g1["cpu_seconds"])) / ops * 1e6,
            "collected": sum(g1["collected"]) - sum(g0["collected"]),
            "per_collection_ms": (sum(g1["cpu_seconds"]) - sum(g0["cpu_seconds"])) * 1000
            / max(1, sum(g1["collections"]) - sum(g0["collections"])),
            "longest_ms": max(g1["longest"]) * 1000, "threshold": g1["threshold"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--thresholds", default=",700:10:10", help="comma-separated a:b:c settings; empty = as shipped")
    ap.add_argument("--trees", default="", help="comma-separated checkouts whose package the proxy runs; empty = this one")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0)
    args = ap.parse_args(argv)
    reason = dovecot_available()
    if reason is not None:
        print(f"bench_gc: cannot run Dovecot here: {reason}", file=sys.stderr)
        return 2
    settings = [f"{t}@{tree}" if tree else t for tree in args.trees.split(",") for t in args.thresholds.split(",")]
    install_signal_handlers()
    root = bench_root()
    users = {f"user{i}": STRESS_PASSWORD for i in range(1, 101)}
    backend = Dovecot("gc-backend", "127.0.0.2", root / "backend", users=users)
    targets: list[ReferralProxyTarget] = []
    results: dict[str, list[dict]] = {s: [] for s in settings}
    saved = {k: os.environ.get(k) for k in ("PYTHONPATH", "GC_STATS", "GC_THRESHOLD", "RP_TREE")}
    try:
        backend.start()
        for i, setting in enumerate(settings):
            stats_dir = root / f"gc{i}"
            stats_dir.mkdir()
            threshold, _, tree = setting.partition("@")
            os.environ.update(PYTHONPATH=os.pathsep.join(filter(None, [str(SITE), saved["PYTHONPATH"]])),
                              GC_STATS=str(stats_dir), GC_THRESHOLD=threshold.replace(":", ","), RP_TREE=tree)
            t = ReferralProxyTarget(root / f"p{i}", backend)
            t.start()
            t.stats_dir = stats_dir  # type: ignore[attr-defined]
            targets.append(t)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _stress(targets[0], 3.0)  # fill the mailboxes
        for r in range(args.rounds):
            for j in range(len(settings)):
                i = (j + r) % len(settings)
                log(f"round {r + 1}: {settings[i] or 'as shipped'}")
                results[settings[i]].append(measure(targets[i], targets[i].stats_dir, args.seconds))  # type: ignore[attr-defined]
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_all(targets)
        backend.stop()
        shutil.rmtree(root, ignore_errors=True)
    print("| gc.set_threshold [@tree] | proxy CPU us/op | collector CPU us/op | collections per 1000 ops (gen 0/1/2) "
          "| CPU ms per collection | objects collected per op | longest pause ms (wall) |")
    print("|---|---|---|---|---|---|---|")
    for s, rows in results.items():
        med = statistics.median
        per = [med(r["per_1000"][g] for r in rows) for g in range(3)]
        each = ", ".join("%.0f" % r["cpu_us"] for r in rows)
        print(f"| {s or 'as shipped'} {tuple(rows[0]['threshold'])} | {med(r['cpu_us'] for r in rows):.0f} "
              f"[{each}] | {med(r['gc_us'] for r in rows):.1f} | "
              f"{per[0]:.1f} / {per[1]:.2f} / {per[2]:.3f} | {med(r['per_collection_ms'] for r in rows):.2f} | "
              f"{med(r['collected'] / r['ops'] for r in rows):.0f} | {max(r['longest_ms'] for r in rows):.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
