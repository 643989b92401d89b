"""SIGTERM while a client reads nothing of a big answer: the proxy says how many it closed anyway, no traceback.

Probe r6 (stop 50): stopService waits SHUTDOWN_GRACE for the clients' connections to close; the timeout
cancelled each one still open, whose Deferred had no errback: "Unhandled error in Deferred ...
CancelledError" at critical level, and the warning that names them was never logged.
"""

from __future__ import annotations

import signal
import socket
import time

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


def test_a_second_sigterm_while_stopping_logs_no_error(fleet, clean_mail, proxy_factory):
    """Probe h3 of stop 58: a second SIGTERM 5-15 ms after the first logged ``[twisted.internet.base#critical]
    ... ReactorNotRunning`` with a traceback (4 of 12): Twisted's handler stopped the reactor twice. (Later,
    once Twisted has put the default handlers back, a second SIGTERM ends the process: not looked at here.)"""
    logs = []
    for delay in (0.0, 0.002, 0.005):
        proxy = proxy_factory()
        c = Wire(proxy.host, proxy.port)
        c.login()  # a session to say BYE to: the stop takes a moment
        proxy.send_signal(signal.SIGTERM)
        time.sleep(delay)
        proxy.send_signal(signal.SIGTERM)
        assert proxy.process is not None
        proxy.process.wait(60)
        c.close()
        logs.append(proxy.stderr_text())
    bad = [log[-2000:] for log in logs if "ReactorNotRunning" in log or "Traceback" in log or "#critical" in log]
    assert bad == [], bad
