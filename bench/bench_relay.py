#!/usr/bin/env python3
"""Relay overhead of referral-proxy: direct Dovecot vs. through the proxy, in one run.

Starts one real Dovecot (127.0.0.2) and the proxy (``python -m referral_proxy``
on 127.0.0.1) in front of it, seeds alice's mailbox "Bench" directly on Dovecot,
then measures against both, alternating the two so they share the machine's noise:

* NOOP round trip (raw socket: send ``tN NOOP``, read to the tagged reply):
  median and p99 in microseconds;
* FETCH throughput (raw socket: ``UID FETCH 1:* BODY.PEEK[]``, bytes counted until
  the tagged OK, literals skipped by their announced size, no parsing): best and
  median MB/s (1 MB = 10**6 bytes on the wire).

Prints a table with the ratio proxy/direct: for latency lower is better (ratio > 1
= the proxy adds latency), for throughput higher is better (ratio < 1 = the proxy
is slower).  ``--json FILE`` also writes every number.  Needs root and the
``dovecot`` binary (see referral_proxy/fleet/).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    USER,
    Dovecot,
    Harness,
    ProtocolError,
    apply_pin,
    dovecot_available,
    environment,
    install_signal_handlers,
    log,
    make_message,
    percentile,
    quote,
    render_table,
    report,
    run_cli,
)
from _common import RawIMAP as _RawIMAP  # noqa: E402

MAILBOX = "Bench"


# ----------------------------------------------------------------------------- raw client


class RawIMAP(_RawIMAP):
    """The shared raw client plus what this benchmark measures."""

    def examine(self, mailbox: str) -> int:
        _, untagged = self.command(b"EXAMINE %s" % quote(mailbox))
        for line in untagged:
            m = re.match(rb"\* (\d+) EXISTS", line)
            if m:
                return int(m.group(1))
        raise ProtocolError(f"{self.label}: no EXISTS in EXAMINE answer")

    # -- measured operations ------------------------------------------------------

    def noop_rtt_ns(self) -> int:
        """One NOOP round trip in nanoseconds (send to tagged reply)."""
        tag = self.next_tag()
        data = tag + b" NOOP\r\n"
        prefix = tag + b" "
        sock = self.sock
        buf = self.buf
        t0 = time.perf_counter_ns()
        sock.sendall(data)
        while True:
            i = buf.find(b"\n")
            while i < 0:
                self._fill()
                i = buf.find(b"\n")
            line = bytes(buf[: i + 1])
            del buf[: i + 1]
            if line.startswith(prefix):
                t1 = time.perf_counter_ns()
                if not line.startswith(prefix + b"OK"):
                    raise ProtocolError(f"{self.label}: NOOP failed: {line!r}")
                return t1 - t0


# ----------------------------------------------------------------------------- seeding


def seed(dovecot: Dovecot, messages: int, size: int) -> int:
    """APPEND *messages* messages to alice's MAILBOX directly on Dovecot; total bytes."""
    rng = random.Random(20240101)
    conn = dovecot.client(USER)
    total = 0
    try:
        typ, data = conn.create(MAILBOX)
        if typ != "OK":
            raise RuntimeError(f"CREATE {MAILBOX} failed: {data!r}")
        for i in range(1, messages + 1):
            msg = make_message(i, size, rng)
            total += len(msg)
            typ, data = conn.append(MAILBOX, None, None, msg)
            if typ != "OK":
                raise RuntimeError(f"APPEND {i} failed: {data!r}")
        typ, data = conn.select(MAILBOX, readonly=True)
        if typ != "OK" or int(data[0]) != messages:
            raise RuntimeError(f"{MAILBOX} has {data!r} messages, expected {messages}")
        conn.logout()
    except BaseException:
        # Maybe mid-literal: LOGOUT would wait for an answer that never comes.
        try:
            conn.shutdown()
        except OSError:
            pass
        raise
    return total


# ----------------------------------------------------------------------------- statistics


