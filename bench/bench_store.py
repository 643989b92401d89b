"""The map store's cost to a proxy: journal writes, the reactor's stalls meanwhile, and how soon another
proxy learns of a change (PostgreSQL: LISTEN/NOTIFY; SQLite: data_version at its next lookup).

    python bench/bench_store.py [--steps 2000]

Starts a PostgreSQL server of its own (referral_proxy/testing/pg.py, Unix socket, fsync off like
the tests: the figures are the proxy's side, not a durable disk's), and an SQLite file in the same
folder. Ratios and percentiles only; a shared machine makes absolute figures noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from twisted.internet import defer, reactor, task  # noqa: E402

from referral_proxy.journal import Reservation, Step  # noqa: E402
from referral_proxy.pgstore import PostgresStore, migrate  # noqa: E402
from referral_proxy.store import SQLiteStore  # noqa: E402
from referral_proxy.testing.pg import PostgresServer  # noqa: E402


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


async def steps(store, n: int) -> tuple[list[float], list[float]]:
    """n journal step writes, one after another: each one's seconds, and the reactor's lags meanwhile
    (a store whose writes never yield, SQLite, lets the ticker run only between them: no lags to show)."""
    lags: list[float] = []
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        lags.append(now - last[0] - 0.001)
        last[0] = now

    ticker = task.LoopingCall(tick)
    ticker.start(0.001)
    entry = await store.begin_move("bench", "move", [Reservation("Work")], {"n": 0}, "bench:1:1", "/")
    took = []
    for i in range(n):
        t0 = time.perf_counter()
        await store.journal_step(entry, Step.PLANNED, {"n": i, "pad": "x" * 200}, "bench:1:1")
        took.append(time.perf_counter() - t0)
    await store.end_move(entry)
    ticker.stop()
    return took, lags


async def propagation(a, b, n: int) -> list[float]:
    """Seconds from a's placement write returning to b's poll() handing out a snapshot with it."""
    out = []
    for i in range(n):
        await a.set("bench", f"Box{i}", ("b2",))
        t0 = time.perf_counter()
        while True:
            snap = b.poll()
            if snap is not None and ("bench", f"Box{i}") in snap.placements:
                break
            await task.deferLater(reactor, 0.0002, lambda: None)
        out.append(time.perf_counter() - t0)
    return out


async def main(args: argparse.Namespace, root: Path) -> None:
    server = PostgresServer(root / "pg")
    server.init()
    server.start()
    try:
        dsn = server.create_db("bench")
        migrate(dsn)
        sqlite_store = SQLiteStore(root / "map.sqlite3")
        pg_a = PostgresStore(dsn, reactor)
        pg_b = PostgresStore(dsn, reactor)
        pg_a.start()
        pg_b.start()
        rows = []
        for name, store in (("SQLite", sqlite_store), ("PostgreSQL", pg_a)):
            took, lags = await steps(store, args.steps)
            lag = (f"{pct(lags, 0.99) * 1e3:.2f} / {max(lags) * 1e3:.1f}" if len(lags) > 10
                   else f"in the reactor thread: {sum(took) * 1e3:.0f} ms in all")
            rows.append((name, statistics.median(took) * 1e6, pct(took, 0.99) * 1e6, args.steps / sum(took), lag))
        print(f"journal step writes, {args.steps} in a row (the reactor ticking every 1 ms meanwhile):")
        print("| store | median us | p99 us | steps/s | reactor lag p99 / max ms |")
        print("|---|---|---|---|---|")
        for name, med, p99, rate, lag in rows:
            print(f"| {name} | {med:.0f} | {p99:.0f} | {rate:,.0f} | {lag} |")
        seen = await propagation(pg_a, pg_b, args.changes)
        print(f"\nPostgreSQL: a placement written by one store seen by another's poll(), {args.changes} changes: "
              f"median {statistics.median(seen) * 1e3:.2f} ms, p99 {pct(seen, 0.99) * 1e3:.2f} ms")
        await pg_a.close()
        await pg_b.close()
        await sqlite_store.close()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rp-bench-store-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)

        def run() -> None:
            d = defer.ensureDeferred(main(args, root))
            d.addErrback(lambda f: (f.printTraceback(), None))
            d.addBoth(lambda _: reactor.stop())

        reactor.callWhenRunning(run)
        reactor.run()
