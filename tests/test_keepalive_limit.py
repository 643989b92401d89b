"""Parked backend connections (keepalive.py) hold the user's slots on a real Dovecot
(mail_max_userip_connections, 3 here): a login of the same user under another key
(LOGIN after AUTHENTICATE PLAIN with an authzid) must not be refused ``NO [LIMIT]`` for
them, since it is not without keepalive. Seen on main: ``L NO [LIMIT] Maximum number of
connections from user+IP exceeded (mail_max_userip_connections=3)`` with 3 parked."""

from __future__ import annotations

import base64

import pytest
from conftest import dovecot_root
from imapwire import Wire
from test_keepalive import metric, until_parked

from referral_proxy.fleet import Dovecot, free_port


@pytest.fixture(scope="module")
def three_per_user():
    d = Dovecot("userip3", "127.0.0.24", dovecot_root() / "userip3", extra_config="mail_max_userip_connections = 3\n")
    d.start()
    yield d
    d.stop()


def test_a_login_refused_for_the_users_parked_connections_gets_them_logged_out(proxy_factory, three_per_user):
    port = free_port()
    backend = {"endpoint": three_per_user.endpoint, "url": three_per_user.url, "tls": "none"}
    proxy = proxy_factory({"backends": {"lim": backend}, "map": {"default": "lim"},
                           "metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}}, backend_keepalive=60)
    proxy.metrics_port = port
    plain = b"AUTHENTICATE PLAIN " + base64.b64encode(b"alice\0alice\0secret")  # authzid: another key than LOGIN's
    sessions = [Wire(proxy.host, proxy.port) for _ in range(3)]
    for w in sessions:
        assert w.cmd(b"A", plain)[-1].startswith(b"A OK")
    for w in sessions:
        assert w.cmd(b"Z", b"LOGOUT")[-1].startswith(b"Z OK")
        w.sock.close()
    until_parked(proxy, 3)  # three slots of alice's taken on the backend
    w = Wire(proxy.host, proxy.port)
    reply = w.cmd(b"L", b"LOGIN alice secret")
    assert reply[-1].startswith(b"L OK"), reply
    assert w.cmd(b"S", b"SELECT INBOX")[-1].startswith(b"S OK")
    assert metric(port, "referral_proxy_backend_parked") == 0  # the other key's, logged out for it
    assert w.cmd(b"Z", b"LOGOUT")[-1].startswith(b"Z OK")
    until_parked(proxy, 1)
    w = Wire(proxy.host, proxy.port)
    reply = w.cmd(b"L", b"LOGIN alice wrong")  # a wrong password is refused as ever, and touches nothing
    assert reply[-1].startswith(b"L NO [AUTHENTICATIONFAILED]"), reply
    assert metric(port, "referral_proxy_backend_parked") == 1
