#!/usr/bin/env python3
"""referral-proxy beside the C proxies, every metric of issue 13 in one run and one table.

Starts one backend Dovecot (127.0.0.2, maildirs on tmpfs in /dev/shm when there is
one) with alice and user1..user100, and in front of it, all on loopback: this
proxy, Dovecot in proxy mode (127.0.0.3, passdb ``proxy=y``), Perdition and nginx's
mail proxy (with bench/auth_http.py as its auth_http service).  Clients connect to
the backend directly ("direct") or through each proxy ("targets").  Measured on
every target, in rounds whose order of targets is rotated every round:

* the stress mix: bench/loadgen.py (imaptest's default mix, 100 users, 20 clients)
  for one interval per round: ops/s, and each proxy's CPU seconds per 1000 ops
  (its whole process tree, from /proc);
* ``UID FETCH 1:* BODY.PEEK[]`` of a 50 MB mailbox: MB/s;
* 1000 APPENDs one by one, each with a synchronizing literal: messages/s;
* one MULTIAPPEND of 1000 messages with synchronizing literals, and with LITERAL+;
* NOOP round trip, everything pinned to one CPU and unpinned: the median, and what
  the proxy adds to direct;
* once, on fresh processes: memory (PSS of the proxy's tree) per idle logged-in session.

Medians over the rounds, ratios to direct, one markdown table.  Everything started
is stopped at the end, on error and on Ctrl-C.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    USER,
    ProtocolError,
    dovecot_available,
    install_signal_handlers,
    log,
    make_message,
    run_cli,
)
from bench_append import MAILBOX as APPEND_BOX  # noqa: E402
from bench_append import AppendClient, Control, check_replies  # noqa: E402
from bench_relay import RawIMAP  # noqa: E402
from loadgen import LoadConfig, format_result, numbered_users, run_load  # noqa: E402
from peers import (  # noqa: E402
    DirectTarget,
    DovecotProxyTarget,
    NginxTarget,
    PerditionTarget,
    ReferralProxyTarget,
    Target,
    machine_busy_seconds,
    missing_peers,
    set_affinity,
    stop_all,
    tree_cpu_seconds,
    tree_pss_bytes,
)

from referral_proxy.fleet import DEFAULT_USERS, Dovecot, _check_traversable  # noqa: E402

BACKEND_HOST = "127.0.0.2"
FETCH_BOX = "Fetch"
PEERS = ("dovecot-proxy", "perdition", "nginx", "referral-proxy")
STRESS_PASSWORD = "secret"

# metric key -> (row label, kind); kind: rate (ratio to direct), us (added to direct), cpu, mem
METRICS = {
    "stress": ("stress mix ops/s", "rate"),
    "stress_cpu": ("proxy CPU-s per 1000 stress ops", "cpu"),
    "fetch": ("FETCH 1:* BODY.PEEK[] of {fetch_mb:.0f} MB, MB/s", "rate"),
    "append_sync": ("{n} APPENDs one by one (sync literal each), msg/s", "rate"),
    "multi_sync": ("MULTIAPPEND {n} msgs, sync literals, msg/s", "rate"),
    "multi_plus": ("MULTIAPPEND {n} msgs, LITERAL+, msg/s", "rate"),
    "noop_pinned": ("NOOP round trip added, all on 1 CPU", "us"),
    "noop": ("NOOP round trip added, unpinned", "us"),
    "memory": ("memory per idle authenticated session", "mem"),
    "foreign": ("CPU share taken by other work during the stress", "pct"),
}


# ----------------------------------------------------------------------------- clients


class PeerClient(RawIMAP, AppendClient):
    """bench_relay's NOOP and EXAMINE, bench_append's APPENDs (its MULTIAPPEND whose literals
    are all synchronizing included)."""


# ----------------------------------------------------------------------------- set-up


def bench_root() -> Path:
    """A new 0755 directory on tmpfs (/dev/shm) if there is one, else in the temp dir."""
    base = None
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        try:
            _check_traversable(shm)
            base = shm
        except Exception:
            base = None
    path = Path(tempfile.mkdtemp(prefix="rp-peers-", dir=base))
    os.chmod(path, 0o755)
    return path


def seed_fetch(backend: Dovecot, messages: int, size: int) -> int:
    """One MULTIAPPEND of *messages* x *size* bytes into alice's FETCH_BOX, directly."""
    rng = random.Random(20240101)
    c = PeerClient(backend.host, backend.port, "seed")
    try:
        c.login(USER, backend.password(USER))
        c.command(b"CREATE " + FETCH_BOX.encode(), check=False)
        msgs = [make_message(i, size, rng) for i in range(1, messages + 1)]
        tag = c.next_tag()
        c.sock.sendall(tag + b" APPEND " + FETCH_BOX.encode()
                       + b"".join(b" {%d+}\r\n" % len(m) + m for m in msgs) + b"\r\n")
        line, _ = c.read_tagged(tag)
        if not line.startswith(tag + b" OK"):
            raise ProtocolError(f"seeding {FETCH_BOX}: {line!r}")
        return sum(map(len, msgs))
    finally:
        c.close()


