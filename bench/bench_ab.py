#!/usr/bin/env python3
"""Two builds of the proxy side by side on the bulk rows: before/after a change, in one run.

Starts one Dovecot (127.0.0.2, maildirs on tmpfs in /dev/shm when there is one) and two
proxies in front of it: ``before`` (the package found in ``--before DIR``, e.g. ``git archive
main | tar -x -C DIR``) and ``after`` (this checkout). Each round takes direct, before and after in a rotated order, for each test:

* ``fetch``: ``UID FETCH 1:* BODY.PEEK[]`` of 500 x 100 KB (EXAMINEd, bench_relay's reader);
* ``c``: N APPEND commands one by one, each literal synchronizing (bench_append's (c));
* ``d``: the same as c-client writes it (Nagle on, each literal and its CRLF in two writes);
* ``e``: one MULTIAPPEND of N messages, each literal synchronizing (bench_append's (e));
* ``a``: one MULTIAPPEND of N messages with LITERAL+ (bench_append's (a));
* ``stress``: bench/loadgen.py's imaptest-like mix (100 users, 20 clients, a session of
  about ten commands each, then a new connection) for ``--stress-seconds``; an op is one
  command, its proxy CPU and system calls per command, and the Dovecot logins per session
  (a login's cost on both sides).

It prints per test and target the median rate, the ratio to direct, the proxy's CPU per
op (from /proc) and, with ``--strace``, its system calls per op (``strace -c -f -p``
around that proxy's runs only): exact counts, unlike rates, hardly move with other work
on the machine. Every APPEND run is checked (APPENDUIDs 1..N, STATUS on Dovecot).
"""

from __future__ import annotations

import argparse
import random
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PROXY_HOST,
    PROXY_START_TIMEOUT,
    USER,
    Dovecot,
    ProxyProcess,
    _ProxyProcess,
    cpu_seconds,
    install_signal_handlers,
    log,
    make_message,
    render_table,
    run_cli,
)
from bench_append import AppendClient, Control, check_replies, one_run  # noqa: E402
from bench_peers import STRESS_PASSWORD, bench_root  # noqa: E402
from loadgen import LoadConfig, numbered_users, run_load  # noqa: E402

FETCH_BOX = b"Fetch"
TESTS = {"fetch": "FETCH 1:* BODY.PEEK[] MB/s", "c": "APPENDs one by one, sync, msg/s",
         "d": "APPENDs one by one, sync, 2 writes, Nagle on, msg/s", "e": "MULTIAPPEND sync, msg/s",
         "a": "MULTIAPPEND LITERAL+, msg/s", "stress": "stress mix, ops/s"}


def seed(d: Dovecot, n: int, size: int) -> int:
    c = AppendClient(d.host, d.port, "seed")
    c.login(USER, d.password(USER))
    c.command(b"CREATE " + FETCH_BOX, check=False)
    rng = random.Random(7)
    msgs = [make_message(i, size, rng) for i in range(1, n + 1)]
    tag = c.next_tag()
    c.sock.sendall(tag + b" APPEND " + FETCH_BOX + b"".join(b" {%d+}\r\n" % len(m) + m for m in msgs) + b"\r\n")
    line, _ = c.read_tagged(tag)
    assert line.startswith(tag + b" OK"), line
    c.close()
    return sum(map(len, msgs))


def strace_start(pid: int, out: Path) -> subprocess.Popen:
    p = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", str(out)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # attached
    return p


