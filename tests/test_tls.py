"""TLS on both sides: verified TLS to real Dovecot backends, STARTTLS and IMAPS for clients."""

from __future__ import annotations

import imaplib
import ssl

import pytest
from imapwire import Wire

from referral_proxy.fleet import free_port, make_tls_material


def test_backend_starttls_verified(proxy_factory, fleet):
    proxy = proxy_factory({"backends": {"b1": {"tls": "starttls", "ca": str(fleet.tls.ca_cert)}}})
    m = proxy.imaplib()
    assert m.login("alice", "secret")[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_backend_implicit_tls_verified(proxy_factory, fleet):
    b1 = fleet["b1"]
    proxy = proxy_factory({"backends": {"b1": {
        "endpoint": f"tcp:host={b1.host}:port={b1.imaps_port}", "url": f"imap://{b1.host}:{b1.imaps_port}",
        "tls": "implicit", "ca": str(fleet.tls.ca_cert)}}})
    m = proxy.imaplib()
    assert m.login("alice", "secret")[0] == "OK"
    m.logout()


@pytest.mark.parametrize("mode", ["starttls", "implicit"])
def test_backend_certificate_mismatch_is_refused(proxy_factory, fleet, tmp_path, mode):
    b1 = fleet["b1"]
    port = b1.port if mode == "starttls" else b1.imaps_port
    # The url names a host the certificate was not made for.
    proxy = proxy_factory({"backends": {"b1": {
        "endpoint": f"tcp:host={b1.host}:port={port}", "url": f"imap://127.0.0.9:{port}",
        "tls": mode, "ca": str(fleet.tls.ca_cert)}}})
    w = Wire(proxy.host, proxy.port)
    assert w.cmd(b"a", b"LOGIN alice secret") == [b"a NO [UNAVAILABLE] Mail server temporarily unavailable\r\n"]
    w.close()
    log = proxy.stderr_text()
    assert "b1" in log and ("verif" in log.lower() or "certificate" in log.lower()), log[-2000:]


def test_backend_untrusted_ca_is_refused(proxy_factory, fleet, tmp_path):
    other = make_tls_material(tmp_path / "other", ["127.0.0.2"])
    proxy = proxy_factory({"backends": {"b1": {"tls": "starttls", "ca": str(other.ca_cert)}}})
    w = Wire(proxy.host, proxy.port)
    assert w.cmd(b"a", b"LOGIN alice secret")[-1].startswith(b"a NO [UNAVAILABLE]")
    w.close()


@pytest.fixture
def client_tls(tmp_path):
    return make_tls_material(tmp_path / "client-tls", ["127.0.0.1"])


def test_client_starttls_required_for_login(proxy_factory, client_tls):
    proxy = proxy_factory({"proxy": {"tls_cert": str(client_tls.cert), "tls_key": str(client_tls.key),
                                     "allow_plaintext_login": False}})
    m = proxy.imaplib()
    assert "STARTTLS" in m.capabilities and "LOGINDISABLED" in m.capabilities
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        m.login("alice", "secret")
    m.starttls(ssl.create_default_context(cafile=str(client_tls.ca_cert)))
    assert "STARTTLS" not in m.capabilities and "AUTH=PLAIN" in m.capabilities
    assert m.login("alice", "secret")[0] == "OK"
    assert m.select("INBOX")[0] == "OK"
    m.logout()


def test_client_implicit_tls_listener(proxy_factory, client_tls):
    port = free_port("127.0.0.1")
    listen = f"ssl:{port}:interface=127.0.0.1:privateKey={client_tls.key}:certKey={client_tls.cert}"
    proxy_factory({"proxy": {"listen": [listen], "allow_plaintext_login": False}})
    context = ssl.create_default_context(cafile=str(client_tls.ca_cert))
    m = imaplib.IMAP4_SSL("127.0.0.1", port, ssl_context=context)
    assert "LOGINDISABLED" not in m.capabilities and "STARTTLS" not in m.capabilities
    assert m.login("alice", "secret")[0] == "OK"
    m.logout()
