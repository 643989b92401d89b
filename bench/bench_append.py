#!/usr/bin/env python3
"""APPEND throughput of referral-proxy: direct Dovecot vs. through the proxy, in one run.

Starts one real Dovecot (127.0.0.2) and the proxy (``python -m referral_proxy`` on
127.0.0.1) in front of it, then appends the same N messages to alice's mailbox
"Bench" three ways, on each target, alternating the targets so they share the
machine's noise:

* (a) ONE MULTIAPPEND command (RFC 3502) carrying all N messages as
  non-synchronizing literals: ``tag APPEND Bench {n+}\\r\\n<msg> {n+}\\r\\n<msg> ... \\r\\n``;
* (b) N separate APPEND commands, pipelined with LITERAL+ (as mbsync does): all
  sent without waiting, the N tagged replies read as they come;
* (c) N separate APPEND commands with synchronizing literals, one after the other:
  send the command, wait for "+", send the message, wait for the tagged reply
  (a naive client, e.g. imaplib).

Raw sockets, every command built before the clock starts.  Before every run the
mailbox is deleted and created again directly on Dovecot; after it, the tagged
replies must be OK with the expected APPENDUIDs ((a): ``OK [APPENDUID v 1:N]``,
(b)/(c): ``OK [APPENDUID v i]`` for the i-th) and ``STATUS Bench (MESSAGES)`` on
Dovecot must say N.  Prints best and median messages/s and MB/s (message bytes,
1 MB = 10**6 bytes), the ratio proxy/direct of each test (< 1 = the proxy is
slower) and the ratio (a)/(b) on each target.  See bench/README.md.
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import re
import selectors
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    IO_TIMEOUT,
    USER,
    Dovecot,
    Harness,
    ProtocolError,
    RawIMAP,
    apply_pin,
    cpu_seconds,
    dovecot_available,
    environment,
    install_signal_handlers,
    log,
    make_message,
    render_table,
    report,
    run_cli,
)

MAILBOX = b"Bench"
TARGETS = ("direct", "proxy")
MODES = {
    "a": "(a) 1 MULTIAPPEND, LITERAL+",
    "b": "(b) APPENDs pipelined, LITERAL+",
    "c": "(c) APPENDs, sync literals",
    "d": "(d) sync literals, 2 writes, Nagle on",
    "e": "(e) 1 MULTIAPPEND, sync literals",
}
DEFAULT_BUDGET = 170.0  # seconds for the whole run; repeats are cut to fit

_APPENDUID = re.compile(rb"^(t\d+) OK \[APPENDUID (\d+) ([0-9:,]+)\]")


# ----------------------------------------------------------------------------- client


class AppendClient(RawIMAP):
    """The shared raw client (bench/_common.py) plus the three ways of appending.
    Each returns (nanoseconds, tagged replies, bytes sent)."""

    def multiappend(self, messages: list[bytes]) -> tuple[int, list[bytes], int]:
        tag = self.next_tag()
        parts = [tag, b" APPEND ", MAILBOX]
        for msg in messages:
            parts += (b" {%d+}\r\n" % len(msg), msg)
        parts.append(b"\r\n")
        payload = b"".join(parts)
        ns, replies = self._exchange(payload, [tag])
        return ns, replies, len(payload)

    def pipelined(self, messages: list[bytes]) -> tuple[int, list[bytes], int]:
        tags = []
        parts = []
        for msg in messages:
            tag = self.next_tag()
            tags.append(tag)
            parts += (tag, b" APPEND ", MAILBOX, b" {%d+}\r\n" % len(msg), msg, b"\r\n")
        payload = b"".join(parts)
        ns, replies = self._exchange(payload, tags)
        return ns, replies, len(payload)

    def synchronizing(self, messages_crlf: list[bytes]) -> tuple[int, list[bytes], int]:
        """*messages_crlf*: each message followed by CRLF (the command's end)."""
        if self.buf:
            raise ProtocolError(f"{self.label}: unexpected pending data {bytes(self.buf[:80])!r}")
        heads = []
        for msg in messages_crlf:
            tag = self.next_tag()
            heads.append((tag, tag + b" APPEND " + MAILBOX + b" {%d}\r\n" % (len(msg) - 2)))
        replies = []
        sent = 0
        sock = self.sock
        line_of = self._line
        t0 = time.perf_counter_ns()
        for (tag, head), msg in zip(heads, messages_crlf):
            sock.sendall(head)
            line = line_of()
            if not line.startswith(b"+"):
                raise ProtocolError(f"{self.label}: expected '+' after {head!r}, got {line!r}")
            sock.sendall(msg)
            while True:
                line = line_of()
                if line.startswith(tag + b" "):
                    replies.append(line)
                    break
                if not line.startswith(b"* "):
                    raise ProtocolError(f"{self.label}: unexpected {line[:80]!r} after a message")
            sent += len(head) + len(msg)
        t1 = time.perf_counter_ns()
        return t1 - t0, replies, sent

    def multiappend_sync(self, messages: list[bytes]) -> tuple[int, list[bytes], int]:
        """(e) ONE MULTIAPPEND whose every literal is synchronizing: each message is sent
        once its "+" came (the proxy may say it itself when it checked everything)."""
        if self.buf:
            raise ProtocolError(f"{self.label}: unexpected pending data {bytes(self.buf[:80])!r}")
        tag = self.next_tag()
        heads = [(tag + b" APPEND " + MAILBOX if i == 0 else b"") + b" {%d}\r\n" % len(m)
                 for i, m in enumerate(messages)]
        sock, line_of, sent = self.sock, self._line, 0
        t0 = time.perf_counter_ns()
        for head, msg in zip(heads, messages):
            sock.sendall(head)
            line = line_of()
            if not line.startswith(b"+"):
                raise ProtocolError(f"{self.label}: expected '+' after {head!r}, got {line!r}")
            sock.sendall(msg)
            sent += len(head) + len(msg)
        sock.sendall(b"\r\n")
        while True:
            line = line_of()
            if line.startswith(tag + b" "):
                break
            if not line.startswith(b"* "):
                raise ProtocolError(f"{self.label}: unexpected {line[:80]!r} after the messages")
        t1 = time.perf_counter_ns()
        return t1 - t0, [line], sent + 2

    def split_writes(self, messages_crlf: list[bytes]) -> tuple[int, list[bytes], int]:
        """(c) as UW c-client (mailutil, alpine) does it: Nagle left on, each literal
        written, then its CRLF in a second write. A server that delays its ACK makes
        the second write wait ~40 ms (TCP_QUICKACK on the server side avoids it)."""
        sock = self.sock
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
        real_sendall = sock.sendall
        try:
            class _Split:
                def __getattr__(self, name):
                    return getattr(sock, name)

                def sendall(self, data: bytes) -> None:
                    if data.endswith(b"}\r\n"):
                        real_sendall(data)
                    else:
                        real_sendall(data[:-2])
                        real_sendall(data[-2:])

            self.sock = _Split()  # type: ignore[assignment]
            return self.synchronizing(messages_crlf)
        finally:
            self.sock = sock
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _exchange(self, payload: bytes, tags: list[bytes]) -> tuple[int, list[bytes]]:
        """Send *payload* as fast as the socket takes it while reading the replies; stop
        at the tagged reply to the last of *tags* (they must come in order)."""
        if self.buf:
            raise ProtocolError(f"{self.label}: unexpected pending data {bytes(self.buf[:80])!r}")
        sock = self.sock
        view = memoryview(payload)
        total = len(payload)
        pos = 0
        buf = self.buf
        rbuf, rview = self.recv_buf, self.recv_view
        replies: list[bytes] = []
        expect = tags[0]
        sel = selectors.DefaultSelector()
        sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
        sock.setblocking(False)
        try:
            t0 = time.perf_counter_ns()
            while True:
                events = sel.select(IO_TIMEOUT)
                if not events:
                    raise ProtocolError(f"{self.label}: stalled for {IO_TIMEOUT}s with {pos}/{total} bytes "
                                        f"sent and {len(replies)}/{len(tags)} replies")
                mask = events[0][1]
                if mask & selectors.EVENT_WRITE and pos < total:
                    try:
                        pos += sock.send(view[pos:])
                    except BlockingIOError:
                        pass
                    if pos == total:
                        sel.modify(sock, selectors.EVENT_READ)
                if mask & selectors.EVENT_READ:
                    try:
                        k = sock.recv_into(rbuf)
                    except BlockingIOError:
                        continue
                    if not k:
                        raise ProtocolError(f"{self.label}: connection closed after {pos}/{total} bytes "
                                            f"and {len(replies)}/{len(tags)} replies")
                    buf += rview[:k]
                    while True:
                        i = buf.find(b"\n")
                        if i < 0:
                            break
                        line = bytes(buf[: i + 1])
                        del buf[: i + 1]
                        if line.startswith(b"* "):
                            continue
                        if not line.startswith(expect + b" "):
                            raise ProtocolError(f"{self.label}: expected the reply to {expect!r}, "
                                                f"got {line[:120]!r}")
                        replies.append(line)
                        if len(replies) == len(tags):
                            t1 = time.perf_counter_ns()
                            if pos != total:
                                raise ProtocolError(f"{self.label}: answered after {pos}/{total} bytes: "
                                                    f"{line[:120]!r}")
                            if buf:
                                raise ProtocolError(f"{self.label}: data after the last reply: "
                                                    f"{bytes(buf[:80])!r}")
                            return t1 - t0, replies
                        expect = tags[len(replies)]
        finally:
            sel.close()
            sock.settimeout(IO_TIMEOUT)


def check_replies(label: str, mode: str, replies: list[bytes], n: int) -> int:
    """All OK with APPENDUIDs 1..n in order (a fresh mailbox); the UIDVALIDITY."""
    uids: list[int] = []
    validity: set[int] = set()
    for line in replies:
        m = _APPENDUID.match(line)
        if not m:
            raise ProtocolError(f"{label} ({mode}): not OK [APPENDUID ...]: {line[:160]!r}")
        validity.add(int(m.group(2)))
        for part in m.group(3).split(b","):
            lo, _, hi = part.partition(b":")
            uids.extend(range(int(lo), int(hi or lo) + 1))
    if uids != list(range(1, n + 1)) or len(validity) != 1:
        shown = b" / ".join(r.strip() for r in replies[:3])
        raise ProtocolError(f"{label} ({mode}): APPENDUIDs are not 1..{n} in one UIDVALIDITY: {shown[:200]!r}")
    return validity.pop()


class Control(RawIMAP):
    """Direct on Dovecot: empties and counts the mailbox between runs."""

    def reset(self) -> None:
        self.command(b"DELETE " + MAILBOX, check=False)  # NO the first time: it does not exist yet
        self.command(b"CREATE " + MAILBOX)

    def count(self) -> int:
        _, untagged = self.command(b"STATUS " + MAILBOX + b" (MESSAGES)")
        for line in untagged:
            m = re.match(rb"\* STATUS .*\(MESSAGES (\d+)\)", line)
            if m:
                return int(m.group(1))
        raise ProtocolError(f"no STATUS in {untagged!r}")


# ----------------------------------------------------------------------------- measuring


def imap_pid(dovecot: Dovecot, before: set[int]) -> int | None:
    """The pid of the one imap session process of USER that is not in *before*."""
    new = set(dovecot.sessions(USER)) - before
    return new.pop() if len(new) == 1 else None


def one_run(mode: str, client: AppendClient, messages: list[bytes], messages_crlf: list[bytes]):
    if mode == "a":
        return client.multiappend(messages)
    if mode == "b":
        return client.pipelined(messages)
    if mode == "d":
        return client.split_writes(messages_crlf)
    if mode == "e":
        return client.multiappend_sync(messages)
    return client.synchronizing(messages_crlf)


def rate_stats(runs: list[dict], n: int, nbytes: int) -> dict:
    secs = [r["seconds"] for r in runs]
    msgs = [n / s for s in secs]
    mbs = [nbytes / s / 1e6 for s in secs]

    def med(key: str) -> float | None:
        vals = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(vals) if vals else None

    return {
        "runs": len(runs),
        "best_msg_s": max(msgs), "median_msg_s": statistics.median(msgs), "worst_msg_s": min(msgs),
        "best_mb_s": max(mbs), "median_mb_s": statistics.median(mbs), "worst_mb_s": min(mbs),
        "seconds": secs,
        "wire_bytes_sent": runs[0]["sent"],
        # CPU seconds per run (1/CLK_TCK resolution), medians
        "cpu_imap_s": med("cpu_imap"), "cpu_proxy_s": med("cpu_proxy"), "cpu_client_s": med("cpu_client"),
    }


# ----------------------------------------------------------------------------- report


def table(results: dict) -> str:
    p = results["params"]
    modes = p["modes"]
    res = results["append"]
    body = []
    for mode in modes:
        d, x = res[mode]["direct"], res[mode]["proxy"]
        for stat in ("best", "median"):
            body.append((MODES[mode] if stat == "best" else "", stat,
                         f"{d[stat + '_msg_s']:.0f}", f"{x[stat + '_msg_s']:.0f}",
                         f"{d[stat + '_mb_s']:.1f}", f"{x[stat + '_mb_s']:.1f}",
                         f"{x[stat + '_msg_s'] / d[stat + '_msg_s']:.2f}"))
    head = ("test", "stat", "direct msg/s", "proxy msg/s", "direct MB/s", "proxy MB/s", "proxy/direct")
    lines = render_table(head, body, left=(0, 1))

    pairs = [(a, b) for a, b in (("a", "b"), ("b", "c")) if a in modes and b in modes]
    if pairs:
        lines.append("")
        body = []
        for a, b in pairs:
            for stat in ("best", "median"):
                key = stat + "_msg_s"
                body.append((f"({a})/({b})" if stat == "best" else "", stat,
                             *(f"{res[a][t][key] / res[b][t][key]:.2f}" for t in TARGETS)))
        lines += render_table(("ratio", "stat", "direct", "proxy"), body, left=(0, 1))

    lines.append("")
    body = []
    for mode in modes:
        d, x = res[mode]["direct"], res[mode]["proxy"]
        us = lambda v: "n/a" if v is None else f"{v / p['messages'] * 1e6:.0f}"  # noqa: E731
        body.append((MODES[mode], us(d["cpu_imap_s"]), us(x["cpu_imap_s"]), us(x["cpu_proxy_s"]),
                     us(d["cpu_client_s"]), us(x["cpu_client_s"])))
    lines += render_table(("CPU us per message (median run)", "imap direct", "imap behind proxy",
                           "proxy", "client direct", "client proxy"), body)

    lines.append("")
    lines.append("proxy/direct < 1 = the proxy is slower; MB/s counts message bytes (1 MB = 10^6 bytes).")
    rep = p["repeats"]
    note = (f" (reduced from {p['repeats_asked']} to stay within the {p['budget_s']:.0f} s budget)"
            if rep != p["repeats_asked"] else "")
    pinned = p["pinned_cpus"]
    lines.append(f"{p['messages']} messages of {p['size']} bytes ({p['message_bytes'] / 1e6:.1f} MB) per run; "
                 f"{rep} run(s) per test and target{note}; CPUs: {results['environment']['cpus']}, "
                 + (f"pinned to {','.join(map(str, pinned))}." if pinned else "not pinned."))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=1000, help="messages per run (1000)")
    ap.add_argument("--size", type=int, default=20480, help="bytes per message (20480)")
    ap.add_argument("--repeats", type=int, default=3, help="measured runs per test and target (3)")
    ap.add_argument("--warmup", type=int, default=0, help="unmeasured runs per test and target first (0)")
    ap.add_argument("--modes", default="abcde", help="which tests, a subset of 'abcde' (all)")
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET,
                    help=f"seconds the whole run may take: after the first round, repeats are cut "
                         f"to fit, and the table says so ({DEFAULT_BUDGET:.0f}; 0 = no limit)")
    ap.add_argument("--pin", metavar="CPUS",
                    help="pin the benchmark, Dovecot and the proxy (they inherit it) to these CPUs, "
                         "e.g. '0' or '0,1'; default: no pinning (see bench/README.md)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, config)")
    args = ap.parse_args(argv)
    modes = "".join(m for m in "abcde" if m in args.modes)
    if args.messages < 1 or args.size < 300 or args.repeats < 1 or args.warmup < 0:
        ap.error("--messages, --repeats must be >= 1, --warmup >= 0 and --size >= 300")
    if not modes or set(args.modes) - set("abcde"):
        ap.error("--modes: a non-empty subset of 'abcde'")

    pin = apply_pin(ap, args.pin)

    reason = dovecot_available()
    if reason is not None:
        print(f"bench_append: cannot run Dovecot here: {reason}", file=sys.stderr)
        return 2

    install_signal_handlers()
    with Harness(keep=args.keep) as h:
        h.start()
        dovecot, proxy = h.dovecot, h.proxy
        assert dovecot is not None and proxy is not None

        rng = random.Random(20240101)
        messages = [make_message(i, args.size, rng) for i in range(1, args.messages + 1)]
        messages_crlf = [m + b"\r\n" for m in messages]
        nbytes = sum(map(len, messages))

        control: Control = h.connect("direct", "control", cls=Control)  # type: ignore[assignment]
        clients: dict[str, AppendClient] = {}
        pids: dict[str, int | None] = {}
        for name in TARGETS:
            before = set(dovecot.sessions(USER))
            c = clients[name] = h.connect(name, cls=AppendClient)  # type: ignore[assignment]
            pids[name] = imap_pid(dovecot, before)
            caps = c.capabilities()
            missing = {"LITERAL+", "MULTIAPPEND", "UIDPLUS"} - caps
            if missing:
                raise ProtocolError(f"{name} does not announce {', '.join(sorted(missing))}")
        if None in pids.values():
            log(f"could not tell the imap processes apart ({pids}): no Dovecot CPU times")

        runs: dict[str, dict[str, list[dict]]] = {m: {t: [] for t in TARGETS} for m in modes}

        def run(mode: str, name: str, r: int, measured: bool) -> None:
            control.reset()
            client = clients[name]
            cpu0 = (cpu_seconds(pids[name]), cpu_seconds(proxy.pid), time.process_time())
            ns, replies, sent = one_run(mode, client, messages, messages_crlf)
            cpu1 = (cpu_seconds(pids[name]), cpu_seconds(proxy.pid), time.process_time())
            check_replies(name, MODES[mode], replies, args.messages)
            count = control.count()
            if count != args.messages:
                raise ProtocolError(f"{name} ({MODES[mode]}): {MAILBOX.decode()} holds {count} messages, "
                                    f"expected {args.messages}")
            d = lambda i: None if cpu0[i] is None or cpu1[i] is None else cpu1[i] - cpu0[i]  # noqa: E731
            rec = {"seconds": ns / 1e9, "sent": sent, "cpu_imap": d(0),
                   "cpu_proxy": d(1) if name == "proxy" else None, "cpu_client": d(2)}
            log(f"{'' if measured else 'warm-up '}{MODES[mode]} {name:6} run {r + 1}: {ns / 1e9:.3f}s, "
                f"{args.messages / (ns / 1e9):.0f} msg/s")
            if measured:
                runs[mode][name].append(rec)

        repeats = args.repeats
        t_measure = time.monotonic()
        gc.collect()
        gc.disable()
        try:
            for r in range(args.warmup):
                for mode in modes:
                    for name in TARGETS:
                        run(mode, name, r, False)
            r = 0
            while r < repeats:
                for i, mode in enumerate(modes):
                    # ABBA: neither target always goes first
                    order = TARGETS if (r * len(modes) + i) % 2 == 0 else TARGETS[::-1]
                    for name in order:
                        run(mode, name, r, True)
                gc.collect()
                r += 1
                if r == 1 and args.budget > 0 and repeats > 1:
                    spent = time.monotonic() - h.t_start
                    per_round = time.monotonic() - t_measure
                    fit = 1 + math.floor((args.budget - 5.0 - spent) / per_round)  # ~5 s to stop
                    if fit < repeats:
                        repeats = max(1, fit)
                        log(f"a round takes {per_round:.1f}s: {repeats} repeat(s) instead of "
                            f"{args.repeats} to stay within --budget {args.budget:.0f}s")
        finally:
            gc.enable()
        log(f"measured in {time.monotonic() - t_measure:.1f}s")

        results: dict = {
            "params": {
                "messages": args.messages, "size": args.size, "message_bytes": nbytes,
                "modes": modes, "repeats": repeats, "repeats_asked": args.repeats,
                "warmup": args.warmup, "budget_s": args.budget,
                "pinned_cpus": sorted(pin) if pin else None,
            },
            "environment": environment(),
            "tests": {m: MODES[m] for m in modes},
            "append": {m: {t: rate_stats(runs[m][t], args.messages, nbytes) for t in TARGETS} for m in modes},
        }
        a = results["append"]
        results["ratios_proxy_over_direct"] = {
            **{f"{m}_{s}": a[m]["proxy"][f"{s}_msg_s"] / a[m]["direct"][f"{s}_msg_s"]
               for m in modes for s in ("best", "median")},
            "_meaning": "throughput: < 1 = the proxy is slower",
        }
        results["ratios_between_tests"] = {
            f"{x}_over_{y}_{t}_{s}": a[x][t][f"{s}_msg_s"] / a[y][t][f"{s}_msg_s"]
            for x, y in (("a", "b"), ("b", "c")) if x in modes and y in modes
            for t in TARGETS for s in ("best", "median")
        }

        h.close_clients()

        report(results, table, proxy.stderr_text(), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli("bench_append", main))
