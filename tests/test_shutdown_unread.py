"""SIGTERM while a client reads nothing of a big answer: the proxy says how many it closed anyway, no traceback.

Probe r6 (stop 50): stopService waits SHUTDOWN_GRACE for the clients' connections to close; the timeout
cancelled each one still open, whose Deferred had no errback: "Unhandled error in Deferred ...
CancelledError" at critical level, and the warning that names them was never logged.
"""

from __future__ import annotations

import signal
import socket

from imapwire import Wire

BIG = b"Message-Id: <big@shutdown>\r\nSubject: big\r\n\r\n" + (b"y" * 78 + b"\r\n") * 60000  # 4.8 MB


def test_sigterm_with_a_client_that_reads_nothing_names_it_without_a_traceback(fleet, clean_mail, proxy_factory):
    with fleet["b1"].client("alice") as m:
        m.append("INBOX", None, None, BIG)
    proxy = proxy_factory()
    c = Wire(proxy.host, proxy.port)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    c.login()
    assert c.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    c.send(b"f FETCH 1 BODY.PEEK[]\r\n")
    got = b""
    while len(got) < 65536:
        got += c.sock.recv(4096)
    proxy.send_signal(signal.SIGTERM)  # and the client reads no more
    assert proxy.process is not None
    proxy.process.wait(60)
    c.close()
    log = proxy.stderr_text()
    assert "Unhandled error in Deferred" not in log and "Traceback" not in log, log[-3000:]
    assert "1 client connection(s) still open after" in log, log[-3000:]