def wait_sessions_gone(backend: Dovecot, user: str, keep: int, timeout: float = 30.0) -> None:
    """Until at most *keep* imap processes of *user* are left on the backend."""
    deadline = time.monotonic() + timeout
    while len(backend.sessions(user)) > keep and time.monotonic() < deadline:
        time.sleep(0.05)


# ----------------------------------------------------------------------------- measurements


def measure_memory(t: Target, backend: Dovecot, sessions: int) -> float | None:
    """PSS bytes per idle logged-in session: (PSS with 2N sessions - PSS with N) / N, so
    that memory freed earlier and reused does not hide the cost. Direct: the backend's tree."""
    root = t.memory_root if isinstance(t, DirectTarget) else t.cpu_root
    if root is None:
        return None
    before_sessions = len(backend.sessions(USER))
    clients: list[PeerClient] = []
    try:
        samples = []
        for _ in range(2):
            for _ in range(sessions):
                c = PeerClient(t.host, t.port, t.key)
                clients.append(c)
                c.login(USER, backend.password(USER))
            for c in clients[-sessions:]:
                c.command(b"NOOP")
            time.sleep(0.5)
            samples.append(tree_pss_bytes(root))
        return (samples[1] - samples[0]) / sessions
    finally:
        for c in clients:
            c.close()
        wait_sessions_gone(backend, USER, before_sessions)


