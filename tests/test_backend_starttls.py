"""A backend with ``tls = "starttls"`` that is not what it should be (a man in the middle
between the proxy and Dovecot): the login is refused NO [UNAVAILABLE] and the client's
password never leaves in clear text. Scripted backends: Dovecot cannot be made to do this.

On main the proxy read what came after the backend's STARTTLS OK in the same read as if it
had come under TLS: completions injected for its next tags answered its CAPABILITY and its
login, and the client got ``OK Logged in`` for a wrong password, no certificate checked.
"""

from __future__ import annotations

import socket
import threading

import pytest
from imapwire import Wire

INJECTED = b"".join(b"rp%d OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] injected\r\n" % i for i in range(2, 9))
SCRIPTS = {
    # after its OK, in the same write: completions for the proxy's next commands
    "injection": (b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] hi\r\n", b" OK Begin TLS\r\n" + INJECTED),
    # a downgrade: no STARTTLS offered (greeting, and CAPABILITY when asked)
    "downgrade": (b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR] hi\r\n",
                  b"* CAPABILITY IMAP4rev1 AUTH=PLAIN SASL-IR\r\n%(tag)s OK done\r\n"),
    "drops in the handshake": (b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", b" OK Begin TLS\r\n"),
    "refuses STARTTLS": (b"* OK [CAPABILITY IMAP4rev1 STARTTLS] hi\r\n", b" NO not today\r\n"),
    # tls = "implicit": what it reads is the ClientHello; it closes, or greets in clear text
    "implicit, drops in the handshake": (None, b""),
    "implicit, clear-text greeting": (None, b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] hi\r\n"),
}


def scripted_backend(greeting: bytes | None, answer: bytes, received: list[bytes]) -> int:
    """A backend on 127.0.0.1 that greets, answers the first command, then reads (and keeps)
    whatever comes and closes after the first read (a handshake it cannot do)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            with conn:
                if greeting is None:  # implicit TLS: the proxy speaks first
                    received.append(conn.recv(65536))
                    conn.sendall(answer)
                    continue
                conn.sendall(greeting)
                f = conn.makefile("rb")
                line = f.readline()
                received.append(line)
                tag = line.split(b" ", 1)[0]
                conn.sendall(answer % {b"tag": tag} if b"%(tag)s" in answer else tag + answer)
                conn.settimeout(5)
                try:
                    received.append(conn.recv(65536))
                except OSError:
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return srv.getsockname()[1]


@pytest.mark.parametrize("script", SCRIPTS, ids=SCRIPTS.keys())
def test_a_backend_that_is_not_what_it_should_be_gets_no_login(proxy_factory, fleet, script):
    received: list[bytes] = []
    port = scripted_backend(*SCRIPTS[script], received)
    proxy = proxy_factory({"backends": {"b1": {
        "endpoint": f"tcp:host=127.0.0.1:port={port}", "url": f"imap://127.0.0.1:{port}",
        "tls": "implicit" if script.startswith("implicit") else "starttls", "ca": str(fleet.tls.ca_cert), "connect_timeout": 2}}})
    w = Wire(proxy.host, proxy.port)
    assert w.cmd(b"a", b"LOGIN alice wrongpassword") == [b"a NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"]
    w.close()
    assert received and not any(b"wrongpassword" in r or b"AUTHENTICATE" in r or b"LOGIN" in r for r in received)
    assert "b1" in proxy.stderr_text() and "Traceback" not in proxy.stderr_text()
