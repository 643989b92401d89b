"""The proxy under tracemalloc, for the memory test and bench/bench_memory.py.

    python -m referral_proxy.testing.memtrace --dir D [--frames 8] --config proxy.toml

runs ``referral_proxy`` exactly as ``python -m referral_proxy`` would, with tracemalloc
started once the package is imported. On SIGUSR2 it collects garbage and writes
``D/snap-N.pickle`` (the snapshot, the traced bytes and a census of live objects by type),
then ``D/snap-N.done``: ``request_snapshot`` sends the signal and reads it back. Nothing
in the package imports this file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import pickle
import signal
import socket
import sys
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sample", "IdleClient", "request_snapshot", "per_session", "top_lines", "command"]


@dataclass(frozen=True)
class Sample:
    """One look at the proxy's Python heap."""

    traced: int  # bytes tracemalloc sees allocated
    snapshot: tracemalloc.Snapshot
    objects: dict[str, int]  # live objects tracked by the collector, by type name


class IdleClient:
    """One client that logs in, NOOPs and then says nothing (a bare socket: no buffers of its own)."""

    def __init__(self, host: str, port: int, user: str, password: str) -> None:
        self.sock = socket.create_connection((host, port), timeout=60)
        self._until(b"* OK", b"")
        self.sock.sendall(b'a LOGIN %s "%s"\r\nb NOOP\r\n' % (user.encode(), password.encode()))
        self._until(b"b OK", b"")

    def _until(self, start: bytes, data: bytes) -> None:
        while not any(line.startswith(start) for line in data.split(b"\r\n")):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise RuntimeError(f"closed before {start!r}: {data[-200:]!r}")
            data += chunk
            if b" NO " in data or b" BAD " in data or b"* BYE" in data:
                raise RuntimeError(f"refused: {data[-200:]!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(b"z LOGOUT\r\n")
        self.sock.close()


def command(directory: Path, frames: int = 8) -> list[str]:
    """What ProxyProcess.start(command=...) runs instead of ``python -m referral_proxy`` (this
    file by its path: the package imported is the one on PYTHONPATH, another checkout's too)."""
    return [sys.executable, __file__, "--dir", str(directory), "--frames", str(frames)]


def request_snapshot(pid: int, directory: Path, number: int, timeout: float = 60.0) -> Sample:
    """Ask the proxy *pid* for snapshot *number* and wait for it."""
    done = directory / f"snap-{number}.done"
    os.kill(pid, signal.SIGUSR2)
    deadline = time.monotonic() + timeout
    while not done.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no snapshot {number} from {pid} within {timeout} s")
        time.sleep(0.05)
    with open(directory / f"snap-{number}.pickle", "rb") as f:
        traced, snapshot, objects = pickle.load(f)
    return Sample(traced, snapshot, objects)


def per_session(before: Sample, after: Sample, sessions: int) -> float:
    """Python heap bytes per session between two samples."""
    return (after.traced - before.traced) / sessions


def top_lines(before: Sample, after: Sample, sessions: int, limit: int = 15,
              key: str = "traceback") -> list[str]:
    """The biggest growths per session, grouped by *key* ("traceback", "lineno", "filename"),
    then the object types whose count grew, per session."""
    stats = after.snapshot.compare_to(before.snapshot, key)
    lines = []
    for s in stats[:limit]:
        frames = [f"{_short(f.filename)}:{f.lineno}" for f in reversed(s.traceback)]  # innermost first
        where = " <- ".join(frames[:4]) if key == "traceback" else frames[0]
        lines.append(f"{s.size_diff / sessions:8.1f} B {s.count_diff / sessions:6.2f} blocks  {where}")
    grown = Counter(after.objects)
    grown.subtract(before.objects)
    lines.append("objects per session: " + ", ".join(
        f"{name} {n / sessions:.2f}" for name, n in grown.most_common(20) if n >= sessions / 10))
    return lines


def _short(filename: str) -> str:
    for marker in ("referral_proxy/", "twisted/", "python3.11/"):
        i = filename.rfind(marker)
        if i >= 0:
            return filename[i:]
    return filename


def _install(directory: Path) -> None:
    count = [0]

    def on_signal(_signum, _frame) -> None:
        count[0] += 1
        for o in gc.get_objects():  # the Observer's answers not yet counted: a bounded buffer, not a session's
            if type(o).__name__ == "ClientSession":  # (the Observer itself is frozen: gc.get_objects skips it)
                o.ctx.observer.flush()
                break
        gc.collect()
        objects = Counter(type(o).__name__ for o in gc.get_objects())
        traced = tracemalloc.get_traced_memory()[0]  # before the snapshot's own tuples exist
        snapshot = tracemalloc.take_snapshot().filter_traces(
            (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__)))
        path = directory / f"snap-{count[0]}.pickle"
        with open(path, "wb") as f:
            pickle.dump((traced, snapshot, dict(objects)), f, pickle.HIGHEST_PROTOCOL)
        (directory / f"snap-{count[0]}.done").touch()

    signal.signal(signal.SIGUSR2, on_signal)


def main() -> int:
    parser = argparse.ArgumentParser(prog="memtrace")
    parser.add_argument("--dir", required=True)
    parser.add_argument("--frames", type=int, default=8)
    ours, rest = parser.parse_known_args()
    # Imported untraced: tracing deep import stacks costs ~10 s of CPU, and what the
    # imports allocate is the same before and after the sessions anyway.
    import referral_proxy.service  # noqa: F401
    from referral_proxy.cli import main as proxy_main

    tracemalloc.start(ours.frames)
    _install(Path(ours.dir))

    return proxy_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