def measure_noop(clients: list[PeerClient], count: int, block: int = 100) -> list[float]:
    """Median NOOP round trip in microseconds of each client over *count* (after 100
    unmeasured), in blocks of *block* taking the clients in turn (the order rotated
    every block), so that every target sees the same scheduler weather."""
    for c in clients:
        for _ in range(100):
            c.noop_rtt_ns()
    samples: list[list[int]] = [[] for _ in clients]
    for b in range(-(-count // block)):
        n = min(block, count - b * block)
        for i in range(len(clients)):
            j = (i + b) % len(clients)
            samples[j] += [clients[j].noop_rtt_ns() for _ in range(n)]
    return [statistics.median(s) / 1000 for s in samples]


def measure_append(mode: str, c: PeerClient, control: Control, messages: list[bytes],
                   messages_crlf: list[bytes], cpu_root: int | None) -> tuple[float, float | None]:
    """(messages/s, proxy CPU seconds) of one run of *mode* on a fresh mailbox, checked."""
    control.reset()
    cpu0 = tree_cpu_seconds(cpu_root)
    if mode == "append_sync":
        ns, replies, _ = c.synchronizing(messages_crlf)
    elif mode == "multi_sync":
        ns, replies, _ = c.multiappend_sync(messages)
    else:
        ns, replies, _ = c.multiappend(messages)
    cpu1 = tree_cpu_seconds(cpu_root)
    check_replies(c.label, mode, replies, len(messages))
    count = control.count()
    if count != len(messages):
        raise ProtocolError(f"{c.label} ({mode}): {count} messages in {APPEND_BOX.decode()}, "
                            f"expected {len(messages)}")
    return len(messages) / (ns / 1e9), (None if cpu0 is None else cpu1 - cpu0)


def measure_stress(t: Target, backend: Dovecot, args) -> dict:
    cfg = LoadConfig(host=t.host, port=t.port, users=numbered_users("user%d", args.users, STRESS_PASSWORD),
                     clients=args.clients, processes=args.processes, seconds=args.stress_seconds,
                     intervals=1, warmup=args.stress_warmup, seed=args.seed)
    samples: list[tuple] = []

    def boundary(_i: int) -> None:
        samples.append((tree_cpu_seconds(t.cpu_root), tree_cpu_seconds(backend.pid), machine_busy_seconds(),
                        tree_cpu_seconds(os.getpid())))

    res = run_load(cfg, boundary)
    (p0, b0, (m0, tot0), o0), (p1, b1, (m1, tot1), o1) = samples
    ops = res.interval_ops[0]
    out = {
        "ops_s": res.ops_per_second[0], "ops": ops, "errors": res.error_count, "errors_by": res.errors,
        "error_samples": res.error_samples, "sessions": res.sessions, "by_command": res.by_command,
        "proxy_cpu_s": None if p0 is None else p1 - p0,
        "backend_cpu_s": b1 - b0,
        "machine_busy": (m1 - m0) / (tot1 - tot0) if tot1 > tot0 else None,
        # CPU share of the machine used by processes that are not this benchmark's (other work)
        "foreign_share": ((m1 - m0) - (o1 - o0)) / (tot1 - tot0) if tot1 > tot0 else None,
    }
    out["proxy_cpu_per_1000"] = None if p0 is None or not ops else (p1 - p0) / ops * 1000
    out["backend_cpu_per_1000"] = (b1 - b0) / ops * 1000 if ops else None
    log(f"  stress {t.label}: {format_result(res).splitlines()[1]}, errors {res.error_count}, "
        f"proxy CPU {out['proxy_cpu_s']}, machine busy {out['machine_busy']:.0%}")
    return out


# ----------------------------------------------------------------------------- report


def med(values: list) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def summarize(results: dict, keys: list[str]) -> dict:
    """Medians over the rounds per metric and target."""
    out: dict[str, dict[str, float | None]] = {}
    for metric in METRICS:
        if metric == "memory":
            out[metric] = {k: results["memory"].get(k) for k in keys}
            continue
        out[metric] = {}
        for k in keys:
            rounds = results["rounds"]
            if metric == "stress_cpu":
                vals = [r[k]["stress"]["proxy_cpu_per_1000"] for r in rounds if k in r and "stress" in r[k]]
            elif metric == "stress":
                vals = [r[k]["stress"]["ops_s"] for r in rounds if k in r and "stress" in r[k]]
            elif metric == "foreign":
                vals = [r[k]["stress"].get("foreign_share") for r in rounds if k in r and "stress" in r[k]]
            else:
                vals = [r[k].get(metric) for r in rounds if k in r]
            out[metric][k] = med(vals)
    return out


def markdown_table(summary: dict, targets: list[Target], params: dict) -> str:
    keys = [t.key for t in targets]
    head = ["metric"] + [t.label for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric, (label, kind) in METRICS.items():
        row = [label.format(fetch_mb=params["fetch_bytes"] / 1e6, n=params["append_messages"])]
        vals = summary[metric]
        d = vals.get("direct")
        for k in keys:
            v = vals.get(k)
            if v is None:
                row.append("-")
            elif kind == "rate":
                if k == "direct":
                    row.append(f"{v:,.0f}" if v >= 100 else f"{v:,.1f}")
                else:
                    row.append(f"x{v / d:.2f}" if d else f"{v:,.0f}")
            elif kind == "us":
                row.append(f"{v:.1f} us" if k == "direct" else (f"{v - d:+.0f} us" if d is not None else f"{v:.0f}"))
            elif kind == "cpu":
                row.append(f"{v:.3f}")
            elif kind == "pct":
                row.append(f"{max(0.0, v):.0%}")
            else:
                row.append(f"{v / 1024:.1f} KB")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def notes(results: dict, targets: list[Target]) -> str:
    """What the table does not show: the spread, the stress errors, the backend's share."""
    out = []
    keys = [t.key for t in targets]
    rounds = results["rounds"]
    for t in targets:
        st = [r[t.key]["stress"] for r in rounds if t.key in r and "stress" in r[t.key]]
        if not st:
            continue
        ops = [s["ops_s"] for s in st]
        errs = sum(s["errors"] for s in st)
        busy = med([s["machine_busy"] for s in st])
        be = med([s["backend_cpu_per_1000"] for s in st])
        foreign = ", ".join(f"{max(0.0, s['foreign_share']):.0%}" for s in st)
        out.append(f"- {t.label}: stress ops/s per round {', '.join(f'{v:.0f}' for v in ops)}; "
                   f"errors {errs}; machine busy {busy:.0%}; backend Dovecot CPU-s per 1000 ops {be:.3f}; "
                   f"CPU taken by other work on the machine, per round: {foreign}")
    for metric in ("fetch", "append_sync", "multi_sync", "multi_plus", "noop_pinned", "noop"):
        spread = []
        for k in keys:
            vals = [r[k].get(metric) for r in rounds if k in r and r[k].get(metric) is not None]
            if vals:
                spread.append(f"{k} {min(vals):.0f}-{max(vals):.0f}")
        if spread:
            out.append(f"- {metric} range over rounds: " + "; ".join(spread))
    cpu = results.get("append_cpu")
    if cpu:
        out.append("- proxy CPU us per appended message (median): " + "; ".join(
            f"{k} {m}: {v * 1e6:.0f}" for k, d in cpu.items() for m, v in d.items() if v is not None))
    if results.get("auth_http_cpu_per_1000") is not None:
        out.append(f"- nginx's auth_http responder (Python, not counted in nginx's CPU): "
                   f"{results['auth_http_cpu_per_1000']:.3f} CPU-s per 1000 stress ops")
    return "\n".join(out)


def environment_text() -> dict:
    def run(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    debian = "?"
    with_file = Path("/etc/debian_version")
    if with_file.exists():
        debian = with_file.read_text().strip()
    versions = {
        "cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(), "debian": debian,
        "python": platform.python_version(), "dovecot": run("dovecot", "--version"),
        "nginx": run("sh", "-c", "nginx -v 2>&1"),
        "perdition": run("sh", "-c", "dpkg-query -W -f '${Version}' perdition 2>/dev/null"),
    }
    return versions


# ----------------------------------------------------------------------------- main


def build_targets(names: list[str], root: Path, backend: Dovecot, workers: list[int]) -> list[Target]:
    targets: list[Target] = [DirectTarget(backend)]
    for name in names:
        if name == "dovecot-proxy":
            targets.append(DovecotProxyTarget(root, backend))
        elif name == "perdition":
            targets.append(PerditionTarget(root, backend))
        elif name == "nginx":
            targets.append(NginxTarget(root, backend))
        elif name == "referral-proxy":
            if workers:
                targets += [ReferralProxyTarget(root, backend, w) for w in workers]
            else:
                targets.append(ReferralProxyTarget(root, backend))
    return targets


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="rounds, order of targets rotated each (5)")
    ap.add_argument("--targets", default=",".join(PEERS),
                    help=f"peers beside direct, comma-separated subset of {','.join(PEERS)} (all)")
    ap.add_argument("--workers", default="",
                    help="referral-proxy with '[proxy] workers = N', one target per N, e.g. '1,2' "
                         "(default: no workers key, the proxy's default)")
    ap.add_argument("--stress-seconds", type=float, default=20.0, help="measured stress per round and target (20)")
    ap.add_argument("--stress-warmup", type=float, default=2.0, help="unmeasured stress first, each time (2)")
    ap.add_argument("--clients", type=int, default=20, help="stress clients (20)")
    ap.add_argument("--processes", type=int, default=4, help="processes of the load generator (4)")
    ap.add_argument("--users", type=int, default=100, help="stress users user1..userN (100)")
    ap.add_argument("--fetch-messages", type=int, default=500, help="messages of the FETCH mailbox (500)")
    ap.add_argument("--fetch-size", type=int, default=100_000, help="bytes per FETCH message (100000: 50 MB)")
    ap.add_argument("--fetches", type=int, default=3, help="FETCHes per round and target, median (3)")
    ap.add_argument("--append-messages", type=int, default=1000, help="messages per APPEND test (1000)")
    ap.add_argument("--append-size", type=int, default=20480, help="bytes per appended message (20480)")
    ap.add_argument("--noops", type=int, default=2000, help="NOOPs per round, target and placement (2000)")
    ap.add_argument("--memory-sessions", type=int, default=100,
                    help="idle sessions opened twice for the memory figure (100)")
    ap.add_argument("--skip", default="", help="metrics to leave out, comma-separated: stress,fetch,append,"
                                               "noop,memory")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 round, 3 s stress, 200 APPENDs, 200 NOOPs, 20 sessions")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", metavar="FILE", help="also write every number as JSON")
    ap.add_argument("--markdown", metavar="FILE", help="also write the table and notes as markdown")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.rounds, args.stress_seconds, args.stress_warmup = 1, 3.0, 1.0
        args.append_messages, args.noops, args.memory_sessions, args.fetches = 200, 200, 20, 1
    names = [n for n in args.targets.split(",") if n]
    if set(names) - set(PEERS):
        ap.error(f"--targets: unknown {sorted(set(names) - set(PEERS))}; choose from {','.join(PEERS)}")
    skip = {s for s in args.skip.split(",") if s}
    if skip - {"stress", "fetch", "append", "noop", "memory"}:
        ap.error("--skip: a subset of stress,fetch,append,noop,memory")
    try:
        workers = [int(w) for w in args.workers.split(",") if w]
    except ValueError:
        ap.error("--workers: comma-separated integers")
    if args.rounds < 1 or args.append_messages < 1 or args.noops < 1 or args.memory_sessions < 1:
        ap.error("--rounds, --append-messages, --noops, --memory-sessions must be >= 1")

    reason = dovecot_available()
    if reason is not None:
        print(f"bench_peers: cannot run Dovecot here: {reason}", file=sys.stderr)
        return 2
    missing = missing_peers(names)
    if missing:
        for name, why in missing.items():
            print(f"bench_peers: {name}: {why}", file=sys.stderr)
        print("bench_peers: install them, or leave them out with --targets", file=sys.stderr)
        return 2

    install_signal_handlers()
    root = bench_root()
    users = dict(DEFAULT_USERS)
    users.update({f"user{i}": STRESS_PASSWORD for i in range(1, args.users + 1)})
    backend = Dovecot("bench-backend", BACKEND_HOST, root / "backend", users=users)
    targets: list[Target] = []
    ok = interrupted = False
    try:
        log(f"root {root} ({'tmpfs' if str(root).startswith('/dev/shm') else 'NOT tmpfs'})")
        backend.start()
        targets = build_targets(names, root, backend, workers)
        for t in targets:
            log(f"starting {t.label} on {t.host}:{t.port}")
            t.start()
        results = run_rounds(args, backend, targets, skip)
        ok = True
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if not ok and not interrupted:
            for t in targets:
                tail = t.log_text()[-1500:]
                if tail.strip():
                    log(f"{t.label} log (tail):\n{tail}")
        stop_all(reversed(targets))
        try:
            backend.stop()
        except Exception as e:
            log(f"stopping the backend: {e!r}")
        if args.keep or (not ok and not interrupted):
            if not args.keep:  # a failure: the logs and configurations for a post-mortem, not the mail
                shutil.rmtree(root / "backend" / "mail", ignore_errors=True)
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    params = results["params"]
    summary = summarize(results, [t.key for t in targets])
    results["summary"] = summary
    table = markdown_table(summary, targets, params)
    text = (table + "\n\n" + notes(results, targets) + "\n\n"
            + f"{params['rounds']} rounds (target order rotated each round), medians; stress: "
              f"{args.clients} clients, {args.users} users, {args.stress_seconds:g} s per round and target; "
              f"appends of {args.append_size} bytes; maildirs {'on tmpfs' if params['tmpfs'] else 'on disk'}.\n"
            + "machine: " + ", ".join(f"{k} {v}" for k, v in results["environment"].items()))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


def run_rounds(args, backend: Dovecot, targets: list[Target], skip: set[str]) -> dict:
    all_cpus = set(range(os.cpu_count() or 1))
    results: dict = {
        "params": {**{k: v for k, v in vars(args).items()}, "tmpfs": str(backend.root).startswith("/dev/shm"),
                   "targets": [t.key for t in targets], "append_messages": args.append_messages},
        "environment": environment_text(),
        "rounds": [],
        "memory": {},
    }
    # memory first, on fresh processes
    if "memory" not in skip:
        for t in targets:
            v = measure_memory(t, backend, args.memory_sessions)
            results["memory"][t.key] = v
            log(f"memory {t.label}: {'-' if v is None else f'{v / 1024:.1f} KB'} per session")

    fetch_bytes = 0
    if "fetch" not in skip:
        fetch_bytes = seed_fetch(backend, args.fetch_messages, args.fetch_size)
        log(f"seeded {FETCH_BOX}: {args.fetch_messages} messages, {fetch_bytes / 1e6:.1f} MB")
    results["params"]["fetch_bytes"] = fetch_bytes or args.fetch_messages * args.fetch_size

    rng = random.Random(20240101)
    messages = [make_message(i, args.append_size, rng) for i in range(1, args.append_messages + 1)]
    messages_crlf = [m + b"\r\n" for m in messages]
    control = Control(backend.host, backend.port, "control")
    control.login(USER, backend.password(USER))
    clients: dict[str, PeerClient] = {}
    for t in targets:
        c = clients[t.key] = PeerClient(t.host, t.port, t.key)
        c.login(USER, backend.password(USER))
        if "fetch" not in skip:
            n = c.examine(FETCH_BOX)
            if n != args.fetch_messages:
                raise ProtocolError(f"{t.key}: {FETCH_BOX} has {n} messages, expected {args.fetch_messages}")

    if "stress" not in skip:
        log("stress warm-up (fills the users' mailboxes) on direct")
        measure_stress(targets[0], backend, argparse.Namespace(**{**vars(args), "stress_seconds": 5.0}))

    append_cpu: dict[str, dict[str, list]] = {}
    try:
        for r in range(args.rounds):
            k = r % len(targets)
            order = targets[k:] + targets[:k]
            log(f"round {r + 1}/{args.rounds}: {', '.join(t.key for t in order)}")
            rec: dict[str, dict] = {t.key: {} for t in targets}
            if "stress" not in skip:
                for t in order:
                    rec[t.key]["stress"] = measure_stress(t, backend, args)
            if "fetch" not in skip:
                gc.collect()
                gc.disable()
                try:
                    for t in order:
                        runs = []
                        for _ in range(args.fetches):
                            ns, _total, lit_bytes, lits = clients[t.key].fetch_all()
                            if lits != args.fetch_messages or lit_bytes != fetch_bytes:
                                raise ProtocolError(f"{t.key}: FETCH gave {lits} literals / {lit_bytes} bytes")
                            runs.append(lit_bytes / (ns / 1e9) / 1e6)
                        rec[t.key]["fetch"] = statistics.median(runs)
                finally:
                    gc.enable()
                log("  fetch MB/s: " + ", ".join(f"{t.key} {rec[t.key]['fetch']:.0f}" for t in order))
            if "append" not in skip:
                for mode in ("append_sync", "multi_sync", "multi_plus"):
                    for t in order:
                        rate, cpu = measure_append(mode, clients[t.key], control, messages, messages_crlf,
                                                   t.cpu_root)
                        rec[t.key][mode] = rate
                        if cpu is not None:
                            append_cpu.setdefault(t.key, {}).setdefault(mode, []).append(cpu / len(messages))
                    log(f"  {mode} msg/s: " + ", ".join(f"{t.key} {rec[t.key][mode]:.0f}" for t in order))
            if "noop" not in skip:
                roots = [os.getpid()] + ([backend.pid] if backend.pid else [])
                for t in targets:
                    roots += t.roots()
                noop_clients = [clients[t.key] for t in order]
                try:
                    set_affinity(roots, {min(all_cpus)})
                    for t, v in zip(order, measure_noop(noop_clients, args.noops)):
                        rec[t.key]["noop_pinned"] = v
                finally:
                    set_affinity(roots, all_cpus)
                for t, v in zip(order, measure_noop(noop_clients, args.noops)):
                    rec[t.key]["noop"] = v
                log("  NOOP us pinned/unpinned: " + ", ".join(
                    f"{t.key} {rec[t.key]['noop_pinned']:.0f}/{rec[t.key]['noop']:.0f}" for t in order))
            results["rounds"].append(rec)
    finally:
        for c in clients.values():
            c.close()
        control.close()
    results["append_cpu"] = {k: {m: med(v) for m, v in d.items()} for k, d in append_cpu.items()}
    nginx = next((t for t in targets if isinstance(t, NginxTarget)), None)
    if nginx is not None and nginx.auth.pid and "stress" not in skip:
        # the responder's CPU over the whole run, against every nginx stress op
        total_ops = sum(r["nginx"]["stress"]["ops"] for r in results["rounds"])
        cpu = tree_cpu_seconds(nginx.auth.pid)
        results["auth_http_cpu_per_1000"] = cpu / total_ops * 1000 if total_ops and cpu is not None else None
    return results



if __name__ == "__main__":
    sys.exit(run_cli("bench_peers", main))
