#!/usr/bin/env python3
"""What counting (the Observer, issue 12's metrics) costs the hot path: with it and without it, interleaved.

The Observer counts whether or not ``[metrics]`` is configured (its events are the logs;
``[metrics]`` adds the HTTP endpoint and the health checks). So three proxies run side
by side on one backend Dovecot, measured in turns (the order rotated every round):

* ``no counting``: bench/nocount_proxy.py, the Observer's per-read, per-write and
  per-command hooks switched off (the "before");
* ``metrics off``: the proxy as shipped, no ``[metrics]``;
* ``metrics on``: ``[metrics]`` listening, ``/metrics`` scraped every ``--scrape``
  seconds meanwhile (Prometheus scrapes every 15-60 s: 1 s is pessimistic).

Workloads: ``noop`` (10 connections sending NOOPs back to back) and ``stress``
(bench/loadgen.py's imaptest-like mix, 100 users, 20 clients), both from
bench/profile_proxy.py; for each: the proxy's CPU microseconds per op (user + system,
/proc), per round, and the medians. Then, exact and free of the machine's noise, in
memory (referral_proxy.testing.fakes, no sockets): the CPU instructions one relayed
command costs with and without counting, by ``valgrind --tool=callgrind`` (the
difference of two runs of different lengths, so start-up cancels out), and CPU
time per command by process_time, interleaved.

    python bench/bench_metrics_cost.py                          # 5 rounds x 2 workloads x 3 proxies, 8 s each
    python bench/bench_metrics_cost.py --rounds 3 --seconds 5 --no-callgrind
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import REPO_ROOT, ProxyProcess, dovecot_available, install_signal_handlers, log, run_cli  # noqa: E402
from bench_peers import STRESS_PASSWORD, bench_root  # noqa: E402
from peers import Target, stop_all  # noqa: E402
from profile_proxy import measure_base, run_workload  # noqa: E402

from referral_proxy.fleet import DEFAULT_USERS, Dovecot, free_port  # noqa: E402
from referral_proxy.testing.proxyproc import ProxyProcess as _ProxyProcess  # noqa: E402

VARIANTS = ("no counting", "metrics off", "metrics on")


class _Proxy(ProxyProcess):
    """bench's ProxyProcess, started with another command (bench/nocount_proxy.py)."""

    command: list[str] | None = None

    def start(self) -> None:  # type: ignore[override]
        _ProxyProcess.start(self, timeout=20.0, new_group=True, tied_to_parent=True, command=self.command)


class Variant(Target):
    def __init__(self, root: Path, backend: Dovecot, name: str) -> None:
        self.key = self.label = name
        workdir = root / name.replace(" ", "-")
        workdir.mkdir(parents=True)
        self.metrics_port = free_port("127.0.0.1") if name == "metrics on" else None
        extra = "" if self.metrics_port is None else f'\n[metrics]\nlisten = "tcp:{self.metrics_port}:interface=127.0.0.1"\n'
        self.proxy = self.runner = _Proxy(workdir, backend, map_extra=extra)
        if name == "no counting":
            self.proxy.command = [sys.executable, str(Path(__file__).resolve().parent / "nocount_proxy.py")]
        self.port = self.proxy.port

    def log_text(self) -> str:
        return self.proxy.stderr_text()


class Scraper(threading.Thread):
    """GET /metrics every *every* seconds until stopped; how many scrapes, their bytes."""

    def __init__(self, port: int, every: float) -> None:
        super().__init__(daemon=True)
        self.url, self.every = f"http://127.0.0.1:{port}/metrics", every
        self.stop_event = threading.Event()
        self.scrapes = self.bytes = 0

    def run(self) -> None:
        while not self.stop_event.wait(self.every):
            self.bytes += len(urllib.request.urlopen(self.url, timeout=10).read())
            self.scrapes += 1


def measure(name: str, variant: Variant, backend: Dovecot, seconds: float, scrape: float) -> dict:
    scraper = None
    if variant.metrics_port is not None and scrape > 0:
        scraper = Scraper(variant.metrics_port, scrape)
        scraper.start()
    try:
        result = measure_base(name, variant, backend, seconds)
    finally:
        if scraper is not None:
            scraper.stop_event.set()
            scraper.join(15)
    if scraper is not None:
        result["scrapes"] = scraper.scrapes
    return result


# ----------------------------------------------------------------------------- in memory, exact


IN_MEMORY = {  # command, backend's answer (%d: the proxy's tag number)
    "NOOP": (b"NOOP", b"rp%d OK NOOP completed.\r\n"),
    "UID FETCH": (b"UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])",
                  b"* 1 FETCH (FLAGS (\\Seen) UID 1 BODY[HEADER.FIELDS (SUBJECT)] {14}\r\nSubject: x\r\n\r\n)\r\n"
                  b"rp%d OK done\r\n"),
}


def in_memory(command: str, count: int, counting: bool) -> float:
    """CPU microseconds per command (process_time) of *count* commands on a session in memory."""
    from bench_session_cpu import measure

    if not counting:
        from nocount_proxy import switch_off_counting

        switch_off_counting()

    def counted(h: Any) -> None:  # the harness really counted them (a bench that measures nothing must fail)
        n = sum(v for (name, _r), v in h.context.observer.commands_total.items() if name == command)
        assert n == (count if counting else 0), (n, count)

    line, answer = IN_MEMORY[command]
    return measure(count, line, answer, counted)


TREE = [str(REPO_ROOT)]  # the checkout the in-memory measurements import (--tree)


