"""PROXY protocol headers as the specification reads them (proxyproto.py): a malformed or
oversize header, one from a peer not in trusted_networks, a v2 UDP one closes the
connection without a word and without a traceback; the client address a good one gives is
in one spelling whatever the version (it keys the login penalty and keepalive).

On main Twisted's parsers took ``evil.example``, ``1.2.3.4<ESC>[31m``, ``192.0.2.7`` with
port 99999, an IPv6 address in a TCP4 line and a 3 KB v1 line sent in one piece as the
client; a port ``4x``, an 8-bit address or a line ended by LF alone raised out of
dataReceived (an "Unhandled Error" traceback); ``PROXY UNKNOWN`` was refused; a v2 UNIX
header made the client "?"; v2 gave IPv6 addresses as ``2001:db8:0:0:0:0:0:7``.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from zope.interface import implementer

from referral_proxy.proxyproto import HeaderFirstFactory

PEER = IPv4Address("TCP", "10.0.0.1", 55555)


def v2(cmd=0x21, fam=0x11, body=None, src="192.0.2.7", dst="127.0.0.1", tlv=b""):
    if body is None:
        body = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", 40000, 143)
    body += tlv
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([cmd, fam]) + struct.pack("!H", len(body)) + body


@implementer(IHandshakeListener)
class Session(Protocol):
    def __init__(self, made):
        self.made = made

    def connectionMade(self):
        self.made.append((self.transport.getPeer(), self.transport.getHost()))

    def dataReceived(self, data):
        self.made.append(data)

    def handshakeCompleted(self):
        self.made.append("handshake")


def connect(trusted=(), peer=PEER):
    made: list = []
    reactor = MemoryReactorClock()
    factory = HeaderFirstFactory(Factory.forProtocol(lambda: Session(made)), reactor, 10.0, trusted=trusted)
    proto = factory.buildProtocol(peer)
    transport = StringTransport(peerAddress=peer)
    proto.makeConnection(transport)
    return proto, transport, made, reactor


REFUSED = {
    "v1 port not a number": b"PROXY TCP4 192.0.2.7 127.0.0.1 4x 143\r\n",
    "v1 port over 65535": b"PROXY TCP4 192.0.2.7 127.0.0.1 99999 143\r\n",
    "v1 name, not an address": b"PROXY TCP4 evil.example 127.0.0.1 40000 143\r\n",
    "v1 IPv6 in TCP4": b"PROXY TCP4 2001:db8::1 127.0.0.1 40000 143\r\n",
    "v1 IPv4 in TCP6": b"PROXY TCP6 192.0.2.7 ::1 40000 143\r\n",
    "v1 escape in address": b"PROXY TCP4 1.2.3.4\x1b[31m 127.0.0.1 40000 143\r\n",
    "v1 8-bit address": b"PROXY TCP4 1.2.3.\xff 127.0.0.1 40000 143\r\n",
    # a scope id is any bytes but % and space (ipaddress takes it): the client's address, and x-originating-ip
    # to Dovecot, which cannot read it and blames the proxy's address (probe v6, stop 52)
    "v1 scope id with an escape": b'PROXY TCP6 fe80::1%\x1b[31mEVIL"\\x ::1 4000 143\r\n',
    "v1 scope id": b"PROXY TCP6 fe80::1%eth0 ::1 4000 143\r\n",
    "v1 scope id on the destination": b"PROXY TCP6 2001:db8::7 fe80::1%1 4000 143\r\n",
    "v1 oversize in one piece": b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143 " + b"A" * 3000 + b"\r\n",
    "v1 LF alone": b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\n",
    "v1 missing ports": b"PROXY TCP4 192.0.2.7 127.0.0.1\r\n",
    "v1 extra field": b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143 x\r\n",
    "v1 unknown family": b"PROXY UDP4 192.0.2.7 127.0.0.1 40000 143\r\n",
    "v1 double space": b"PROXY TCP4  192.0.2.7 127.0.0.1 40000 143\r\n",
    "v1 negative port": b"PROXY TCP4 192.0.2.7 127.0.0.1 -1 143\r\n",
    "v2 UDP": v2(fam=0x12),
    "v2 body too short": v2(body=b"\x01\x02"),
    "v2 version 1": b"\r\n\r\n\x00\r\nQUIT\n\x11\x11\x00\x0c" + b"\0" * 12,
    "v2 unknown command": v2(cmd=0x22),
    "v2 unknown family": v2(fam=0x41),
    "neither": b"a1 LOGIN alice secret\r\n",
}


@pytest.mark.parametrize("header", REFUSED.values(), ids=REFUSED.keys())
@pytest.mark.parametrize("pieces", ["whole", "bytewise"])
def test_a_malformed_header_closes_without_a_word(header, pieces):
    proto, transport, made, reactor = connect()
    data = header + b"a1 LOGIN alice secret\r\n"
    chunks = [data] if pieces == "whole" else [data[i:i + 1] for i in range(len(data))]
    for chunk in chunks:  # no exception escapes: the reactor would log a traceback
        if transport.disconnecting or getattr(transport, "disconnected", False):
            break
        proto.dataReceived(chunk)
    assert made == [] and transport.value() == b""
    assert transport.disconnecting or transport.disconnected
    assert reactor.getDelayedCalls() == []  # the header timer goes with the connection


ACCEPTED = {
    "v1 TCP4": (b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n", ("192.0.2.7", 40000), ("127.0.0.1", 143)),
    "v1 TCP6 spelled long": (b"PROXY TCP6 2001:db8:0:0:0:0:0:7 ::1 40000 143\r\n", ("2001:db8::7", 40000), ("::1", 143)),
    "v1 at the 107-byte bound": (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
                                 b"65535 65535\r\n", ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
                                 ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
    "v1 UNKNOWN": (b"PROXY UNKNOWN\r\n", ("10.0.0.1", 55555), None),
    "v1 UNKNOWN with fields": (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", ("10.0.0.1", 55555), None),
    "v2 TCP4": (v2(), ("192.0.2.7", 40000), ("127.0.0.1", 143)),
    "v2 TCP6": (v2(fam=0x21, src="2001:db8::7", dst="::1"), ("2001:db8::7", 40000), ("::1", 143)),
    "v2 TLVs": (v2(tlv=b"\x01\x00\x04imap" + b"\x04\x00\x02ab" + b"\x20\x00\x05\x07\x00\x00\x00\x00"),
                ("192.0.2.7", 40000), ("127.0.0.1", 143)),
    "v2 LOCAL (health check)": (v2(cmd=0x20, body=b""), ("10.0.0.1", 55555), None),
    "v2 UNSPEC": (v2(fam=0x00, body=b""), ("10.0.0.1", 55555), None),
    "v2 UNIX": (v2(fam=0x31, body=b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0")), ("10.0.0.1", 55555), None),
}


@pytest.mark.parametrize("header,peer,host", ACCEPTED.values(), ids=ACCEPTED.keys())
@pytest.mark.parametrize("pieces", ["whole", "bytewise"])
def test_a_good_header_gives_the_client_address_and_what_follows_it(header, peer, host, pieces):
    proto, transport, made, reactor = connect()
    data = header + b"a1 LOGIN alice secret\r\n"
    for chunk in [data] if pieces == "whole" else [data[i:i + 1] for i in range(len(data))]:
        proto.dataReceived(chunk)
    got_peer, got_host = made[0]
    assert (got_peer.host, got_peer.port) == peer
    if host is not None:
        assert (got_host.host, got_host.port) == host
    assert b"".join(made[1:]) == b"a1 LOGIN alice secret\r\n"
    assert not transport.disconnecting and reactor.getDelayedCalls() == []


def test_only_a_trusted_peer_may_send_a_header_when_trusted_networks_are_set():
    header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n"
    proto, transport, made, _ = connect(trusted=("10.0.0.0/24",))
    proto.dataReceived(header)
    assert made[0][0].host == "192.0.2.7"
    stranger = IPv4Address("TCP", "203.0.113.5", 4000)
    proto, transport, made, reactor = connect(trusted=("10.0.0.0/24",), peer=stranger)
    assert transport.disconnecting or transport.disconnected
    assert made == [] and transport.value() == b"" and reactor.getDelayedCalls() == []
    v6 = IPv6Address("TCP", "2001:db8::1", 4000)
    proto, transport, made, _ = connect(trusted=("10.0.0.0/24", "2001:db8::/64"), peer=v6)
    proto.dataReceived(header)
    assert made[0][0].host == "192.0.2.7"


def test_the_end_of_a_tls_handshake_reaches_the_session():
    """STARTTLS on a haproxy: listener, and every haproxy:ssl: session: the session registers its
    output's back-pressure when the handshake ends (flow.py), so it must hear of it."""
    proto, transport, made, _ = connect()
    proto.dataReceived(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 143\r\n")
    assert IHandshakeListener.providedBy(proto)
    proto.handshakeCompleted()
    assert made[-1] == "handshake"