def noop_stats(samples_ns: list[int]) -> dict:
    us = sorted(v / 1000 for v in samples_ns)
    return {
        "n": len(us),
        "median_us": statistics.median(us),
        "p99_us": percentile(us, 99),
        "min_us": us[0],
        "max_us": us[-1],
        "mean_us": statistics.fmean(us),
        "over_10ms": sum(1 for v in us if v > 10_000),
    }


def fetch_stats(runs: list[tuple[int, int, int, int]]) -> dict:
    rates = [total / (ns / 1e9) / 1e6 for ns, total, _, _ in runs]
    return {
        "runs": len(runs),
        "best_mb_s": max(rates),
        "median_mb_s": statistics.median(rates),
        "worst_mb_s": min(rates),
        "rates_mb_s": rates,
        "seconds": [ns / 1e9 for ns, _, _, _ in runs],
        "wire_bytes": runs[0][1],
        "literal_bytes": runs[0][2],
        "literals": runs[0][3],
    }


# ----------------------------------------------------------------------------- measuring


def measure_noop(clients: dict[str, RawIMAP], count: int, warmup: int, block: int) -> dict[str, list[int]]:
    """*count* NOOPs per target, in blocks of *block*, alternating direct/proxy with
    the order flipped every round (ABBA) so neither side always goes first."""
    for _ in range(warmup):
        for c in clients.values():
            c.noop_rtt_ns()
    samples: dict[str, list[int]] = {k: [] for k in clients}
    names = list(clients)
    rounds = math.ceil(count / block)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            c = clients[name]
            out = samples[name]
            for _ in range(min(block, count - r * block)):
                out.append(c.noop_rtt_ns())
    return samples


