"""Dovecot's own MOVE is not atomic against another session's MOVE of the same message:
both sessions answer OK and the message ends up in both destinations.

Not collected (a fact about the backend, not about the proxy): ``python3 tests/dovecot_move_race.py 60``.
Measured at stop 28 on Dovecot 2.3.19.1, maildir: 31 of 60 rounds left the message twice.
It bounds what the move drain (drain.py) can promise: its UID MOVE to a private mailbox and a
client's UID MOVE already in flight at the source when a move's reservation landed can both
take one message (soak seed 12092: an admin ``move`` of Shared while a client's MOVE from
Shared to Archive, within one backend, waited on Dovecot's lock)."""

from __future__ import annotations

import socket
import sys
import threading

from referral_proxy.fleet import Dovecot, make_root


def _connect(d: Dovecot) -> tuple[socket.socket, object]:
    s = socket.create_connection((d.host, d.port))
    f = s.makefile("rb")
    f.readline()
    return s, f


def _cmd(s: socket.socket, f, tag: bytes, line: bytes) -> list[bytes]:
    s.sendall(tag + b" " + line + b"\r\n")
    out = []
    while True:
        got = f.readline()
        out.append(got)
        if got.startswith(tag + b" ") or not got:
            return out


def _messages(s: socket.socket, f, box: bytes) -> int:
    line = _cmd(s, f, b"t", b"STATUS " + box + b" (MESSAGES)")[0]
    return int(line.split(b"MESSAGES ")[1].split(b")")[0])


def main(rounds: int) -> int:
    d = Dovecot("b1", "127.0.0.9", make_root("rp-move-race-") / "b1")
    d.start()
    try:
        s, f = _connect(d)
        _cmd(s, f, b"a", b"LOGIN alice secret")
        for box in (b"A", b"B", b"src"):
            _cmd(s, f, b"c", b"CREATE " + box)
        twice = 0
        for i in range(rounds):
            msg = b"Message-ID: <m%d@race>\r\n\r\nbody\r\n" % i
            _cmd(s, f, b"p", b"APPEND src {%d+}\r\n" % len(msg) + msg)
            movers = []
            for _ in range(2):
                s2, f2 = _connect(d)
                _cmd(s2, f2, b"l", b"LOGIN alice secret")
                _cmd(s2, f2, b"s", b"SELECT src")
                movers.append((s2, f2))
            threads = [threading.Thread(target=_cmd, args=(*movers[k], b"m", b"UID MOVE 1:* " + box))
                       for k, box in enumerate((b"A", b"B"))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for s2, _f2 in movers:
                s2.close()
            if sum(_messages(s, f, box) for box in (b"A", b"B", b"src")) != 1:
                twice += 1
            for box in (b"A", b"B"):
                _cmd(s, f, b"x", b"SELECT " + box)
                _cmd(s, f, b"y", b"STORE 1:* +FLAGS (\\Deleted)")
                _cmd(s, f, b"z", b"EXPUNGE")
            _cmd(s, f, b"u", b"UNSELECT")
        print(f"{rounds} rounds of two concurrent UID MOVEs of one message: {twice} left it twice")
        return 0
    finally:
        d.stop()


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 60))
