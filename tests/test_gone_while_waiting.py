"""A client that goes while its command waits on a backend that stalled (probe 8 of stop 48): the proxy,
which reads no more of it or takes its end of input for a half-close, never wrote to it, so never saw it
go; the session, and its place under ``max_connections_per_user``, lasted as long as the stall (15
minutes of half-close wait at most). Now a session whose relayed commands got no answer for 15 s is
sent ``* OK Hang in there..`` at a response boundary, as Dovecot does during its long commands: a gone
client's socket then fails the write and the session ends. A scripted backend: Dovecot cannot be made
to stall on demand."""

from __future__ import annotations

import socket
import time

import pytest
from imapwire import Wire
from test_stall_first_contact import silent_backend  # noqa: F401 (a fixture)

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")


def _logged_in(proxy, user: str = "bob") -> tuple[Wire, bytes]:
    w = Wire(proxy.host, proxy.port, timeout=30)
    w.send(b"l LOGIN " + user.encode() + b" secret\r\n")
    return w, [line for line in w.until_tagged(b"l") if line.startswith(b"l ")][0]


@pytest.mark.parametrize("close", ["close", "reset"])
def test_a_client_gone_while_its_command_waits_on_a_stalled_backend_frees_its_place(
        proxy_factory, silent_backend, close):  # noqa: F811
    port, heard = silent_backend
    b4 = {"endpoint": f"tcp:host=127.0.0.1:port={port}", "url": f"imap://127.0.0.1:{port}", "tls": "none",
          "master_user": MASTER_USER, "master_password": MASTER_PASSWORD}
    proxy = proxy_factory({"backends": {"b4": b4}}, rules=[{"user": "bob", "mailbox": "*", "backend": "b4"}],
                          max_connections_per_user=1)
    w, answer = _logged_in(proxy)
    assert answer.startswith(b"l OK"), answer
    w.send(b"a NOOP\r\nb SEARCH ALL\r\n")
    deadline = time.monotonic() + 10
    while b"NOOP" not in heard and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b"NOOP" in heard, heard
    if close == "reset":
        w.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    w.sock.close()
    refused = 0
    deadline = time.monotonic() + 75  # two stayalive lines and a margin
    while True:
        w2, answer = _logged_in(proxy)
        w2.sock.close()
        if answer.startswith(b"l OK"):
            break
        assert b"[LIMIT]" in answer, answer
        refused += 1
        assert time.monotonic() < deadline, f"bob still refused after 75 s ({refused} tries): the gone session stays"
        time.sleep(1)
