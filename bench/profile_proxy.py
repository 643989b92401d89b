#!/usr/bin/env python3
"""Where a relayed command's time goes in referral-proxy: py-spy and strace under load.

Starts one backend Dovecot (maildirs on tmpfs when /dev/shm exists) and the proxy in
front of it (bench/peers.py), then for each workload:

* ``noop``: 10 connections (one process each) sending NOOPs back to back;
* ``stress``: bench/loadgen.py's imaptest-like mix (100 users, 20 clients);

1. unprofiled: ops/s and the proxy's CPU microseconds per op, user and system (/proc);
2. ``strace -c -f`` on the proxy's whole tree: system calls per op, by name (epoll_ctl,
   setsockopt, recvfrom, sendto, epoll_wait...) -- exact counts;
   1 and 2 also for each peer of ``--compare`` (Dovecot proxy, Perdition, nginx mail,
   those installed), the same load: what the C proxies spend on the same command;
3. ``py-spy record --idle --native`` on the proxy: every sample's stack, written as
   ``<workload>.collapsed.txt`` (Brendan Gregg's format: flamegraph.pl or speedscope
   open it) and ``<workload>.speedscope.json`` (https://www.speedscope.app), and
   summarized as the top-20 functions by self time, the top-20 by inclusive time and
   named categories (waiting in epoll, socket calls, epoll register/unregister,
   TCP_QUICKACK, logging, the codec, the session...), in percent of all samples
   (idle included) and of busy samples.

Everything goes to ``--out`` (default ``bench/profiles/``), a summary to stdout
and ``<out>/summary.md``.  Needs root, Dovecot, ``pip install py-spy`` and strace
(``apt-get install strace``); without strace that step is skipped.

    python bench/profile_proxy.py                     # both workloads, 12 s each
    python bench/profile_proxy.py --workloads noop --seconds 5 --out /tmp/prof
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import USER, dovecot_available, install_signal_handlers, log, run_cli  # noqa: E402
from bench_peers import STRESS_PASSWORD, bench_root  # noqa: E402
from loadgen import LoadConfig, numbered_users, run_load  # noqa: E402
from peers import (  # noqa: E402
    DovecotProxyTarget,
    NginxTarget,
    PerditionTarget,
    ReferralProxyTarget,
    Target,
    descendants,
    missing_peers,
    stop_all,
    tree_cpu_user_system,
)

PEERS = {"dovecot-proxy": DovecotProxyTarget, "perdition": PerditionTarget, "nginx": NginxTarget}

from referral_proxy.fleet import DEFAULT_USERS, Dovecot  # noqa: E402

# category -> regex on one frame. A sample belongs to the category of its innermost
# frame that matches one (frames matching none, e.g. the interpreter's own, are skipped).
CATEGORIES = [
    ("waiting in epoll (idle)", r"^epoll_wait "),
    ("epoll register/unregister (startWriting/stopWriting)",
     r"^epoll_ctl |select_epoll_(register|unregister|modify)|\.(startWriting|stopWriting|startReading|"
     r"stopReading) |\._(add|remove) \(twisted/internet/epollreactor"),
    ("TCP_QUICKACK / setsockopt", r"setsockopt"),
    ("socket send (system call)", r"^(send|sendto|sendmsg|__send|__libc_send) "),
    ("socket recv (system call)", r"^(recv|recvfrom|recvmsg|__libc_recv) "),
    ("garbage collector", r"^gc_collect|^gc_"),
    ("dataclass construction", r"^__create_fn__"),
    ("logging", r"twisted/logger/|/logging/"),
    ("codec: framing", r"referral_proxy/imap/framing"),
    ("codec: command/response parsing", r"referral_proxy/imap/"),
    ("proxy: flow control / output", r"referral_proxy/flow"),
    ("proxy: backend connection", r"referral_proxy/backend"),
    ("proxy: session", r"referral_proxy/session"),
    ("proxy: fast path (fastpath.py)", r"referral_proxy/fastpath"),
    ("proxy: relay (relay.py)", r"referral_proxy/relay"),
    ("proxy: observer (observe.py)", r"referral_proxy/observe"),
    ("proxy: end-of-pass writes (netio.py)", r"referral_proxy/netio"),
    ("proxy: other modules", r"referral_proxy/"),
    ("Twisted: tcp transport (doRead/doWrite/write)", r"twisted/internet/(tcp|abstract)\.py"),
    ("Twisted: reactor loop, dispatch, context", r"twisted/"),
]
_COMPILED = [(name, re.compile(rx)) for name, rx in CATEGORIES]
# a sample whose innermost frame is a system call wrapper: kernel time, or waiting for the
# CPU (loopback send() wakes the peer, which may take the CPU): not Python's user time
_SYSCALL_LEAF = re.compile(r"^(send|sendto|sendmsg|recv|recvfrom|recvmsg|epoll_wait|epoll_ctl|setsockopt|"
                           r"getsockopt|connect|shutdown|close|accept4?|read|write|ioctl|fcntl|__\w+) \(libc")


def category(names: list[str]) -> str:
    """The category of a sample: that of its innermost frame that has one."""
    for frame in reversed(names):
        for name, rx in _COMPILED:
            if rx.search(frame):
                return name
    return "other"


_FRAME_FILE = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]+)(?::\d+)?\)$")


# ----------------------------------------------------------------------------- load


def _noop_worker(host: str, port: int, password: str, t_end: float, conn) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = socket.create_connection((host, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    f = s.makefile("rb")
    f.readline()
    s.sendall(b'a LOGIN %s "%s"\r\n' % (USER.encode(), password.encode()))
    while not f.readline().startswith(b"a "):
        pass
    n = 0
    while time.monotonic() < t_end:
        s.sendall(b"n NOOP\r\n")
        while not f.readline().startswith(b"n "):
            pass
        n += 1
    with contextlib.suppress(OSError):
        s.sendall(b"z LOGOUT\r\n")
    s.close()
    conn.send(n)


def noop_load(host: str, port: int, password: str, seconds: float, connections: int) -> int:
    """NOOPs done by *connections* processes in *seconds*."""
    ctx = multiprocessing.get_context("fork")
    t_end = time.monotonic() + seconds
    pipes, procs = [], []
    for _ in range(connections):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_noop_worker, args=(host, port, password, t_end, w), daemon=True)
        p.start()
        w.close()
        pipes.append(r)
        procs.append(p)
    total = 0
    try:
        for r in pipes:
            if r.poll(seconds + 30):
                total += r.recv()
    finally:
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.terminate()
    return total


def run_workload(name: str, proxy: Target, backend: Dovecot, seconds: float) -> int:
    """Run workload *name* against the proxy for about *seconds*; the ops done."""
    if name == "noop":
        return noop_load(proxy.host, proxy.port, backend.password(USER), seconds, 10)
    cfg = LoadConfig(host=proxy.host, port=proxy.port, users=numbered_users("user%d", 100, STRESS_PASSWORD),
                     clients=20, processes=4, seconds=seconds, intervals=1, warmup=0.5)
    return run_load(cfg).interval_ops[0]


# ----------------------------------------------------------------------------- analysis


def read_collapsed(path: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            out.append((stack.split(";"), int(count)))
    return out


def short(frame: str) -> str:
    """'doRead (/usr/lib/python3/dist-packages/twisted/internet/tcp.py:250)' ->
    'doRead (twisted/internet/tcp.py)'."""
    m = _FRAME_FILE.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "dist-packages/", "/lib/python3.11/", "/work/"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    file = re.sub(r"^wt/[^/]+/|^main/", "", file)
    return f"{m.group('func')} ({file})"


def analyse(stacks: list[tuple[list[str], int]]) -> dict:
    total = sum(n for _, n in stacks)
    self_time: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    cats: Counter[str] = Counter()
    user_cats: Counter[str] = Counter()  # samples in user space only (leaf not a system call)
    for frames, n in stacks:
        names = [short(f) for f in frames[1:]]  # frames[0] is the process
        if not names:
            continue
        self_time[names[-1]] += n
        for f in set(names):
            incl[f] += n
        cat = category(names)
        cats[cat] += n
        if not _SYSCALL_LEAF.match(names[-1]):
            user_cats[cat] += n
    idle = cats.get(CATEGORIES[0][0], 0)
    return {"samples": total, "idle_samples": idle, "self": self_time.most_common(20),
            "inclusive": incl.most_common(20), "categories": cats.most_common(),
            "user_categories": user_cats.most_common()}


def to_speedscope(stacks: list[tuple[list[str], int]], name: str) -> dict:
    frames: dict[str, int] = {}
    samples, weights = [], []
    for fr, n in stacks:
        samples.append([frames.setdefault(short(f), len(frames)) for f in fr[1:]])
        weights.append(n)
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "shared": {"frames": [{"name": f} for f in frames]},
        "profiles": [{"type": "sampled", "name": name, "unit": "none", "startValue": 0,
                      "endValue": sum(weights), "samples": samples, "weights": weights}],
        "name": name, "exporter": "bench/profile_proxy.py",
    }


def strace_counts(pid: int, load, out: Path) -> dict | None:
    """Run *load()* while ``strace -c -f`` watches *pid*'s whole tree; {"ops", "calls": {syscall: n}}."""
    if shutil.which("strace") is None:
        log("strace is not installed (apt-get install -y strace): no system call counts")
        return None
    attach = [a for p in descendants(pid) for a in ("-p", str(p))]
    p = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), *attach],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.5)
        ops = load()
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    calls: dict[str, int] = {}
    for line in out.read_text(errors="replace").splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "", 1).isdigit() and parts[-1] != "total":
            with contextlib.suppress(ValueError):
                calls[parts[-1]] = int(parts[3])
    return {"ops": ops, "calls": calls}


