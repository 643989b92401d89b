"""A tiny raw-socket IMAP client for tests that must see exact bytes on the wire."""

from __future__ import annotations

import socket
import threading
import time


class Wire:
    """Send raw bytes, read raw lines: nothing is interpreted or hidden."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.greeting = self.line()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        """One line, CRLF included."""
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed; pending {self.buf[:200]!r}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line + b"\r\n"

    def lines_until(self, *stop: type[BaseException]) -> list[bytes]:
        """Every line received until reading the next raises one of *stop* (the peer closed: ConnectionError,
        OSError; nothing more for now, under a short timeout: TimeoutError)."""
        lines = []
        try:
            while True:
                lines.append(self.line())
        except stop:
            pass
        return lines

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ConnectionError("connection closed")
            self.buf += chunk
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def until_tagged(self, tag: bytes) -> list[bytes]:
        """Every line up to and including the tagged completion of *tag*."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line.startswith(tag + b" "):
                return lines

    def cmd(self, tag: bytes, text: bytes) -> list[bytes]:
        self.send(tag + b" " + text + b"\r\n")
        return self.until_tagged(tag)

    def pipelined(self, commands: list[bytes]) -> list[bytes]:
        """*commands* (without tags) sent in ONE write, tagged c0, c1 ...; their tagged answers
        in the order they come (untagged responses and continuations skipped)."""
        tags = [b"c%d" % i for i in range(len(commands))]
        self.send(b"".join(t + b" " + c + b"\r\n" for t, c in zip(tags, commands)))
        out = []
        for _ in tags:
            line = self.line()
            while line.startswith((b"*", b"+")):
                line = self.line()
            out.append(line)
        return out

    def login(self, user: str = "alice", password: str = "secret") -> None:
        reply = self.cmd(b"L", b'LOGIN "%s" "%s"' % (user.encode(), password.encode()))
        assert reply[-1].startswith(b"L OK"), reply

    def closed(self, timeout: float = 30.0) -> bool:
        """True once the peer has closed the connection (rest of the data discarded)."""
        deadline = time.monotonic() + timeout
        self.sock.settimeout(0.5)
        while time.monotonic() < deadline:
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                continue
            except OSError:
                return True
        return False

    def close(self) -> None:
        self.sock.close()


def wait_for(predicate, what: str, timeout: float = 30.0):
    """*predicate()*'s first true value, polled; fails the test after *timeout* s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.05)


def at_once(wires: list[Wire], scripts: list[bytes], tags: list[bytes], delays: list[float] | None = None) -> list[bytes]:
    """Write each script (whole lines) on its own connection at the same moment (a barrier; then
    each its delay, if given); the answer tagged with its tag (the script's last command's) of each."""
    barrier, answers = threading.Barrier(len(wires)), [b""] * len(wires)

    def side(i: int) -> None:
        barrier.wait()
        if delays and delays[i]:
            time.sleep(delays[i])
        wires[i].send(scripts[i])
        answers[i] = wires[i].until_tagged(tags[i])[-1]

    sides = [threading.Thread(target=side, args=(i,)) for i in range(len(wires))]
    for t in sides:
        t.start()
    for t in sides:
        t.join(180)
    return answers
