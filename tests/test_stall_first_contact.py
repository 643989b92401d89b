"""A backend that takes the login and then never answers, met by a session's first command there
(probe 3 of stop 48): a COPY across (its destination check, LIST) and a STATUS (the slow path, no
connection ready) waited for ever, ``* OK Hang in there..`` every 15 s keeping the client from timing
out. Both are reads the proxy bounds by ``answer_timeout`` (stall.py). A scripted backend: Dovecot
cannot be made to log in and then stall on demand."""

from __future__ import annotations

import socket
import threading

import pytest
from imapwire import Wire
from movecheck import seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

CAPS = b"IMAP4rev1 ID LITERAL+ SASL-IR AUTH=PLAIN IDLE UNSELECT MULTIAPPEND UIDPLUS"


def _login_then_silent(conn: socket.socket, heard: list[bytes]) -> None:
    """Greets, answers up to the login, then reads every command and answers none."""
    try:
        _serve(conn, heard)
    except OSError:  # (the proxy cut it: what is tested)
        pass


def _serve(conn: socket.socket, heard: list[bytes]) -> None:
    conn.sendall(b"* OK [CAPABILITY " + CAPS + b"] fake ready\r\n")
    logged = False
    for line in conn.makefile("rb"):
        tag, _, rest = line.partition(b" ")
        if logged:
            heard.append(rest.strip())
        elif rest.upper().startswith((b"LOGIN", b"AUTHENTICATE")):
            logged = True
            conn.sendall(tag + b" OK [CAPABILITY " + CAPS + b"] Logged in\r\n")
        elif rest.upper().startswith(b"CAPABILITY"):
            conn.sendall(b"* CAPABILITY " + CAPS + b"\r\n" + tag + b" OK done\r\n")
        else:
            conn.sendall(tag + b" OK done\r\n")


@pytest.fixture
def silent_backend():
    server = socket.create_server(("127.0.0.1", 0))
    heard: list[bytes] = []
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=_login_then_silent, args=(conn, heard), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], heard
    server.close()
    for conn in conns:
        conn.close()


def _answer(w: Wire, tag: bytes, seconds: float = 60.0) -> bytes:
    """The tagged answer to *tag*, waiting at most *seconds* (stayalive lines skipped)."""
    w.sock.settimeout(seconds)
    return [line for line in w.until_tagged(tag) if line.startswith(tag + b" ")][0]


@pytest.mark.parametrize("command", [b"STATUS S4/x (MESSAGES)", b"COPY 1 S4/x"])
def test_a_first_command_to_a_backend_that_stalls_after_login_is_answered(proxy_factory, fleet, silent_backend,
                                                                          command):
    port, heard = silent_backend
    seed(fleet["b1"], "alice", "INBOX", ["first@t"])
    b4 = {"endpoint": f"tcp:host=127.0.0.1:port={port}", "url": f"imap://127.0.0.1:{port}", "tls": "none",
          "answer_timeout": 2, "connect_timeout": 2, "master_user": MASTER_USER, "master_password": MASTER_PASSWORD}
    proxy = proxy_factory({"backends": {"b4": b4}}, rules=[{"mailbox": "S4/*", "backend": "b4"}])
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("alice")
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    w.send(b"c " + command + b"\r\n")
    assert _answer(w, b"c").startswith(b"c NO [UNAVAILABLE]")
    assert heard, "the command never reached the silent backend"
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")  # the session goes on