def measure_fetch(clients: dict[str, RawIMAP], repeats: int, warmup: int,
                  expect_literals: int, expect_bytes: int) -> dict[str, list[tuple[int, int, int, int]]]:
    for _ in range(warmup):
        for c in clients.values():
            c.fetch_all()
    runs: dict[str, list[tuple[int, int, int, int]]] = {k: [] for k in clients}
    names = list(clients)
    for r in range(repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            res = clients[name].fetch_all()
            _, _, lit_bytes, lits = res
            if lits != expect_literals or lit_bytes != expect_bytes:
                raise ProtocolError(f"{name}: FETCH returned {lits} literals / {lit_bytes} bytes, "
                                    f"expected {expect_literals} / {expect_bytes}")
            runs[name].append(res)
    return runs


# ----------------------------------------------------------------------------- report


def table(results: dict) -> str:
    n, f = results["noop"], results["fetch"]
    rows = [
        ("NOOP round trip median (us)", n["direct"]["median_us"], n["proxy"]["median_us"], "lower"),
        ("NOOP round trip p99 (us)", n["direct"]["p99_us"], n["proxy"]["p99_us"], "lower"),
        ("FETCH throughput best (MB/s)", f["direct"]["best_mb_s"], f["proxy"]["best_mb_s"], "higher"),
        ("FETCH throughput median (MB/s)", f["direct"]["median_mb_s"], f["proxy"]["median_mb_s"], "higher"),
    ]
    head = ("metric", "direct", "proxy", "proxy/direct", "better")
    body = [(m, f"{d:.1f}", f"{p:.1f}", f"{p / d:.2f}" if d else "n/a", f"{b} is better") for m, d, p, b in rows]
    lines = render_table(head, body, left=(0, 4))
    lines.append("")
    lines.append("ratio proxy/direct: latency > 1 = the proxy adds latency; "
                 "throughput < 1 = the proxy is slower.")
    pinned = results["params"]["pinned_cpus"]
    lines.append(f"CPUs: {results['environment']['cpus']}, "
                 + (f"everything pinned to {','.join(map(str, pinned))}." if pinned else "not pinned."))
    lines.append(f"NOOP: {n['direct']['n']} round trips each; FETCH: {f['direct']['runs']} runs each of "
                 f"{f['direct']['literals']} messages, {f['direct']['wire_bytes'] / 1e6:.1f} MB on the wire "
                 f"(direct) / {f['proxy']['wire_bytes'] / 1e6:.1f} MB (proxy).")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=200, help="messages in the mailbox (200)")
    ap.add_argument("--size", type=int, default=102400, help="bytes per message (102400)")
    ap.add_argument("--noops", type=int, default=2000, help="NOOP round trips per target (2000)")
    ap.add_argument("--noop-warmup", type=int, default=200, help="unmeasured NOOPs per target first (200)")
    ap.add_argument("--noop-block", type=int, default=100,
                    help="NOOPs in a row on one target before switching to the other (100)")
    ap.add_argument("--fetches", type=int, default=5, help="measured full FETCHes per target (5)")
    ap.add_argument("--fetch-warmup", type=int, default=1, help="unmeasured full FETCHes per target first (1)")
    ap.add_argument("--pin", metavar="CPUS",
                    help="pin the benchmark, Dovecot and the proxy (they inherit it) to these CPUs, "
                         "e.g. '0' or '0,1'; default: no pinning (see bench/README.md)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, config)")
    args = ap.parse_args(argv)
    if args.messages < 1 or args.size < 300 or args.noops < 1 or args.fetches < 1 or args.noop_block < 1:
        ap.error("--messages, --noops, --fetches, --noop-block must be >= 1 and --size >= 300")

    pin = apply_pin(ap, args.pin)

    reason = dovecot_available()
    if reason is not None:
        print(f"bench_relay: cannot run Dovecot here: {reason}", file=sys.stderr)
        return 2

    install_signal_handlers()
    with Harness(keep=args.keep) as h:
        h.start()
        dovecot, proxy = h.dovecot, h.proxy
        assert dovecot is not None and proxy is not None

        t0 = time.monotonic()
        seeded = seed(dovecot, args.messages, args.size)
        log(f"seeded {args.messages} messages, {seeded / 1e6:.1f} MB in {time.monotonic() - t0:.1f}s")

        clients: dict[str, RawIMAP] = {}
        for name in ("direct", "proxy"):
            c = clients[name] = h.connect(name, cls=RawIMAP)  # type: ignore[assignment]
            exists = c.examine(MAILBOX)
            if exists != args.messages:
                raise ProtocolError(f"{name}: {MAILBOX} has {exists} messages, expected {args.messages}")

        gc.collect()
        gc.disable()
        try:
            t0 = time.monotonic()
            noop = measure_noop(clients, args.noops, args.noop_warmup, args.noop_block)
            log(f"NOOP done in {time.monotonic() - t0:.1f}s")
            t0 = time.monotonic()
            fetch = measure_fetch(clients, args.fetches, args.fetch_warmup, args.messages, seeded)
            log(f"FETCH done in {time.monotonic() - t0:.1f}s")
        finally:
            gc.enable()

        results = {
            "params": {
                "messages": args.messages, "size": args.size, "noops": args.noops,
                "noop_warmup": args.noop_warmup, "noop_block": args.noop_block,
                "fetches": args.fetches, "fetch_warmup": args.fetch_warmup,
                "seeded_bytes": seeded,
                "pinned_cpus": sorted(pin) if pin else None,
            },
            "environment": environment(),
            "noop": {k: noop_stats(v) for k, v in noop.items()},
            "fetch": {k: fetch_stats(v) for k, v in fetch.items()},
        }
        results["ratios_proxy_over_direct"] = {
            "noop_median": results["noop"]["proxy"]["median_us"] / results["noop"]["direct"]["median_us"],
            "noop_p99": results["noop"]["proxy"]["p99_us"] / results["noop"]["direct"]["p99_us"],
            "fetch_best": results["fetch"]["proxy"]["best_mb_s"] / results["fetch"]["direct"]["best_mb_s"],
            "fetch_median": results["fetch"]["proxy"]["median_mb_s"] / results["fetch"]["direct"]["median_mb_s"],
            "_meaning": "latency: lower is better (ratio > 1 = proxy slower); "
                        "throughput: higher is better (ratio < 1 = proxy slower)",
        }

        h.close_clients()

        report(results, table, proxy.stderr_text(), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("bench_relay", main))
