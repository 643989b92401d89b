"""The client's real address, the ID sent to backends, the loop guard (no sockets)."""

from __future__ import annotations

import struct
from pathlib import Path

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport

from referral_proxy.config import BackendConfig, parse_config
from referral_proxy.imap.command import parse_arguments
from referral_proxy.origin import LoopGuard, Origin, id_arguments, id_command
from referral_proxy.proxyproto import HeaderFirstFactory


def config(listen=("tcp:1143:interface=127.0.0.1",), trusted=(), ttl=5):
    return parse_config({
        "proxy": {"listen": list(listen), "trusted_networks": list(trusted), "proxy_ttl": ttl},
        "backends": {"b1": {"endpoint": "tcp:host=127.0.0.2:port=143", "url": "imap://127.0.0.2"}},
        "map": {"default": "b1"},
    }, base=Path("."))


def backend(endpoint):
    return BackendConfig(name="x", endpoint=endpoint, url="imap://x")


class Transport(StringTransport):
    def __init__(self, peer, host):
        super().__init__(hostAddress=host, peerAddress=peer)


def test_id_command_as_dovecot_sends_it():
    o = Origin("192.0.2.7", 40000, "127.0.0.1", 1143, session_id="rpabc-3", ttl=5)
    assert id_command(o) == (b'ID ("x-originating-ip" "192.0.2.7" "x-originating-port" "40000" '
                             b'"x-connected-ip" "127.0.0.1" "x-connected-port" "1143" "x-session-id" "rpabc-3" '
                             b'"x-proxy-ttl" "4")')
    o.ttl = 0
    assert id_command(o).endswith(b'"x-proxy-ttl" "0")')


def test_id_arguments():
    args = parse_arguments([b'("X-Originating-IP" "192.0.2.7" "name" NIL "x-proxy-ttl" "3" "odd")'], [])
    assert id_arguments(args) == {"x-originating-ip": "192.0.2.7", "x-proxy-ttl": "3"}
    assert id_arguments(parse_arguments([b"NIL"], [])) == {}
    assert id_arguments(None) == {}
    # control characters in a value: dropped
    assert id_arguments(parse_arguments([b'("x-session-id" ', b")"], [b"a\r\n"])) == {}


def test_trusted_upstream_sets_the_client_and_session_id():
    guard = LoopGuard(config(trusted=["127.0.0.0/8"]))
    origin = guard.origin(Transport(IPv4Address("TCP", "127.0.0.9", 5000), IPv4Address("TCP", "127.0.0.1", 1143)), 7)
    assert origin.trusted and origin.client == "127.0.0.9:5000" and origin.session_id == f"rp{guard.instance}-7"
    guard.received_id(origin, {"x-originating-ip": "2001:db8::5", "x-originating-port": "993",
                               "x-connected-ip": "198.51.100.1", "x-connected-port": "143",
                               "x-session-id": "upstream-42", "x-proxy-ttl": "3"})
    assert origin.client == "[2001:db8::5]:993" and origin.local == "198.51.100.1:143"
    assert origin.session_id == "upstream-42" and origin.ttl == 3 and origin.loop is None
    # garbage is ignored, not believed
    guard.received_id(origin, {"x-originating-ip": "not an ip", "x-session-id": "bad id\x00", "x-proxy-ttl": "x"})
    assert origin.client == "[2001:db8::5]:993" and origin.session_id == "upstream-42" and origin.ttl == 3
    guard.received_id(origin, {"x-originating-ip": "fe80::1%\x1b[31mx"})  # a scope id: no address Dovecot reads
    assert origin.client == "[2001:db8::5]:993" and origin.session_id == "upstream-42" and origin.ttl == 3
    guard.received_id(origin, {"x-session-id": "forged\n"})  # a trailing LF ($ would let it through)
    assert origin.session_id == "upstream-42"


def test_untrusted_client_cannot_say_who_it_is_but_can_lower_the_ttl():
    guard = LoopGuard(config(trusted=["10.0.0.0/8"]))
    origin = guard.origin(Transport(IPv6Address("TCP", "::1", 5000), IPv6Address("TCP", "::1", 1143)), 1)
    guard.received_id(origin, {"x-originating-ip": "192.0.2.1", "x-proxy-ttl": "9", "x-session-id": "other-1"})
    assert origin.client == "[::1]:5000" and origin.ttl == 5 and origin.session_id.startswith("rp")
    guard.received_id(origin, {"x-proxy-ttl": "1"})
    assert origin.ttl == 1 and origin.loop is None
    guard.received_id(origin, {"x-proxy-ttl": "0"})
    assert origin.loop == "x-proxy-ttl is spent"


def test_own_session_id_back_is_a_loop_even_from_an_untrusted_client():
    guard = LoopGuard(config())
    origin = guard.origin(Transport(IPv4Address("TCP", "192.0.2.1", 1), IPv4Address("TCP", "127.0.0.1", 1143)), 1)
    guard.received_id(origin, {"x-session-id": f"rp{guard.instance}-12"})
    assert origin.loop and "its own session" in origin.loop
    other = LoopGuard(config())
    origin2 = other.origin(Transport(IPv4Address("TCP", "192.0.2.1", 1), IPv4Address("TCP", "127.0.0.1", 1143)), 1)
    other.received_id(origin2, {"x-session-id": f"rp{guard.instance}-12"})
    assert origin2.loop is None


