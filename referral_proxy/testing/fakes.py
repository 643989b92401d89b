"""In-memory stand-ins for protocol tests: a session wired to scripted backends.

For corners a real Dovecot cannot produce (no LITERAL+, a refusal before a
literal, death mid-response). Everything else is tested against real Dovecot.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock, StringTransport

from ..backend import BackendProtocol, Credentials
from ..config import BackendConfig, Config, parse_config
from ..context import ProxyContext
from ..routing import MailboxMap
from ..session import ClientSession

__all__ = ["FakeConnector", "HeldConnector", "NoDelayTransport", "SlowReaderTransport", "SessionHarness", "DOVECOT_CAPS",
           "minimal_config"]

DOVECOT_CAPS = (
    "IMAP4REV1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT THREAD=REFERENCES MULTIAPPEND UNSELECT "
    "CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED CONDSTORE QRESYNC ESEARCH BINARY MOVE LITERAL+ NOTIFY "
    "SPECIAL-USE COMPRESS=DEFLATE"
).split()


def minimal_config(**proxy: Any) -> Config:
    """A valid configuration with backends b1 and b2, and *proxy* keys added."""
    raw = {
        "proxy": {"listen": ["tcp:0:interface=127.0.0.1"], "hostname": "fake.test", **proxy},
        "backends": {
            "b1": {"endpoint": "tcp:host=127.0.0.2:port=1", "url": "imap://127.0.0.2:1"},
            "b2": {"endpoint": "tcp:host=127.0.0.3:port=1", "url": "imap://127.0.0.3:1"},
        },
        "map": {"default": "b1"},
    }
    return parse_config(raw, base=Path("."))


class NoDelayTransport(StringTransport):
    """A StringTransport that records TCP_NODELAY and STARTTLS."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.nodelay = False
        self.tls_started: Any = None

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.nodelay = enabled

    def startTLS(self, context: Any) -> None:
        self.tls_started = context


class SlowReaderTransport(NoDelayTransport):
    """A client's transport whose peer reads only when told (:meth:`drain`), as Twisted's TCP
    transport behaves: it pauses its streaming producer once more than *buffer_size* bytes
    wait; when they are gone it resumes a paused producer, or else, after loseConnection,
    closes (so a producer left registered and paused keeps it open)."""

    def __init__(self, buffer_size: int = 1024) -> None:
        super().__init__()
        self.buffer_size = buffer_size
        self.producer_paused = False
        self.drained = b""  # everything the peer has read so far
        self.closed = False  # loseConnection has completed
        self._writing = False  # a write (or loseConnection) is waiting for the socket

    def write(self, data: bytes) -> None:
        super().write(data)
        self._writing = True
        if self.producer is not None and self.streaming and len(self.value()) > self.buffer_size:
            self.producer_paused = True
            self.producer.pauseProducing()

    def loseConnection(self) -> None:
        super().loseConnection()
        self._writing = True

    def drain(self) -> bytes:
        """The peer reads everything waiting (Twisted's doWrite): the producer resumes (and may
        write more), or a connection being lost closes."""
        if not self._writing:
            return b""
        self._writing = False
        data = self.value()
        self.drained += data
        self.clear()
        if self.producer is not None and self.producer_paused:
            self.producer_paused = False
            self.producer.resumeProducing()
        elif self.disconnecting:
            self.closed = True
        return data


@dataclass
class FakeConnector:
    """The session's ``connect``: returns scripted BackendProtocols on StringTransports."""

    capabilities: Iterable[str] = tuple(DOVECOT_CAPS)
    refuse: bool = False
    backends: list[BackendProtocol] = field(default_factory=list)
    credentials: list[Credentials] = field(default_factory=list)

    async def __call__(self, config: BackendConfig, credentials: Credentials) -> BackendProtocol:
        from ..backend import AuthenticationFailed, Tagged
        from ..imap.response import parse_response_start

        self.credentials.append(credentials)
        if self.refuse:
            raw = b"rp1 NO [AUTHENTICATIONFAILED] Authentication failed."
            raise AuthenticationFailed(Tagged(parse_response_start(raw), raw))
        proto = BackendProtocol(config)
        proto.makeConnection(NoDelayTransport())
        proto.dataReceived(b"* OK [CAPABILITY " + " ".join(self.capabilities).encode() + b"] fake ready\r\n")
        self.backends.append(proto)
        return proto


class HeldConnector(FakeConnector):
    """A FakeConnector whose connections are made only once the test fires its Deferred in
    ``held`` (a login or a connection under way meanwhile)."""

    def __init__(self) -> None:
        super().__init__()
        self.held: list[defer.Deferred[None]] = []

    async def __call__(self, config: BackendConfig, credentials: Credentials) -> BackendProtocol:
        d: defer.Deferred[None] = defer.Deferred()
        self.held.append(d)
        await d
        return await super().__call__(config, credentials)


class SessionHarness:
    """A ClientSession on a StringTransport, with a FakeConnector behind it."""

    def __init__(self, config: Config | None = None, *, connector: FakeConnector | None = None,
                 server_tls: Any = None, observer: Any = None, client: NoDelayTransport | None = None,
                 admission: Any = None) -> None:
        self.config = config or minimal_config()
        self.reactor = MemoryReactorClock()
        self.connector = connector or FakeConnector()
        self.context = ProxyContext(
            config=self.config,
            mailbox_map=MailboxMap(self.config.map),
            reactor=self.reactor,
            connect=self.connector,
            server_tls=server_tls,
        )
        if observer is not None:
            self.context.observer = observer
        if admission is not None:
            self.context.admission = admission
        self.session = ClientSession(self.context)
        self.client = client if client is not None else NoDelayTransport()
        self.session.makeConnection(self.client)

    @property
    def backend(self) -> BackendProtocol:
        return self.connector.backends[-1]

    def send(self, data: bytes, *, one_byte_at_a_time: bool = False) -> None:
        if one_byte_at_a_time:
            for i in range(len(data)):
                self.session.dataReceived(data[i:i + 1])
        else:
            self.session.dataReceived(data)
        self.turns()

    def from_backend(self, data: bytes) -> None:
        self.backend.dataReceived(data)
        self.turns()

    def turns(self) -> None:
        """Run what the reactor runs next without time passing (a session's next turn)."""
        now = self.reactor.seconds()
        while any(c.getTime() <= now for c in self.reactor.getDelayedCalls()):
            self.reactor.advance(0)

    def to_client(self) -> bytes:
        """What the session wrote to the client since the last call."""
        data = self.client.value()
        self.client.clear()
        return data

    def to_backend(self) -> bytes:
        """What the session wrote to the backend since the last call."""
        transport = self.backend.transport
        data = transport.value()
        transport.clear()
        return data

    def login(self, user: bytes = b"alice") -> None:
        self.to_client()
        self.send(b"L LOGIN " + user + b" secret\r\n")
        reply = self.to_client()
        assert reply.startswith(b"L OK [CAPABILITY "), reply
        self.to_backend()