def _child(command: str, count: int, counting: bool) -> list[str]:
    # the tree's package imported first: bench/_common.py puts this checkout on sys.path too
    code = (f"import sys; sys.path[:0] = [{TREE[0]!r}, {str(Path(__file__).resolve().parent)!r}]; "
            "import referral_proxy.testing.fakes, referral_proxy.observe; "
            f"from bench_metrics_cost import in_memory; print(in_memory({command!r}, {count}, {counting}))")
    return [sys.executable, "-c", code]


def instructions(command: str, count: int, counting: bool) -> int:
    """Instructions (valgrind's Ir) of a whole in-memory run of *count* commands."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "callgrind.out"
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", *_child(command, count, counting)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800)
        m = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
        assert m, "callgrind wrote no totals"
        return int(m.group(1))


def per_command_instructions(command: str, counting: bool, small: int, large: int) -> float:
    return (instructions(command, large, counting) - instructions(command, small, counting)) / (large - small)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds; each measures every proxy once per workload (5)")
    ap.add_argument("--seconds", type=float, default=8.0, help="seconds of each measurement (8)")
    ap.add_argument("--workloads", default="noop,stress", help="noop,stress (both)")
    ap.add_argument("--scrape", type=float, default=1.0, help="seconds between two scrapes of 'metrics on' (1; 0: none)")
    ap.add_argument("--memory-count", type=int, default=20000, help="commands per in-memory CPU measurement (20000)")
    ap.add_argument("--no-callgrind", action="store_true", help="skip the instruction counts (valgrind)")
    ap.add_argument("--no-proxies", action="store_true", help="only the in-memory measurements")
    ap.add_argument("--tree", default=str(REPO_ROOT),
                    help="checkout whose package the in-memory measurements import (another branch: before/after)")
    ap.add_argument("--commands", default=",".join(IN_MEMORY), help=f"in-memory commands ({','.join(IN_MEMORY)})")
    args = ap.parse_args(argv)
    TREE[0] = args.tree
    commands = [c for c in args.commands.split(",") if c]
    workloads = [w for w in args.workloads.split(",") if w]
    lines: list[str] = [f"load average at start: {' '.join(f'{x:.1f}' for x in os.getloadavg())}", ""]

    if not args.no_proxies:
        reason = dovecot_available()
        if reason is not None:
            print(f"bench_metrics_cost: cannot run Dovecot here: {reason}", file=sys.stderr)
            return 2
        install_signal_handlers()
        root = bench_root()
        users = dict(DEFAULT_USERS)
        users.update({f"user{i}": STRESS_PASSWORD for i in range(1, 101)})
        backend = Dovecot("cost-backend", "127.0.0.2", root / "backend", users=users)
        variants: list[Variant] = []
        runs: dict[tuple[str, str], list[dict]] = {}
        try:
            backend.start()
            variants = [Variant(root, backend, name) for name in VARIANTS]
            for v in variants:
                v.start()
            for v in variants:
                run_workload("stress", v, backend, 2.0)  # fill the mailboxes, warm every proxy up
            for r in range(args.rounds):
                order = variants[r % len(variants):] + variants[:r % len(variants)]
                for name in workloads:
                    for v in order:
                        res = measure(name, v, backend, args.seconds, args.scrape)
                        runs.setdefault((name, v.label), []).append(res)
                        log(f"round {r + 1} {name} {v.label}: {res['ops_s']:.0f} ops/s, {res['cpu_us_per_op']:.1f} us/op"
                            + (f", {res['scrapes']} scrapes" if "scrapes" in res else ""))
        finally:
            stop_all(variants)
            backend.stop()
            shutil.rmtree(root, ignore_errors=True)
        lines += [f"Real proxies, {args.rounds} rounds of {args.seconds:g} s, order rotated each round "
                  f"('metrics on' scraped every {args.scrape:g} s); proxy CPU us per op (user + system), "
                  "median [each round]:", "",
                  "| workload | " + " | ".join(VARIANTS) + " | on vs no counting |", "|---|---|---|---|---|"]
        for name in workloads:
            cells, medians = [], {}
            for label in VARIANTS:
                values = [x["cpu_us_per_op"] for x in runs[(name, label)]]
                medians[label] = statistics.median(values)
                cells.append(f"{medians[label]:.1f} [{', '.join(f'{x:.0f}' for x in values)}]")
            ratio = medians["metrics on"] / medians["no counting"] - 1
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {ratio:+.1%} |")
        lines.append(f"load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
        lines.append("")

    lines += [f"In memory ({args.tree}: one session, scripted backend), CPU us per command, best of 5 interleaved runs of "
              f"{args.memory_count}:", "", "| command | no counting | counting | difference |", "|---|---|---|---|"]
    for command in commands:
        best = {True: float("inf"), False: float("inf")}
        for _ in range(5):
            for counting in (False, True):
                out = subprocess.run(_child(command, args.memory_count, counting), check=True, capture_output=True,
                                     text=True).stdout
                best[counting] = min(best[counting], float(out.strip().splitlines()[-1]))
        lines.append(f"| {command} | {best[False]:.2f} | {best[True]:.2f} | {best[True] - best[False]:+.2f} |")
    if not args.no_callgrind and shutil.which("valgrind"):
        lines += ["", "Instructions per command (valgrind callgrind, (Ir of 2,000 commands - Ir of 1,000) / 1,000; exact):",
                  "", "| command | no counting | counting | difference |", "|---|---|---|---|"]
        for command in commands:
            off = per_command_instructions(command, False, 1000, 2000)
            on = per_command_instructions(command, True, 1000, 2000)
            lines.append(f"| {command} | {off:,.0f} | {on:,.0f} | {on - off:+,.0f} ({on / off - 1:+.1%}) |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("bench_metrics_cost", main))
