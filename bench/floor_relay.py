#!/usr/bin/env python3
"""Python's floor for a relayed NOOP: the least a proxy written in Python could do, measured
beside referral-proxy and direct Dovecot with bench_peers.py's own NOOP method.

Three minimal relays (``serve`` mode), each one backend connection per client and the
client's tag swapped for its own on the bytes (and back in the tagged answer), nothing
else (no parsing, no literals, no routing, no counting):

* ``epoll``: a raw ``select.epoll`` loop, non-blocking sockets, a ``send`` per read;
* ``asyncio``: the same on asyncio's Protocol API (its default selector loop, epoll);
* ``twisted``: bare Twisted Protocols on the epoll reactor, ``transport.write`` per read;
* ``netio``: the same with referral-proxy's own loop pass and end-of-pass writes
  (``referral_proxy.netio.install``/``attach``): the floor of the proxy's I/O layer,
  so that referral-proxy minus this is what the proxy's own per-command work costs.

The measuring mode starts one backend Dovecot, these three relays and referral-proxy
(and, with ``--targets``, nginx's mail proxy) in front of it, logs one client in to
each, and per round (target order rotated): the NOOP round trip pinned to one CPU and
unpinned (bench_peers.measure_noop: blocks of 100 taking the targets in turn), then
each target's CPU per NOOP (user and system of its process tree from /proc over
``--cpu-noops`` NOOPs in a row on one connection).  Medians, added to direct.
See bench/README.md ("Python's floor").
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import signal
import socket
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

HERE = Path(__file__).resolve()
KINDS = ("epoll", "asyncio", "twisted", "netio")


# ----------------------------------------------------------------------------- tag swap


class Swap:
    """The relay's only IMAP: client tags out, its own ``p<n>`` tags in, and back.
    Lines only (no literals): a floor, not a proxy."""

    __slots__ = ("n", "tags", "cbuf", "bbuf")

    def __init__(self) -> None:
        self.n = 0
        self.tags: dict[bytes, bytes] = {}
        self.cbuf = b""
        self.bbuf = b""

    def out(self, data: bytes) -> bytes:
        """Client bytes -> backend bytes (each whole line's tag replaced)."""
        if self.cbuf:
            data = self.cbuf + data
        end = data.rfind(b"\n") + 1
        self.cbuf = data[end:]
        if end == len(data) and data.find(b"\n") == end - 1:  # one whole line: the usual read
            sp = data.find(b" ")
            if sp <= 0:
                return data
            self.n += 1
            tag = b"p%d" % self.n
            self.tags[tag] = data[:sp]
            return tag + data[sp:]
        parts = []
        for line in data[:end].splitlines(keepends=True):
            sp = line.find(b" ")
            if sp <= 0:
                parts.append(line)
                continue
            self.n += 1
            tag = b"p%d" % self.n
            self.tags[tag] = line[:sp]
            parts.append(tag + line[sp:])
        return b"".join(parts)

    def back(self, data: bytes) -> bytes:
        """Backend bytes -> client bytes (a tagged line of ours gets the client's tag)."""
        if self.bbuf:
            data = self.bbuf + data
        end = data.rfind(b"\n") + 1
        self.bbuf = data[end:]
        if end == len(data) and data.find(b"\n") == end - 1 and data[0] == 0x70:  # b"p": one tagged line
            sp = data.find(b" ")
            ctag = self.tags.pop(data[:sp], None)
            return data if ctag is None else ctag + data[sp:]
        parts = []
        for line in data[:end].splitlines(keepends=True):
            if line[:1] == b"p":
                sp = line.find(b" ")
                ctag = self.tags.pop(line[:sp], None)
                if ctag is not None:
                    line = ctag + line[sp:]
            parts.append(line)
        return b"".join(parts)


def _nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ----------------------------------------------------------------------------- (a) epoll


def serve_epoll(listen: tuple[str, int], backend: tuple[str, int]) -> None:
    """A raw epoll loop: read, swap, send; EPOLLOUT only while a send was short."""
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(listen)
    lsock.listen(128)
    lsock.setblocking(False)
    ep = select.epoll()
    lfd = lsock.fileno()
    ep.register(lfd, select.EPOLLIN)
    # fd -> [sock, peer fd, swap function, pending bytes]
    conns: dict[int, list] = {}

    def close(fd: int) -> None:
        for f in (fd, conns[fd][1]):
            c = conns.pop(f, None)
            if c is not None:
                ep.unregister(f)
                c[0].close()

    print("listening", file=sys.stderr, flush=True)
    while True:
        for fd, ev in ep.poll():
            if fd == lfd:
                try:
                    csock, _ = lsock.accept()
                except BlockingIOError:
                    continue
                bsock = socket.create_connection(backend)
                for s in (csock, bsock):
                    _nodelay(s)
                    s.setblocking(False)
                sw = Swap()
                cfd, bfd = csock.fileno(), bsock.fileno()
                conns[cfd] = [csock, bfd, sw.out, b""]
                conns[bfd] = [bsock, cfd, sw.back, b""]
                ep.register(cfd, select.EPOLLIN)
                ep.register(bfd, select.EPOLLIN)
                continue
            c = conns.get(fd)
            if c is None:
                continue
            if ev & select.EPOLLOUT:
                try:
                    k = c[0].send(c[3])
                except BlockingIOError:
                    k = 0
                c[3] = c[3][k:]
                if not c[3]:
                    ep.modify(fd, select.EPOLLIN)
                continue
            try:
                data = c[0].recv(65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if not data:
                close(fd)
                continue
            out = c[2](data)
            if not out:
                continue
            p = conns[c[1]]
            if p[3]:
                p[3] += out
                continue
            try:
                k = p[0].send(out)
            except BlockingIOError:
                k = 0
            except OSError:
                close(fd)
                continue
            if k < len(out):
                p[3] = out[k:]
                ep.modify(c[1], select.EPOLLIN | select.EPOLLOUT)


# ----------------------------------------------------------------------------- (b) asyncio


def serve_asyncio(listen: tuple[str, int], backend: tuple[str, int]) -> None:
    """asyncio's Protocol API: data_received -> swap -> the peer transport's write."""
    import asyncio

    class BackendSide(asyncio.Protocol):
        def __init__(self, client: ClientSide) -> None:
            self.client = client
            self.back = client.swap.back

        def data_received(self, data: bytes) -> None:
            out = self.back(data)
            if out:
                self.client.transport.write(out)

        def connection_lost(self, exc) -> None:
            self.client.transport.close()

    class ClientSide(asyncio.Protocol):
        def connection_made(self, transport) -> None:
            self.transport = transport
            self.swap = Swap()
            self.out = self.swap.out
            self.backend = None
            transport.pause_reading()
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            bt, _ = await loop.create_connection(lambda: BackendSide(self), *backend)
            self.backend = bt
            self.transport.resume_reading()

        def data_received(self, data: bytes) -> None:
            out = self.out(data)
            if out:
                self.backend.write(out)

        def connection_lost(self, exc) -> None:
            if self.backend is not None:
                self.backend.close()

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(ClientSide, *listen)
        print("listening", file=sys.stderr, flush=True)
        await server.serve_forever()

    asyncio.run(main())


# ----------------------------------------------------------------------------- (c) Twisted


def serve_twisted(listen: tuple[str, int], backend: tuple[str, int], fast: bool = False) -> None:
    """Bare Twisted Protocols on the epoll reactor: dataReceived -> swap -> transport.write
    (with *fast*, through referral_proxy.netio's loop pass and end-of-pass writes)."""
    from twisted.internet import epollreactor

    epollreactor.install()
    from twisted.internet import protocol, reactor

    attach = lambda transport: None  # noqa: E731
    if fast:
        sys.path.insert(0, str(HERE.parent.parent))
        from referral_proxy import netio

        if not netio.install(reactor):
            raise SystemExit("netio.install: not the epoll reactor")
        attach = netio.attach

    class BackendSide(protocol.Protocol):
        def __init__(self, client: ClientSide) -> None:
            self.client = client
            self.back = client.swap.back

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            attach(self.transport)
            self.client.backend = self.transport
            self.client.transport.resumeProducing()

        def dataReceived(self, data: bytes) -> None:
            out = self.back(data)
            if out:
                self.client.transport.write(out)

        def connectionLost(self, reason) -> None:
            self.client.transport.loseConnection()

    class ClientSide(protocol.Protocol):
        backend = None

        def connectionMade(self) -> None:
            self.transport.setTcpNoDelay(True)
            attach(self.transport)
            self.swap = Swap()
            self.out = self.swap.out
            self.transport.pauseProducing()
            protocol.ClientCreator(reactor, BackendSide, self).connectTCP(*backend)

        def dataReceived(self, data: bytes) -> None:
            out = self.out(data)
            if out:
                self.backend.write(out)

        def connectionLost(self, reason) -> None:
            if self.backend is not None:
                self.backend.loseConnection()

    f = protocol.Factory.forProtocol(ClientSide)
    reactor.listenTCP(listen[1], f, interface=listen[0])
    print("listening", file=sys.stderr, flush=True)
    reactor.run()


SERVE = {"epoll": serve_epoll, "asyncio": serve_asyncio, "twisted": serve_twisted,
         "netio": lambda listen, backend: serve_twisted(listen, backend, fast=True)}


# ----------------------------------------------------------------------------- measuring


def tree_cpu_ns(root: int) -> int:
    """CPU nanoseconds of every thread of *root*'s tree (/proc/*/task/*/schedstat): exact,
    where /proc/*/stat counts 10 ms ticks."""
    from peers import descendants

    total = 0
    for pid in descendants(root):
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def measure(argv: list[str]) -> int:
    from _common import PROXY_START_TIMEOUT, USER, dovecot_available, install_signal_handlers, log
    from bench_peers import PeerClient, bench_root, environment_text, measure_noop
    from peers import (
        Daemon,
        DirectTarget,
        NginxTarget,
        ReferralProxyTarget,
        Target,
        _DaemonTarget,
        set_affinity,
        stop_all,
        tree_cpu_user_system,
    )

    from referral_proxy.fleet import DEFAULT_USERS, Dovecot, free_port
    from referral_proxy.testing.proxyproc import ProxyProcess as _ProxyProcess

    class FloorTarget(_DaemonTarget):
        def __init__(self, root: Path, backend: Dovecot, kind: str) -> None:
            self.key = self.label = f"floor-{kind}"
            d = root / self.key
            d.mkdir(parents=True, exist_ok=True)
            self.port = free_port(self.host)
            argv = [sys.executable, str(HERE), "serve", kind, "--listen", f"{self.host}:{self.port}",
                    "--backend", f"{backend.host}:{backend.port}"]
            self.daemon = Daemon(self.key, argv, d / "relay.log", d)
            self.greeting_log = self.daemon.log_path

    class BeforeTarget(ReferralProxyTarget):
        def __init__(self, root: Path, backend: Dovecot, tree: Path) -> None:
            super().__init__(root / "before", backend)
            self.key = self.label = "referral-proxy-before"
            self.tree = tree

        def start(self) -> None:
            _ProxyProcess.start(self.proxy, timeout=PROXY_START_TIMEOUT, new_group=True, tied_to_parent=True,
                                env={"PYTHONPATH": str(self.tree)})

    ap = argparse.ArgumentParser(prog="floor_relay.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--noops", type=int, default=2000, help="NOOPs per round, target and placement (2000)")
    ap.add_argument("--cpu-noops", type=int, default=5000, help="NOOPs in a row for the CPU figure (5000)")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--targets", default="referral-proxy", help="also: nginx (comma-separated)")
    ap.add_argument("--before", metavar="DIR",
                    help="also referral-proxy from the package in DIR (e.g. git archive main | tar -x -C DIR), "
                         "as target 'referral-proxy-before'")
    ap.add_argument("--instructions", type=int, metavar="N",
                    help="instead: each relay of --kinds under callgrind, instructions per NOOP "
                         "((N NOOPs - N/5 NOOPs) / (N - N/5); bench_append_cpu.py --tests n gives the proxy's)")
    ap.add_argument("--markdown", metavar="FILE")
    args = ap.parse_args(argv)
    reason = dovecot_available()
    if reason is not None:
        print(f"floor_relay: cannot run Dovecot here: {reason}", file=sys.stderr)
        return 2
    install_signal_handlers()
    root = bench_root()
    backend = Dovecot("bench-backend", "127.0.0.2", root / "backend", users=dict(DEFAULT_USERS))
    targets: list[Target] = []
    all_cpus = set(range(os.cpu_count() or 1))
    names = [n for n in args.targets.split(",") if n]
    rows: dict[str, dict[str, list[float]]] = {}
    if args.instructions:
        return instructions(args, root, backend)
    try:
        backend.start()
        targets = [DirectTarget(backend)] + [FloorTarget(root, backend, k) for k in args.kinds.split(",") if k]
        if "nginx" in names:
            targets.append(NginxTarget(root, backend))
        if args.before:
            targets.append(BeforeTarget(root, backend, Path(args.before).resolve()))
        if "referral-proxy" in names:
            targets.append(ReferralProxyTarget(root, backend))
        for t in targets:
            log(f"starting {t.label} on {t.host}:{t.port}")
            t.start()
        clients = {}
        for t in targets:
            clients[t.key] = PeerClient(t.host, t.port, t.key)
            clients[t.key].login(USER, backend.password(USER))
        rows = {t.key: {"pinned": [], "unpinned": [], "user pinned": [], "system pinned": [],
                        "user unpinned": [], "system unpinned": []} for t in targets}

        def cpu_pass(order: list[Target], clients: dict, rows: dict, where: str) -> None:
            """CPU per NOOP of each target's tree over --cpu-noops NOOPs in a row."""
            for t in order:
                root_pid = t.cpu_root if not isinstance(t, DirectTarget) else None
                if root_pid is None:
                    continue
                c = clients[t.key]
                u0, s0 = tree_cpu_user_system(root_pid)
                n0 = tree_cpu_ns(root_pid)
                for _ in range(args.cpu_noops):
                    c.noop_rtt_ns()
                n1 = tree_cpu_ns(root_pid)
                u1, s1 = tree_cpu_user_system(root_pid)
                # the total from schedstat (ns), split by the ticks' user/system ratio
                total = (n1 - n0) / args.cpu_noops / 1e3
                share = (u1 - u0) / ((u1 - u0) + (s1 - s0)) if (u1 - u0) + (s1 - s0) else 0.5
                rows[t.key]["user " + where].append(total * share)
                rows[t.key]["system " + where].append(total * (1 - share))

        for r in range(args.rounds):
            k = r % len(targets)
            order = targets[k:] + targets[:k]
            roots = [os.getpid()] + ([backend.pid] if backend.pid else [])
            for t in targets:
                roots += t.roots()
            cl = [clients[t.key] for t in order]
            try:
                set_affinity(roots, {min(all_cpus)})
                for t, v in zip(order, measure_noop(cl, args.noops)):
                    rows[t.key]["pinned"].append(v)
            finally:
                set_affinity(roots, all_cpus)
            for t, v in zip(order, measure_noop(cl, args.noops)):
                rows[t.key]["unpinned"].append(v)
            try:
                set_affinity(roots, {min(all_cpus)})
                cpu_pass(order, clients, rows, "pinned")
            finally:
                set_affinity(roots, all_cpus)
            cpu_pass(order, clients, rows, "unpinned")
            log(f"round {r + 1}: " + ", ".join(
                f"{t.key} {rows[t.key]['pinned'][-1]:.0f}/{rows[t.key]['unpinned'][-1]:.0f}" for t in order))
        for c in clients.values():
            c.close()
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_all(reversed(targets))
        try:
            backend.stop()
        except Exception as e:
            log(f"stopping the backend: {e!r}")
        shutil.rmtree(root, ignore_errors=True)

    med = statistics.median
    d_pin, d_un = med(rows["direct"]["pinned"]), med(rows["direct"]["unpinned"])
    lines = ["| target | NOOP added, 1 CPU | NOOP added, unpinned | CPU us/NOOP on 1 CPU (user + system) "
             "| CPU us/NOOP unpinned (user + system) |",
             "|---|---|---|---|---|",
             f"| direct Dovecot | ({d_pin:.1f} us) | ({d_un:.1f} us) | - | - |"]

    def cpu(r: dict, where: str) -> str:
        u, s = r["user " + where], r["system " + where]
        return f"{med(u) + med(s):.1f} ({med(u):.1f} + {med(s):.1f})" if u else "-"

    for t in targets[1:]:
        r = rows[t.key]
        lines.append(f"| {t.label} | +{med(r['pinned']) - d_pin:.0f} us | +{med(r['unpinned']) - d_un:.0f} us "
                     f"| {cpu(r, 'pinned')} | {cpu(r, 'unpinned')} |")
    per_round = "; ".join(
        f"{t.key} " + ",".join(f"{a:.0f}/{b:.0f}" for a, b in zip(rows[t.key]["pinned"], rows[t.key]["unpinned"]))
        for t in targets)
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    text = "\n".join(lines) + (f"\n\nper round, pinned/unpinned us: {per_round}\nload average at the end: {load}\n"
                               + "machine: " + ", ".join(f"{k} {v}" for k, v in environment_text().items()))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    return 0


def instructions(args: argparse.Namespace, root: Path, backend) -> int:
    """Each relay under valgrind's callgrind: user-space instructions per NOOP, exactly."""
    import subprocess

    from _common import USER
    from bench_append_cpu import _counted
    from bench_peers import PeerClient
    from peers import Daemon

    from referral_proxy.fleet import free_port
    from referral_proxy.testing.proxyproc import wait_greeting

    n = args.instructions
    python = os.path.realpath(sys.executable)
    results = {}
    try:
        backend.start()
        for kind in [k for k in args.kinds.split(",") if k]:
            d = root / f"cg-{kind}"
            d.mkdir()
            out = d / "callgrind.out"
            port = free_port("127.0.0.1")
            daemon = Daemon(kind, ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", python, str(HERE),
                                   "serve", kind, "--listen", f"127.0.0.1:{port}",
                                   "--backend", f"{backend.host}:{backend.port}"], d / "relay.log", d)
            daemon.start()
            try:
                wait_greeting("127.0.0.1", port, daemon.process, kind, lambda: "", 300)
                c = PeerClient("127.0.0.1", port, kind)
                c.login(USER, backend.password(USER))
                counts = []
                for k, count in enumerate((n // 5, n)):
                    for _ in range(20):
                        c.noop_rtt_ns()
                    subprocess.run(["callgrind_control", "-z", str(daemon.process.pid)], capture_output=True,
                                   check=True)
                    for _ in range(count):
                        c.noop_rtt_ns()
                    counts.append(_counted(daemon.process.pid, out, f"{kind}{k}"))
                c.close()
            finally:
                daemon.stop()
            results[kind] = (counts[1] - counts[0]) / (n - n // 5)
            print(f"floor-{kind}: {results[kind] / 1000:.1f}k instructions per NOOP", flush=True)
    finally:
        try:
            backend.stop()
        except Exception as e:
            print(f"stopping the backend: {e!r}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
    return 0


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        ap = argparse.ArgumentParser(prog="floor_relay.py serve")
        ap.add_argument("kind", choices=KINDS)
        ap.add_argument("--listen", required=True)
        ap.add_argument("--backend", required=True)
        a = ap.parse_args(sys.argv[2:])
        lh, lp = a.listen.rsplit(":", 1)
        bh, bp = a.backend.rsplit(":", 1)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
        SERVE[a.kind]((lh, int(lp)), (bh, int(bp)))
        return 0
    from _common import run_cli

    return run_cli("floor_relay", lambda: measure(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