def test_is_self():
    guard = LoopGuard(config(listen=["tcp:1143:interface=127.0.0.1", "haproxy:tcp:port=2143", "ssl:993"]))
    assert guard.is_self(backend("tcp:host=127.0.0.1:port=1143"))
    assert guard.is_self(backend("tcp:127.0.0.1:1143"))
    assert guard.is_self(backend("tcp:host=localhost:port=1143"))
    assert guard.is_self(backend("tcp:host=127.0.0.5:port=2143"))  # every interface
    assert guard.is_self(backend("tcp:host=\\:\\:1:port=993"))
    assert guard.is_self(backend("tcp:host=::1:port=993")) is False  # unescaped: no host at all
    assert guard.is_self(backend("tcp:host=127.0.0.2:port=1143")) is False
    assert guard.is_self(backend("tcp:host=192.0.2.1:port=2143")) is False  # maybe us, maybe not: runtime check
    assert guard.is_self(backend("tcp:host=127.0.0.1:port=143")) is False


def proxied_session():
    made = []

    class P(Protocol):
        def connectionMade(self):
            made.append((self.transport.getPeer(), self.transport.getHost()))
            self.transport.write(b"* OK hi\r\n")

        def dataReceived(self, data):
            made.append(data)

    reactor = MemoryReactorClock()
    factory = HeaderFirstFactory(Factory.forProtocol(P), reactor, 10.0)
    proto = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    transport = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.1", 55555))
    proto.makeConnection(transport)
    return proto, transport, made, reactor


def v2_header(src="192.0.2.7", sport=40000, dst="127.0.0.1", dport=1143):
    import ipaddress
    body = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
    return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + struct.pack("!H", len(body)) + body


def test_proxy_v2_header_in_pieces_then_the_session_starts_with_the_client_address():
    proto, transport, made, _ = proxied_session()
    data = v2_header() + b"a1 LOGIN alice secret\r\n"
    for i in range(len(data)):
        proto.dataReceived(data[i:i + 1])
    peer, host = made[0]
    assert (peer.host, peer.port, host.host, host.port) == ("192.0.2.7", 40000, "127.0.0.1", 1143)
    assert b"".join(made[1:]) == b"a1 LOGIN alice secret\r\n"
    assert transport.value() == b"* OK hi\r\n"  # greeted only after the header


def test_proxy_v1_header_and_pipelined_command():
    proto, _, made, _ = proxied_session()
    proto.dataReceived(b"PROXY TCP4 198.51.100.9 127.0.0.1 40001 1143\r\na1 NOOP\r\n")
    assert made[0][0].host == "198.51.100.9" and made[1] == b"a1 NOOP\r\n"


def test_no_header_or_a_slow_one_is_dropped_without_a_word():
    proto, transport, made, _ = proxied_session()
    proto.dataReceived(b"a1 LOGIN alice secret\r\n")
    assert transport.disconnecting or transport.disconnected or made == []
    assert made == [] and transport.value() == b""
    proto, transport, made, reactor = proxied_session()
    proto.dataReceived(b"\r\n\r\n\x00")
    reactor.advance(11)
    assert made == [] and transport.value() == b""



def test_starttls_on_a_proxied_connection_is_seen_as_tls():
    from twisted.internet.interfaces import ISSLTransport
    from zope.interface import alsoProvides

    class TLSCapable(StringTransport):
        def startTLS(self, options, normal=True):
            self.tls = options
            alsoProvides(self, ISSLTransport)

    factory = HeaderFirstFactory(Factory.forProtocol(Protocol), MemoryReactorClock(), 10.0)
    proto = factory.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    transport = TLSCapable()
    proto.makeConnection(transport)
    proto.dataReceived(b"PROXY TCP4 192.0.2.1 127.0.0.1 1 2\r\n")
    assert not ISSLTransport.providedBy(proto)
    proto.startTLS("options")
    assert transport.tls == "options" and ISSLTransport.providedBy(proto)


def test_a_client_behind_a_header_that_names_none_is_not_the_trusted_balancer():
    """Probe d2 (stop 55): PROXY UNKNOWN (or a v2 LOCAL/UNIX header) from a trusted balancer left the
    balancer's address as the client's, and its trust: the client's ID then chose the address Dovecot
    logged and penalised. A header naming the client gives that client's trust, as before."""
    guard = LoopGuard(config(trusted=["10.0.0.0/8"]))
    for header, trusted, client in ((b"PROXY UNKNOWN\r\n", False, "10.0.0.1"),
                                    (b"PROXY TCP4 10.1.2.3 127.0.0.1 4000 1143\r\n", True, "10.1.2.3"),
                                    (b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 1143\r\n", False, "192.0.2.7")):
        proto, _transport, _made, _ = proxied_session()
        proto.dataReceived(header)
        origin = guard.origin(proto, 1)
        assert (origin.trusted, origin.client_ip) == (trusted, client), header
        guard.received_id(origin, {"x-originating-ip": "203.0.113.11"})
        assert origin.client_ip == ("203.0.113.11" if trusted else client), header