def py_spy(pid: int, seconds: float, rate: int, load, out: Path) -> int:
    """Run *load()* while py-spy records *pid* into *out* (collapsed stacks); the ops."""
    exe = shutil.which("py-spy")
    if exe is None:
        raise RuntimeError("py-spy is not installed: pip install py-spy")
    argv = [exe, "record", "--pid", str(pid), "--rate", str(rate), "--duration", str(int(seconds + 2)),
            "--format", "raw", "--idle", "--native", "--subprocesses", "-o", str(out)]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(1.0)
        ops = load()
        _, err = p.communicate(timeout=seconds + 60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    if p.returncode != 0 or not out.exists():
        raise RuntimeError(f"py-spy failed ({p.returncode}): {err.decode(errors='replace')[-2000:]}")
    return ops


# ----------------------------------------------------------------------------- report


def measure_base(name: str, t: Target, backend: Dovecot, seconds: float) -> dict:
    """Unprofiled: ops, ops/s and the target tree's user/system CPU per op."""
    pid = t.cpu_root
    assert pid is not None
    (u0, s0), t0 = tree_cpu_user_system(pid), time.monotonic()
    ops = run_workload(name, t, backend, seconds)
    (u1, s1), t1 = tree_cpu_user_system(pid), time.monotonic()
    n = max(ops, 1)
    return {"ops": ops, "seconds": t1 - t0, "ops_s": ops / seconds, "cpu_us_per_op": (u1 - u0 + s1 - s0) / n * 1e6,
            "user_us_per_op": (u1 - u0) / n * 1e6, "system_us_per_op": (s1 - s0) / n * 1e6}


def comparison(name: str, rows: list[tuple[str, dict, dict | None]]) -> str:
    """One line per target: ops/s, CPU per op split user/system, system calls per op."""
    lines = [f"## {name}: every proxy, unprofiled", "",
             "| target | ops/s | CPU us/op | user | system | system calls per op (strace -c -f) |",
             "|---|---|---|---|---|---|"]
    for label, base, sc in rows:
        calls = ""
        if sc:
            ops = sc["ops"] or 1
            top = sorted(sc["calls"].items(), key=lambda kv: -kv[1])[:7]
            calls = f"{sum(sc['calls'].values()) / ops:.1f}: " + ", ".join(f"{k} {v / ops:.2f}" for k, v in top)
        lines.append(f"| {label} | {base['ops_s']:.0f} | {base['cpu_us_per_op']:.1f} | "
                     f"{base['user_us_per_op']:.1f} | {base['system_us_per_op']:.1f} | {calls} |")
    return "\n".join(lines)


def report(name: str, base: dict, prof: dict) -> str:
    lines = [f"## {name}: referral-proxy under py-spy", ""]
    lines.append(f"Unprofiled: {base['ops_s']:.0f} ops/s, proxy CPU {base['cpu_us_per_op']:.1f} us per op "
                 f"(user {base['user_us_per_op']:.1f}, system {base['system_us_per_op']:.1f}).")
    total, idle = prof["samples"], prof["idle_samples"]
    busy = max(1, total - idle)
    lines += ["", f"py-spy: {total} samples, {idle / total:.0%} idle (waiting in epoll). "
              f"Percent of all samples / of busy samples:", ""]
    lines += ["| category | all | busy |", "|---|---|---|"]
    for cat, n in prof["categories"]:
        b = "" if cat.startswith("waiting") else f"{n / busy:.1%}"
        lines.append(f"| {cat} | {n / total:.1%} | {b} |")
    user = prof.get("user_categories") or []
    nuser = sum(n for _, n in user) or 1
    lines += ["", f"User-space samples only (innermost frame not a system call; {nuser} samples), "
              f"apportioning the unprofiled user CPU of {base['user_us_per_op']:.1f} us per op:", "",
              "| category | share | us per op |", "|---|---|---|"]
    for cat, n in user:
        lines.append(f"| {cat} | {n / nuser:.1%} | {n / nuser * base['user_us_per_op']:.1f} |")
    lines += ["", "Top 20 by self time:", "", "| function | all | busy |", "|---|---|---|"]
    for f, n in prof["self"]:
        b = "-" if f.startswith("epoll_wait ") else f"{n / busy:.1%}"
        lines.append(f"| `{f}` | {n / total:.1%} | {b} |")
    lines += ["", "Top 20 by inclusive time:", "", "| function | all |", "|---|---|"]
    for f, n in prof["inclusive"]:
        lines.append(f"| `{f}` | {n / total:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="noop,stress", help="noop,stress (both)")
    ap.add_argument("--seconds", type=float, default=12.0, help="seconds of each phase (12)")
    ap.add_argument("--rate", type=int, default=250, help="py-spy samples per second (250)")
    ap.add_argument("--no-strace", action="store_true", help="skip the system call counts")
    ap.add_argument("--compare", default="dovecot-proxy,perdition,nginx",
                    help="peers measured the same way, unprofiled + strace (installed ones of "
                         "dovecot-proxy,perdition,nginx; '' = none)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "profiles"),
                    help="directory for the profiles and summary.md (bench/profiles)")
    args = ap.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    if set(workloads) - {"noop", "stress"} or not workloads:
        ap.error("--workloads: noop, stress or both")
    reason = dovecot_available()
    if reason is not None:
        print(f"profile_proxy: cannot run Dovecot here: {reason}", file=sys.stderr)
        return 2
    if shutil.which("py-spy") is None:
        print("profile_proxy: py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    install_signal_handlers()
    root = bench_root()
    users = dict(DEFAULT_USERS)
    users.update({f"user{i}": STRESS_PASSWORD for i in range(1, 101)})
    backend = Dovecot("prof-backend", "127.0.0.2", root / "backend", users=users)
    compare = [c for c in args.compare.split(",") if c]
    if set(compare) - set(PEERS):
        ap.error(f"--compare: a subset of {','.join(PEERS)}")
    for name, why in missing_peers(compare).items():
        log(f"not compared: {name}: {why}")
        compare.remove(name)
    targets: list[Target] = []
    sections = []
    try:
        backend.start()
        proxy = ReferralProxyTarget(root, backend)
        targets = [proxy] + [PEERS[c](root, backend) for c in compare]
        for t in targets:
            t.start()
        run_workload("stress", proxy, backend, 3.0)  # fill the mailboxes, warm up
        for name in workloads:
            rows = []
            for t in targets:
                log(f"{name}: {t.label} unprofiled")
                base = measure_base(name, t, backend, args.seconds)
                sys_counts = None
                if not args.no_strace:
                    log(f"{name}: {t.label} strace")
                    sys_counts = strace_counts(t.cpu_root, lambda n=name, t=t: run_workload(n, t, backend, args.seconds),
                                               out / f"{name}.{t.key}.strace.txt")
                rows.append((t.label, base, sys_counts))
            sections.append(comparison(name, rows))
            log(f"{name}: py-spy")
            raw = out / f"{name}.collapsed.txt"
            py_spy(proxy.cpu_root, args.seconds, args.rate,
                   lambda n=name: run_workload(n, proxy, backend, args.seconds), raw)
            stacks = read_collapsed(raw)
            (out / f"{name}.speedscope.json").write_text(json.dumps(to_speedscope(stacks, f"referral-proxy {name}")))
            prof = analyse(stacks)
            (out / f"{name}.json").write_text(json.dumps({"targets": rows, "py_spy": prof}, indent=2))
            sections.append(report(name, rows[0][1], prof))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_all(targets)
        backend.stop()
        shutil.rmtree(root, ignore_errors=True)
    text = "\n\n".join(sections)
    (out / "summary.md").write_text(text + "\n")
    print(text)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("profile_proxy", main))
