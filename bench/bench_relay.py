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
``dovecot`` binary (see referral_proxy/testing/dovecot.py).  See bench/README.md.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from referral_proxy.testing.dovecot import (  # noqa: E402
    Dovecot,
    dovecot_available,
    free_port,
    make_root,
)

BACKEND_HOST = "127.0.0.2"
PROXY_HOST = "127.0.0.1"
USER = "alice"
MAILBOX = "Bench"
PROXY_START_TIMEOUT = 20.0
IO_TIMEOUT = 60.0

_ANNOUNCE = re.compile(rb"~?\{([0-9]+)\+?\}\r?\n\Z")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- raw client


class ProtocolError(RuntimeError):
    pass


class RawIMAP:
    """A minimal blocking IMAP client on a raw socket: just enough for the benchmark."""

    def __init__(self, host: str, port: int, label: str) -> None:
        self.label = label
        self.sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        # Both sides of the comparison use the same client settings; the client
        # only ever sends one small write per command, so this mostly documents intent.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.recv_buf = bytearray(1 << 20)
        self.recv_view = memoryview(self.recv_buf)
        self.n = 0
        greeting = self._line()
        if not greeting.startswith(b"* OK"):
            raise ProtocolError(f"{label}: unexpected greeting {greeting!r}")

    def close(self) -> None:
        try:
            self.sock.sendall(b"zz LOGOUT\r\n")
        except OSError:
            pass
        self.sock.close()

    def _fill(self) -> None:
        k = self.sock.recv_into(self.recv_buf)
        if not k:
            raise ProtocolError(f"{self.label}: connection closed by the server")
        self.buf += self.recv_view[:k]

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            self._fill()

    def next_tag(self) -> bytes:
        self.n += 1
        return b"t%d" % self.n

    def command(self, text: bytes) -> tuple[bytes, list[bytes]]:
        """Send a command without literals; (tagged line, untagged lines). Literals in
        the answer are skipped.  Raises unless the answer is OK."""
        tag = self.next_tag()
        self.sock.sendall(tag + b" " + text + b"\r\n")
        untagged: list[bytes] = []
        while True:
            line = self._line()
            m = _ANNOUNCE.search(line)
            if m:
                need = int(m.group(1))
                while len(self.buf) < need:
                    self._fill()
                del self.buf[:need]
            if line.startswith(tag + b" "):
                if not line.startswith(tag + b" OK"):
                    raise ProtocolError(f"{self.label}: {text[:40]!r} failed: {line!r}")
                return line, untagged
            untagged.append(line)

    def login_examine(self, user: str, password: str, mailbox: str) -> int:
        self.command(b"LOGIN %s %s" % (quote(user), quote(password)))
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

    def fetch_all(self) -> tuple[int, int, int, int]:
        """``UID FETCH 1:* BODY.PEEK[]``: (ns, bytes on the wire, literal bytes, literals).

        Reads with recv_into a 1 MiB buffer; lines are only looked at for a literal
        announcement (whose bytes are then skipped uncopied) or the tag.
        """
        if self.buf:
            raise ProtocolError(f"{self.label}: unexpected pending data {bytes(self.buf[:80])!r}")
        tag = self.next_tag()
        prefix = tag + b" "
        sock = self.sock
        rbuf = self.recv_buf
        view = self.recv_view
        total = literal_bytes = literals = 0
        skip = 0
        partial = b""
        t0 = time.perf_counter_ns()
        sock.sendall(tag + b" UID FETCH 1:* BODY.PEEK[]\r\n")
        while True:
            n = sock.recv_into(rbuf)
            if not n:
                raise ProtocolError(f"{self.label}: connection closed during FETCH")
            total += n
            pos = 0
            while pos < n:
                if skip:
                    take = skip if skip < n - pos else n - pos
                    skip -= take
                    pos += take
                    continue
                i = rbuf.find(b"\n", pos, n)
                if i < 0:
                    partial += view[pos:n]
                    break
                line = partial + view[pos : i + 1] if partial else bytes(view[pos : i + 1])
                partial = b""
                pos = i + 1
                if line.endswith(b"}\r\n"):
                    m = _ANNOUNCE.search(line)
                    if m:
                        skip = int(m.group(1))
                        literal_bytes += skip
                        literals += 1
                        continue
                if line.startswith(prefix):
                    t1 = time.perf_counter_ns()
                    if not line.startswith(prefix + b"OK"):
                        raise ProtocolError(f"{self.label}: FETCH failed: {line!r}")
                    if pos != n:
                        raise ProtocolError(f"{self.label}: {n - pos} bytes after the tagged reply")
                    return t1 - t0, total, literal_bytes, literals


