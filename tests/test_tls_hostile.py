"""Hostile clients over TLS, the proxy in front of real Dovecot: a TLS handshake that never
ends holds a connection no longer than the login timeout (the BYE it would be sent cannot
leave before the handshake, so waiting CLOSE_GRACE for it only kept the slot); behind a
``haproxy:ssl:`` listener the PROXY header comes in clear text before TLS (as HAProxy sends
it) and a client that does not read its 50 MB FETCH holds bounded memory.
"""

from __future__ import annotations

import hashlib
import re
import select
import socket
import ssl
import time

import pytest
from imapwire import wait_for
from procmem import reset_peak, rss

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


MiB = 1024 * 1024


def test_behind_haproxy_ssl_the_header_comes_first_and_a_client_that_does_not_read_holds_little(
        proxy_factory, clean_mail, client_tls):
    """On main the header was wanted inside TLS (Twisted's layering): HAProxy's, in clear text,
    failed the handshake; sent inside TLS, the session never registered its output's back-pressure
    (the handshake's end was not passed through the header's wrapper) and the proxy held the
    whole FETCH: +46 MiB resident for 50 MiB not read (0.05 MiB now)."""
    body = (b"x" * 76 + b"\r\n") * (50 * MiB // 78)
    message = b"From: a@example.test\r\nSubject: big\r\n\r\n" + body
    direct = clean_mail["b1"].client("alice")
    assert direct.append("INBOX", None, None, message)[0] == "OK"
    direct.logout()
    port = free_port("127.0.0.1")
    listen = [f"tcp:{free_port('127.0.0.1')}:interface=127.0.0.1",
              f"haproxy:ssl:{port}:interface=127.0.0.1:privateKey={client_tls.key}:certKey={client_tls.cert}"]
    proxy = proxy_factory({"proxy": {"listen": listen, "allow_plaintext_login": False,
                                     "tls_cert": str(client_tls.cert), "tls_key": str(client_tls.key)}})
    context = ssl.create_default_context(cafile=str(client_tls.ca_cert))
    raw = socket.create_connection(("127.0.0.1", port))
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    raw.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 993\r\n")
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    f = tls.makefile("rb")
    greeting = f.readline()
    assert greeting.startswith(b"* OK [CAPABILITY ") and b"AUTH=PLAIN" in greeting
    assert b"STARTTLS" not in greeting and b"LOGINDISABLED" not in greeting  # it is TLS already
    tls.sendall(b"l LOGIN alice secret\r\ne EXAMINE INBOX\r\n")
    while not f.readline().startswith(b"e OK"):
        pass
    base, _ = rss(proxy.pid)
    reset_peak(proxy.pid)
    tls.sendall(b"f FETCH 1 BODY.PEEK[]\r\n")
    # Another client is served meanwhile (it also lets the proxy fill every buffer it may).
    for _ in range(3):
        other = proxy.imaplib()
        other.starttls(context)
        assert other.login("alice", "secret")[0] == "OK" and other.noop()[0] == "OK"
        other.logout()
        time.sleep(1)
    _, peak = rss(proxy.pid)
    assert peak - base < 16 * MiB, f"{(peak - base) / MiB:.1f} MiB held for a client that does not read"
    assert f.readline() == b"* 1 FETCH (BODY[] {%d}\r\n" % len(message)
    assert hashlib.sha256(f.read(len(message))).digest() == hashlib.sha256(message).digest()
    assert f.readline() == b")\r\n" and f.readline().startswith(b"f OK")
    tls.close()
    assert re.search(r"session start session=\d+ client=192\.0\.2\.7:40000 ", proxy.stderr_text())


def test_behind_haproxy_ssl_a_header_and_the_client_hello_in_one_write(proxy_factory, client_tls):
    """What follows the header in the same read is the start of TLS, not IMAP."""
    port = free_port("127.0.0.1")
    listen = [f"tcp:{free_port('127.0.0.1')}:interface=127.0.0.1",
              f"haproxy:ssl:{port}:interface=127.0.0.1:privateKey={client_tls.key}:certKey={client_tls.cert}"]
    proxy = proxy_factory({"proxy": {"listen": listen}})
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context(cafile=str(client_tls.ca_cert)).wrap_bio(incoming, outgoing,
                                                                                server_hostname="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)

    def exchange() -> None:
        """Send what TLS has to send; read once, into TLS."""
        out = outgoing.read()
        if out:
            sock.sendall(out)
        data = sock.recv(65536)
        assert data, "closed by the proxy"
        incoming.write(data)

    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    sock.sendall(b"PROXY TCP6 2001:db8::7 ::1 40000 993\r\n" + outgoing.read())  # one write
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            exchange()
    tls.write(b"l LOGIN alice secret\r\n")
    received = b""
    while b"\r\nl " not in received:
        exchange()
        try:
            while True:
                received += tls.read(65536)
        except ssl.SSLWantReadError:
            pass
    assert received.startswith(b"* OK [CAPABILITY ") and b"\r\nl OK " in received
    sock.close()
    assert re.search(r"session start session=\d+ client=\[2001:db8::7\]:40000 ", proxy.stderr_text())


@pytest.mark.parametrize("trusted,served", [(["127.0.0.0/8"], True), (["10.0.0.0/8"], False)])
def test_haproxy_ssl_with_workers_and_trusted_networks(proxy_factory, client_tls, trusted, served):
    """The workers' inherited listeners: TLS after the header there too, and a header only from
    a peer in trusted_networks when it is set (closed without a word otherwise)."""
    port = free_port("127.0.0.1")
    listen = [f"tcp:{free_port('127.0.0.1')}:interface=127.0.0.1",
              f"haproxy:ssl:{port}:interface=127.0.0.1:privateKey={client_tls.key}:certKey={client_tls.cert}"]
    proxy = proxy_factory({"proxy": {"workers": 2, "trusted_networks": trusted, "listen": listen}})
    context = ssl.create_default_context(cafile=str(client_tls.ca_cert))
    for _ in range(4 if served else 1):  # whichever worker takes it
        if not served:
            try:
                raw = socket.create_connection(("127.0.0.1", port), timeout=30)
            except ConnectionResetError:
                continue  # closed before connect() read its own outcome: closed all the same
            assert still_open([raw], 10) == []
            raw.close()
            continue
        raw = socket.create_connection(("127.0.0.1", port), timeout=30)
        raw.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 993\r\n")
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            f = tls.makefile("rb")
            assert f.readline().startswith(b"* OK")
            tls.sendall(b"l LOGIN alice secret\r\n")
            assert f.readline().startswith(b"l OK")
    assert "Traceback" not in proxy.stderr_text()
