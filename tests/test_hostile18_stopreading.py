"""hostile18: a client that stops reading while a 20 MB FETCH is under way and keeps sending
commands: once it reads again, every command is answered once, in order, the body whole, with
the connection up (the proxy stops reading from it meanwhile: flow.py)."""

from __future__ import annotations

import socket
import time

from referral_proxy.imap.framing import NEED_DATA, Framer, Line, LiteralData

SIZE = 20 * 1024 * 1024


def test_stopped_reader_with_a_big_fetch_gets_everything_after(fleet, clean_mail, proxy_factory):
    proxy = proxy_factory()
    body = b"Message-Id: <big@h18>\r\n\r\n" + (b"x" * 998 + b"\r\n") * (SIZE // 1000)
    with fleet["b1"].client("carol") as m:
        assert m.append("INBOX", None, None, body)[0] == "OK"
    s = socket.create_connection((proxy.host, proxy.port), timeout=60)
    s.sendall(b"L LOGIN carol secret\r\ns SELECT INBOX\r\nf FETCH 1 BODY[]\r\n")
    s.settimeout(0.5)
    sent = 0
    for i in range(300):  # keep sending while not reading; stop when the proxy stops taking them
        try:
            s.send(b"n%d NOOP\r\n" % i)
            sent = i + 1
        except (TimeoutError, BlockingIOError):
            break
    time.sleep(2)
    s.settimeout(60)
    framer = Framer(64 * 1024 * 1024, auto_accept=True)
    tags, literal = [], 0
    while len(tags) < 3 + sent:
        ev = framer.next_event()
        if ev is NEED_DATA:
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {tags[-3:]}"
            framer.receive_data(chunk)
        elif isinstance(ev, LiteralData):
            literal += len(ev.data)
        elif isinstance(ev, Line) and ev.literal is None and not ev.data.startswith((b"*", b")", b" ")):
            tags.append(ev.data.split(b" ")[:2])
    assert tags == [[b"L", b"OK"], [b"s", b"OK"], [b"f", b"OK"]] + [[b"n%d" % i, b"OK"] for i in range(sent)]
    assert literal == len(body)
    s.close()