def quote(s: str) -> bytes:
    return b'"' + s.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# ----------------------------------------------------------------------------- seeding


def make_message(i: int, size: int, rng: random.Random) -> bytes:
    """A valid RFC 5322 message of exactly *size* bytes (if size allows): fixed
    headers and a 7bit text body of pseudo-random base64-alphabet lines."""
    headers = (
        f"Date: Mon, 01 Jan 2024 00:{i // 60 % 60:02d}:{i % 60:02d} +0000\r\n"
        f"From: Bench Sender <sender@bench.example>\r\n"
        f"To: Alice <alice@bench.example>\r\n"
        f"Subject: bench message {i}\r\n"
        f"Message-ID: <bench-{i}@bench.example>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"Content-Transfer-Encoding: 7bit\r\n"
        f"\r\n"
    ).encode()
    body_len = max(0, size - len(headers))
    n_lines = body_len // 78 + 1
    text = base64.b64encode(rng.randbytes(n_lines * 57))  # 76 chars per 57 bytes
    lines = [text[k : k + 76] + b"\r\n" for k in range(0, len(text), 76)]
    body = b"".join(lines)[:body_len]
    if body_len >= 2:
        body = body[:-2] + b"\r\n"  # end on a line break
    return headers + body


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


# ----------------------------------------------------------------------------- proxy


def _pdeathsig() -> None:  # in the child: die with the benchmark
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass


class ProxyProcess:
    def __init__(self, workdir: Path, backend: Dovecot) -> None:
        self.workdir = workdir
        self.port = free_port(PROXY_HOST)
        self.config_path = workdir / "proxy.toml"
        self.stderr_path = workdir / "proxy.stderr"
        self.config_path.write_text(
            "[proxy]\n"
            f'listen = ["tcp:{self.port}:interface={PROXY_HOST}"]\n'
            'hostname = "bench-proxy"\n'
            "allow_plaintext_login = true\n"
            "\n"
            "[backends.b1]\n"
            f'endpoint = "{backend.endpoint}"\n'
            f'url = "{backend.url}"\n'
            'tls = "none"\n'
            "\n"
            "[map]\n"
            'default = "b1"\n'
        )
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        with open(self.stderr_path, "ab") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "referral_proxy", "--config", str(self.config_path)],
                cwd=self.workdir, env=env, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                preexec_fn=_pdeathsig,
            )
        self._wait_greeting()

    def _wait_greeting(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + PROXY_START_TIMEOUT
        last: object = None
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the proxy exited with status {self.process.returncode} during "
                                   f"start-up\n--- stderr ---\n{self.stderr_text()[-4000:]}")
            try:
                with socket.create_connection((PROXY_HOST, self.port), timeout=2.0) as s:
                    data = b""
                    while b"\n" not in data:
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                if data.startswith(b"* OK"):
                    return
                last = data
            except OSError as e:
                last = e
            if time.monotonic() > deadline:
                raise RuntimeError(f"the proxy did not greet within {PROXY_START_TIMEOUT}s "
                                   f"(last: {last!r})\n--- stderr ---\n{self.stderr_text()[-4000:]}")
            time.sleep(0.05)

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> int | None:
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode


