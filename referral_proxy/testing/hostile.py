"""Hostile IMAP clients on real sockets, for the tests and bench/abuse.py (loopback only).

Each :class:`Kind` is one way to make a server hold memory or a connection: clients
that never read their answers while pipelining, that announce literal after literal
or hold a command just under its limits, that trickle a line a byte at a time, or
that keep failing to log in. :class:`Crowd` opens many of one kind from several
source addresses (127.0.0.0/8 is all local on Linux) and pushes their bytes without
blocking until the server stops reading them.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Kind", "KINDS", "Hostile", "Crowd", "source_addresses"]

KiB = 1024


@dataclass(frozen=True)
class Kind:
    """What one hostile connection does once greeted (and logged in, with *login*)."""

    name: str
    what: str
    login: bool = False
    opening: bytes = b""  # sent once
    stream: bytes = b""  # then sent again and again, never reading an answer
    trickle: bytes = b""  # or sent one byte per tick (slowloris)
    reads: bool = False  # login-flood: it reads each answer before the next command


def _held_literals(count: int, size: int) -> bytes:
    """``a ID (`` and *count* LITERAL+ strings of *size* bytes: a command held unfinished."""
    return b"a ID (" + b"".join(b"{%d+}\r\n" % size + b"x" * size + b" " for _ in range(count))


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("idle", "connected, greeted, silent"),
    Kind("idle-auth", "logged in, silent", login=True),
    Kind("pipeline-pre", "`a CAPABILITY` pipelined before login, answers never read", stream=b"a CAPABILITY\r\n"),
    Kind("unknown-pre", "unknown commands pipelined before login, answers never read", stream=b"a FROB\r\n"),
    Kind("pipeline-post", "`a NOOP` pipelined after login, answers never read", login=True, stream=b"a NOOP\r\n"),
    Kind("id-literals", "`ID ({0+}{0+}...` without end", opening=b"a ID (", stream=b"{0+}\r\n"),
    Kind("one-byte-literals", "one ID held with 999 one-byte literals (max_literals is 1000)",
         opening=_held_literals(999, 1)),
    Kind("big-command", "one ID held with 15 literals of 64 KiB (max_command is 1 MiB)",
         opening=_held_literals(15, 64 * KiB)),
    Kind("slowloris", "a LOGIN line, one byte a tick", trickle=b"a LOGIN " + b"x" * 60_000),
    Kind("login-flood", "LOGIN with a wrong password, again and again", reads=True,
         stream=b"a LOGIN bob wrong\r\n"),
)}


def source_addresses(count: int, base: str = "127.0.1.") -> list[str]:
    """*count* loopback addresses to connect from (127.0.1.1 ...)."""
    return [f"{base}{i}" for i in range(1, count + 1)]


class Hostile:
    """One connection of a Kind."""

    def __init__(self, kind: Kind, host: str, port: int, source: str | None = None, *, user: str = "alice",
                 password: str = "secret", timeout: float = 30.0) -> None:
        self.kind = kind
        self.sent = 0
        self.refused = b""  # the greeting when it was a BYE
        self.closed = False
        self._trickled = 0
        self._tag = 0
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16 * KiB)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * KiB)  # reads nothing: keep the window small
        if source is not None:
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((host, port))
        self.sock = sock
        greeting = self._line()
        if greeting.startswith(b"* BYE"):
            self.refused = greeting
            self.close()
            return
        if kind.login:
            sock.sendall(b"L LOGIN %s \"%s\"\r\n" % (user.encode(), password.encode()))
            while not (line := self._line()).startswith(b"L "):
                pass
            if not line.startswith(b"L OK"):
                self.refused = line
                self.close()
                return
        if kind.opening:
            sock.sendall(kind.opening)
            self.sent += len(kind.opening)
        sock.setblocking(False)

    def _line(self) -> bytes:
        data = b""
        while not data.endswith(b"\n"):
            chunk = self.sock.recv(1)
            if not chunk:
                return data
            data += chunk
        return data

    def push(self, limit: int) -> int:
        """Send what the kind sends until the socket blocks (or *limit* bytes in all): bytes sent now."""
        kind = self.kind
        if self.closed or not kind.stream or self.sent >= limit:
            return 0
        if kind.reads:
            return self._flood()
        chunk = kind.stream * max(1, 8 * KiB // len(kind.stream))
        n = 0
        while self.sent < limit:
            try:
                k = self.sock.send(chunk)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            n += k
            self.sent += k
        return n

    def _flood(self) -> int:
        """One failed login at a time: the next once the last is answered."""
        try:
            data = self.sock.recv(4096)
        except BlockingIOError:
            return 0 if self._tag else self._send_login()
        except OSError:
            self.closed = True
            return 0
        if not data:
            self.closed = True
            return 0
        return self._send_login() if b"a NO" in data or b"a BAD" in data or not self._tag else 0

    def _send_login(self) -> int:
        self._tag += 1
        line = b"a LOGIN bob wrong%d\r\n" % self._tag
        try:
            self.sock.send(line)
        except OSError:
            self.closed = True
            return 0
        self.sent += len(line)
        return len(line)

    def tick(self) -> None:
        """Slowloris: one more byte."""
        if self.closed or self._trickled >= len(self.kind.trickle):
            return
        try:
            self.sock.send(self.kind.trickle[self._trickled:self._trickled + 1])
            self._trickled += 1
            self.sent += 1
        except (BlockingIOError, OSError):
            pass

    def alive(self) -> bool:
        """Whether the server still holds the connection open: a byte more can be sent (or
        waits for room), and no end was read. Once closed, a later call sees the reset."""
        if self.closed:
            return False
        try:
            self.sock.send(b" ")
        except BlockingIOError:
            pass
        except OSError:
            return False
        try:
            return self.sock.recv(1, socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.closed = True
        try:
            self.sock.close()
        except OSError:
            pass


class Crowd:
    """*count* connections of one Kind from *sources* in turn."""

    def __init__(self, kind: Kind, host: str, port: int, count: int, sources: Sequence[str] | None = None, *,
                 user: str = "alice", password: str = "secret") -> None:
        self.kind = kind
        self.members: list[Hostile] = []
        self.errors: list[str] = []
        for i in range(count):
            source = sources[i % len(sources)] if sources else None
            try:
                self.members.append(Hostile(kind, host, port, source, user=user, password=password))
            except OSError as e:
                self.errors.append(f"{source}: {errno.errorcode.get(e.errno or 0, e)}")

    @property
    def accepted(self) -> list[Hostile]:
        return [m for m in self.members if not m.refused]

    @property
    def refusals(self) -> list[bytes]:
        return [m.refused for m in self.members if m.refused]

    def push_until_blocked(self, limit: int = 64 * 1024 * KiB, quiet: float = 1.0, most: float = 30.0) -> bool:
        """Push every stream until no byte went out for *quiet* seconds (the server stopped
        reading), at most *most* seconds or *limit* bytes a connection. True if it blocked."""
        deadline = time.monotonic() + most
        last_progress = time.monotonic()
        while time.monotonic() < deadline:
            progress = sum(m.push(limit) for m in self.members)
            if self.kind.trickle:
                for m in self.members:
                    m.tick()
            now = time.monotonic()
            if progress:
                last_progress = now
            elif now - last_progress >= quiet:
                return True
            if all(m.sent >= limit for m in self.members if m.kind.stream and not m.closed and not m.refused):
                return False
            time.sleep(0.01 if progress else 0.05)
        return False

    def keep_busy(self, seconds: float) -> None:
        """Go on for *seconds*: streams pushed, trickles ticked once a second, floods answered."""
        end = time.monotonic() + seconds
        next_tick = time.monotonic()
        while time.monotonic() < end:
            for m in self.members:
                m.push(1 << 62)
            if self.kind.trickle and time.monotonic() >= next_tick:
                for m in self.members:
                    m.tick()
                next_tick += 1.0
            time.sleep(0.02)

    def close(self) -> None:
        for m in self.members:
            m.close()
