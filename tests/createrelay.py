"""TCP relays in front of a real Dovecot for tests: Relay (the base, also test_moves_drain's holder), SlowRelay
(some answers late) and RefusingRelay, which answers some CREATEs as Dovecot 2.3.19 now and then does.

Dovecot 2.3.19 (maildir, ACL plugin) answers a CREATE of a new name ``NO [ALREADYEXISTS] Mailbox
already exists`` and yet makes the mailbox, while other sessions of the same user LIST or MYRIGHTS
(measured: 9 and 22 of 400 CREATEs; mailops.create). Too rare to hit a chosen CREATE on purpose, so
this relay passes each CREATE whose mailbox matches *pattern* on to the backend, which makes it, and
turns its tagged ``OK`` into that answer. Everything else is relayed as it is.
"""

from __future__ import annotations

import re
import socket
import threading
import time

REFUSED = b"NO [ALREADYEXISTS] Mailbox already exists (0.004 + 0.000 + 0.003 secs)."


class Relay(threading.Thread):
    """A TCP relay on 127.0.0.1 (``port``) in front of *host*:*port*: each connection's two directions
    pumped by ``_pump(src, dst, up)`` (*up*: client to backend) on their own threads."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(daemon=True)
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]

    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def run(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self.listener.close()


class SlowRelay(Relay):
    """Relays as it is, each response chunk holding *pattern* passed on *seconds* late (a backend slow to answer)."""

    def __init__(self, host: str, port: int, pattern: bytes, seconds: float) -> None:
        super().__init__(host, port)
        self.pattern, self.seconds = pattern, seconds

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while data := src.recv(65536):
                if not up and self.pattern in data:
                    time.sleep(self.seconds)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)


class RefusingRelay(Relay):
    """``refused``: the names whose CREATE it answered NO (having let the backend make them); the
    arguments, for another *command* (a RENAME: ``old new``, done by the backend, answered NO)."""

    def __init__(self, host: str, port: int, pattern: bytes, command: bytes = b"CREATE") -> None:
        super().__init__(host, port)
        self.pattern = re.compile(rb"^(\S+) " + command + rb" (" + pattern + rb")$", re.IGNORECASE)
        self.refused: list[bytes] = []
        self.lock = threading.Lock()
        self.tags: dict[tuple[int, bytes], bytes] = {}  # (the backend socket's fd, tag) -> name: CREATEs to refuse
        self.cuts = 0  # so many matching commands are not passed on: the connection is closed (a backend gone)

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        (self._up if up else self._down)(src, dst)

    def _up(self, src: socket.socket, dst: socket.socket) -> None:
        pending = b""
        try:
            while data := src.recv(65536):
                pending += data
                *lines, pending = pending.split(b"\r\n")
                for line in lines:
                    if m := self.pattern.match(line):
                        with self.lock:
                            if self.cuts:  # the connection cut instead: the backend never sees the command
                                self.cuts -= 1
                                self.refused.append(m.group(2))
                                return
                            self.tags[dst.fileno(), m.group(1)] = m.group(2)
                    dst.sendall(line + b"\r\n")
        except OSError:
            pass
        finally:
            _close(src, dst)

    def _down(self, src: socket.socket, dst: socket.socket) -> None:
        pending = b""
        key = src.fileno()
        try:
            while data := src.recv(65536):
                pending += data
                *lines, pending = pending.split(b"\r\n")
                out = []
                for line in lines:
                    tag, _, rest = line.partition(b" ")
                    with self.lock:
                        name = self.tags.pop((key, tag), None) if rest.startswith((b"OK", b"NO", b"BAD")) else None
                        if name is not None and rest.startswith(b"OK"):
                            self.refused.append(name)
                        else:
                            name = None
                    out.append(tag + b" " + REFUSED if name is not None else line)
                if out:
                    dst.sendall(b"\r\n".join(out) + b"\r\n")
        except OSError:
            pass
        finally:
            _close(src, dst)


def _close(*socks: socket.socket) -> None:
    for s in socks:
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