# ----------------------------------------------------------------------------- statistics


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


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
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 or i == 4 else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    lines = [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)]
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

    pin: set[int] | None = None
    if args.pin:
        try:
            pin = {int(c) for c in args.pin.split(",")}
            os.sched_setaffinity(0, pin)  # before anything is started: children inherit it
        except (ValueError, OSError) as e:
            ap.error(f"--pin {args.pin!r}: {e}")

    reason = dovecot_available()
    if reason is not None:
        print(f"bench_relay: cannot run Dovecot here: {reason}", file=sys.stderr)
        return 2

    # SIGTERM/SIGHUP: unwind through the finally below like Ctrl-C does.
    def _terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)

    t_start = time.monotonic()
    root = make_root("rp-bench-")
    dovecot: Dovecot | None = None
    proxy: ProxyProcess | None = None
    clients: dict[str, RawIMAP] = {}
    failed = True
    interrupted = False
    try:
        dovecot = Dovecot("bench", BACKEND_HOST, root / "b1")
        log(f"starting Dovecot on {BACKEND_HOST}:{dovecot.port} (root {root})")
        dovecot.start()
        proxy_dir = root / "proxy"
        proxy_dir.mkdir()
        proxy = ProxyProcess(proxy_dir, dovecot)
        log(f"starting the proxy on {PROXY_HOST}:{proxy.port}")
        proxy.start()

        t0 = time.monotonic()
        seeded = seed(dovecot, args.messages, args.size)
        log(f"seeded {args.messages} messages, {seeded / 1e6:.1f} MB in {time.monotonic() - t0:.1f}s")

        password = dovecot.password(USER)
        clients["direct"] = RawIMAP(dovecot.host, dovecot.port, "direct")
        clients["proxy"] = RawIMAP(PROXY_HOST, proxy.port, "proxy")
        for name, c in clients.items():
            exists = c.login_examine(USER, password, MAILBOX)
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
            "environment": {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "dovecot": subprocess.run(["dovecot", "--version"], capture_output=True,
                                          text=True).stdout.strip(),
            },
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

        for c in clients.values():
            c.close()
        clients.clear()

        err = proxy.stderr_text()
        suspicious = [l for l in err.splitlines()
                      if "Traceback" in l or "[-] Unhandled" in l or "CRITICAL" in l or "error" in l.lower()]
        results["proxy_log_suspicious_lines"] = suspicious[:20]

        print(table(results))
        if suspicious:
            print(f"\nwarning: {len(suspicious)} suspicious line(s) in the proxy's log, e.g.: {suspicious[0]}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
            log(f"wrote {args.json}")
        failed = False
        return 0
    except KeyboardInterrupt:
        interrupted = True
        raise
    finally:
        # Cleanup must not be cut short by a second signal (it takes ~1 s).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for c in clients.values():
            try:
                c.sock.close()
            except OSError:
                pass
        if proxy is not None:
            status = proxy.stop()
            if failed:
                tail = proxy.stderr_text()[-3000:]
                if tail:
                    log(f"proxy stderr (tail):\n{tail}")
            if status not in (0, None, -signal.SIGTERM):
                log(f"the proxy exited with status {status}")
        if dovecot is not None:
            try:
                dovecot.stop()
            except Exception as e:
                log(f"stopping Dovecot: {e!r}")
        if args.keep:
            log(f"kept {root}")
        elif failed and not interrupted:
            # keep the logs and configuration for a post-mortem, not the 20 MB of mail
            shutil.rmtree(root / "b1" / "mail", ignore_errors=True)
            log(f"kept {root} (logs: b1/dovecot.log, proxy/proxy.stderr)")
        else:
            shutil.rmtree(root, ignore_errors=True)
        log(f"total {time.monotonic() - t_start:.1f}s")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"bench_relay: interrupted ({e or 'SIGINT'})", file=sys.stderr)
        sys.exit(130)
    except (ProtocolError, RuntimeError, OSError) as e:
        # the proxy's / Dovecot's log tails were printed above
        print(f"bench_relay: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
