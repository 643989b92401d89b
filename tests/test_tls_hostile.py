"""Hostile clients over TLS, the proxy in front of real Dovecot: a TLS handshake that never
ends holds a connection no longer than the login timeout (the BYE it would be sent cannot
leave before the handshake, so waiting CLOSE_GRACE for it only kept the slot).
"""

from __future__ import annotations

import select
import socket
import time

import pytest
from imapwire import wait_for

from referral_proxy.fleet import free_port, make_tls_material
from referral_proxy.session import CLOSE_GRACE


@pytest.fixture
def client_tls(tmp_path):
    return make_tls_material(tmp_path / "client-tls", ["127.0.0.1"])


def still_open(socks: list[socket.socket], most: float) -> list[socket.socket]:
    """Those of *socks* the proxy has not closed (reset or FIN) after at most *most* seconds."""
    deadline, open_ = time.monotonic() + most, list(socks)
    while open_ and time.monotonic() < deadline:
        ready, _, _ = select.select(open_, [], [], 0.2)
        for s in ready:
            try:
                if not s.recv(65536):
                    open_.remove(s)
            except OSError:
                open_.remove(s)
    return open_


def test_a_tls_handshake_that_never_ends_is_dropped_at_the_login_timeout(proxy_factory, client_tls):
    """STARTTLS then silence or half a ClientHello, and the same on an implicit-TLS listener:
    on main each was held login_timeout + CLOSE_GRACE (1 + 30 s), its BYE never sent."""
    imaps = free_port("127.0.0.1")
    listen = [f"tcp:{free_port('127.0.0.1')}:interface=127.0.0.1",
              f"ssl:{imaps}:interface=127.0.0.1:privateKey={client_tls.key}:certKey={client_tls.cert}"]
    proxy = proxy_factory({"proxy": {"tls_cert": str(client_tls.cert), "tls_key": str(client_tls.key),
                                     "login_timeout": 1, "listen": listen}})
    half_hello = b"\x16\x03\x01\x02\x00\x01"  # a record of 512 bytes announced, one sent
    socks = []
    for then in (b"", half_hello):
        s = socket.create_connection((proxy.host, proxy.port))
        assert s.makefile("rb").readline().startswith(b"* OK")
        s.sendall(b"s STARTTLS\r\n")
        socks.append(s)
        time.sleep(0.1)  # the OK is out and TLS started before the handshake's bytes come
        if then:
            s.sendall(then)
        s = socket.create_connection(("127.0.0.1", imaps))
        s.sendall(then)
        socks.append(s)
    try:
        assert still_open(socks, CLOSE_GRACE / 2) == []
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: proxy.stderr_text().count("outcome=login_timeout") == 4, "four login timeouts logged")