def strace_counts(p: subprocess.Popen, out: Path) -> dict[str, int]:
    p.send_signal(2)
    p.wait(10)
    counts = {}
    for line in out.read_text().splitlines():
        m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$", line)
        if m and m.group(2) != "total":
            counts[m.group(2)] = int(m.group(1))
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", required=True, help="a source tree holding the 'before' referral_proxy package")
    ap.add_argument("--tests", default="fetch,c,e,a", help="comma-separated subset of fetch,c,d,e,a,stress")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=1000, help="messages per APPEND test (1000)")
    ap.add_argument("--size", type=int, default=20480, help="bytes per appended message (20480)")
    ap.add_argument("--fetch-messages", type=int, default=500)
    ap.add_argument("--fetch-size", type=int, default=100000)
    ap.add_argument("--stress-seconds", type=float, default=15.0)
    ap.add_argument("--strace", action="store_true", help="also count each proxy's system calls per op")
    args = ap.parse_args(argv)
    tests = [t for t in args.tests.split(",") if t]
    if set(tests) - set(TESTS):
        ap.error(f"--tests: a subset of {','.join(TESTS)}")
    install_signal_handlers()
    root = bench_root()  # maildirs on tmpfs, as bench_peers: on disk an APPEND waits for fsync
    d = Dovecot("ab", "127.0.0.2", root / "b1", users={USER: "secret", **{f"user{i}": STRESS_PASSWORD for i in range(1, 101)}})
    proxies: dict[str, ProxyProcess] = {}
    try:
        d.start()
        for name in ("before", "after"):
            (root / name).mkdir()
            p = proxies[name] = ProxyProcess(root / name, d)
            env = {"PYTHONPATH": str(Path(args.before).resolve())} if name == "before" else None
            _ProxyProcess.start(p, timeout=PROXY_START_TIMEOUT, new_group=True, tied_to_parent=True, env=env)
        fetch_bytes = seed(d, args.fetch_messages, args.fetch_size) if "fetch" in tests else 0
        rng = random.Random(20240101)
        msgs = [make_message(i, args.size, rng) for i in range(1, args.messages + 1)]
        msgs_crlf = [m + b"\r\n" for m in msgs]
        control = Control(d.host, d.port, "control")
        control.login(USER, d.password(USER))
        targets = ["direct", "before", "after"]
        rates: dict = {(t, k): [] for t in targets for k in tests}
        cpu: dict = {(t, k): [] for t in targets for k in tests}
        calls: dict = {(t, k): {} for t in targets for k in tests}
        logins: dict = {t: [] for t in targets}  # Dovecot logins per stress session
        passes = [(r, targets[r % 3:] + targets[:r % 3], False) for r in range(args.rounds)]
        if args.strace:  # counted apart: strace slows the traced proxy down several times
            passes.append((args.rounds, ["before", "after"], True))
        for r, order, traced in passes:
            for test in tests:
                for t in order:
                    host, port = (d.host, d.port) if t == "direct" else (PROXY_HOST, proxies[t].port)
                    pid = None if t == "direct" else proxies[t].pid
                    if test == "stress":
                        logged = d.log_text().count("Login: user=<user")
                        tracer = strace_start(pid, root / f"{t}.strace") if traced and pid else None
                        c0 = cpu_seconds(pid)
                        res = run_load(LoadConfig(host=host, port=port, clients=20, processes=4, intervals=1,
                                                  users=numbered_users("user%d", 100, STRESS_PASSWORD),
                                                  seconds=args.stress_seconds, warmup=0.5))
                        c1 = cpu_seconds(pid)
                        ops = max(1, res.interval_ops[0])
                        if tracer is not None:
                            for k, v in strace_counts(tracer, root / f"{t}.strace").items():
                                calls[(t, test)][k] = calls[(t, test)].get(k, 0) + v / ops
                        if traced:
                            continue
                        logins[t].append((d.log_text().count("Login: user=<user") - logged) / max(1, res.sessions))
                        rates[(t, test)].append(res.interval_ops[0] / args.stress_seconds)
                        if c0 is not None and c1 is not None:
                            cpu[(t, test)].append((c1 - c0) / ops * 1e6)
                        log(f"round {r + 1} {test} {t}: {rates[(t, test)][-1]:.1f} ops/s, "
                            f"{logins[t][-1]:.2f} Dovecot logins a session, {res.error_count} errors")
                        continue
                    c = AppendClient(host, port, t)
                    c.login(USER, d.password(USER))
                    if test == "fetch":
                        c.command(b"EXAMINE " + FETCH_BOX)
                    else:
                        control.reset()
                    tracer = strace_start(pid, root / f"{t}.strace") if traced and pid else None
                    c0 = cpu_seconds(pid)
                    if test == "fetch":
                        ns, _wire, lit, n = c.fetch_all()
                        assert lit == fetch_bytes and n == args.fetch_messages, (lit, n)
                        rate, ops = fetch_bytes / ns * 1e3, 1
                    else:
                        ns, replies, _sent = one_run(test, c, msgs, msgs_crlf)
                        rate, ops = args.messages / ns * 1e9, args.messages
                    c1 = cpu_seconds(pid)
                    if tracer is not None:
                        for k, v in strace_counts(tracer, root / f"{t}.strace").items():
                            calls[(t, test)][k] = calls[(t, test)].get(k, 0) + v / ops
                    if test != "fetch":
                        check_replies(t, test, replies, args.messages)
                        assert control.count() == args.messages
                    c.close()
                    if traced:
                        continue
                    rates[(t, test)].append(rate)
                    if c0 is not None and c1 is not None:
                        cpu[(t, test)].append((c1 - c0) / ops * 1e6)
                    log(f"round {r + 1} {test} {t}: {rate:.1f}")
        body = []
        for test in tests:
            direct = statistics.median(rates[("direct", test)])
            for t in targets:
                med = statistics.median(rates[(t, test)])
                row_calls = calls[(t, test)]
                top = sorted(row_calls.items(), key=lambda kv: -kv[1])[:10]
                shown = ", ".join(f"{k} {v:.2f}" for k, v in top)
                body.append((TESTS[test] if t == "direct" else "", t, f"{med:.1f}", f"x{med / direct:.2f}",
                             f"{statistics.fmean(cpu[(t, test)]):.0f}" if cpu[(t, test)] else "-",
                             f"{sum(row_calls.values()):.1f}: {shown}" if row_calls else "-"))
        print("\n".join(render_table(("test", "target", "median", "/direct", "proxy CPU us/op",
                                      "proxy system calls per op"), body, left=(0, 1, 5))))
        if "stress" in tests:
            print("Dovecot logins per stress session (median): "
                  + ", ".join(f"{t} {statistics.median(logins[t]):.2f}" for t in targets if logins[t]))
        ops = {"stress": "stress op = one command", "fetch": f"fetch op = one whole FETCH of {fetch_bytes / 1e6:.0f} MB",
               "append": f"APPEND op = one message of {args.size} bytes"}
        used = [ops[k] for k in ops if k in tests or (k == "append" and set(tests) & set("cdea"))]
        print(f"{args.rounds} rounds; " + "; ".join(used))
        return 0
    finally:
        for p in proxies.values():
            p.stop()
        d.stop()
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    sys.exit(run_cli("bench_ab", main))
