"""A password of 8-bit bytes that are not UTF-8 (a Latin-1 password set long ago) reaches the backend
byte for byte, as a direct LOGIN does. Seen on main: the proxy decoded the LOGIN arguments with
"replace", so ``s\\xe9cret`` reached Dovecot as ``s\\xef\\xbf\\xbdcret``: NO [AUTHENTICATIONFAILED]
for a password Dovecot accepts directly; and any two such passwords were the same to keepalive.py's
key (a parked connection of one taken with the other is refused only because neither works)."""

from __future__ import annotations

import pytest
from conftest import dovecot_root
from imapwire import Wire
from test_keepalive import until_parked

from referral_proxy.fleet import Dovecot, free_port

LATIN1 = "s\udce9cret"  # the bytes s \xe9 c r e t (surrogateescape)


@pytest.fixture(scope="module")
def latin1_backend():
    d = Dovecot("latin1", "127.0.0.25", dovecot_root() / "latin1", users={"erin": LATIN1})
    d.start()
    yield d
    d.stop()


def _login(host: str, port: int, password: bytes) -> bytes:
    """LOGIN erin with *password* as a synchronizing literal; the tagged answer."""
    w = Wire(host, port)
    w.send(b"L LOGIN erin {%d}\r\n" % len(password))
    assert w.line().startswith(b"+"), "no continuation"
    w.send(password + b"\r\n")
    answer = w.until_tagged(b"L")[-1]
    w.cmd(b"Z", b"LOGOUT")
    w.close()
    return answer


@pytest.mark.parametrize("keepalive", [0, 60])
def test_an_8bit_password_reaches_the_backend_as_it_was_sent(proxy_factory, latin1_backend, keepalive):
    d = latin1_backend
    assert _login(d.host, d.port, b"s\xe9cret").startswith(b"L OK"), "Dovecot itself refuses it"
    assert _login(d.host, d.port, b"s\xe8cret").startswith(b"L NO")
    backend = {"endpoint": d.endpoint, "url": d.url, "tls": "none"}
    port = free_port()
    proxy = proxy_factory({"backends": {"l1": backend}, "map": {"default": "l1"},
                           "metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}}, backend_keepalive=keepalive)
    proxy.metrics_port = port
    assert _login(proxy.host, proxy.port, b"s\xe9cret").startswith(b"L OK")
    if keepalive:
        until_parked(proxy, 1)
    assert _login(proxy.host, proxy.port, b"s\xe8cret").startswith(b"L NO [AUTHENTICATIONFAILED]")
