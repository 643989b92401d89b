"""The running proxy as a Twisted service: listeners, shared session context, reload.

Everything that touches the reactor is given one; this module is what twistd,
the CLI and the tests all start.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString
from twisted.internet.protocol import ServerFactory
from twisted.internet.ssl import PrivateCertificate
from twisted.logger import Logger

from .backend import Credentials, connect_backend
from .config import BackendConfig, Config, ConfigError, load_config
from .recovery import RecoverySweep
from .routing import MailboxMap, StepHook, open_store
from .session import ClientSession, ProxyContext

__all__ = ["ProxyService", "check_endpoints", "load_and_check"]

log = Logger()

SHUTDOWN_GRACE = 5.0  # seconds clients get to receive their BYE at shutdown


def check_endpoints(config: Config, reactor: Any) -> None:
    """Refuse endpoint strings Twisted cannot parse, naming the key (nothing is bound)."""
    for i, spec in enumerate(config.proxy.listen):
        try:
            serverFromString(reactor, spec)
        except Exception as e:  # ValueError, KeyError, OpenSSL errors for ssl: files ...
            raise ConfigError(f"proxy.listen[{i}]: bad endpoint {spec!r}: {e or type(e).__name__}") from None
    for name, backend in config.backends.items():
        try:
            clientFromString(reactor, backend.endpoint)
        except Exception as e:
            raise ConfigError(f"backends.{name}.endpoint: bad endpoint {backend.endpoint!r}: {e or type(e).__name__}") from None
    if config.proxy.tls_cert is not None:
        try:
            server_tls_options(config)
        except Exception as e:
            raise ConfigError(f"proxy.tls_cert: cannot load certificate and key: {e}") from None


def load_and_check(path: str, reactor: Any) -> Config:
    """Load the file and check its endpoints: a Config, or one ConfigError."""
    return load_config(path, check_endpoints=lambda c: check_endpoints(c, reactor))


def server_tls_options(config: Config) -> Any:
    """STARTTLS context from ``[proxy] tls_cert`` / ``tls_key``."""
    assert config.proxy.tls_cert is not None and config.proxy.tls_key is not None
    pem = config.proxy.tls_cert.read_bytes() + b"\n" + config.proxy.tls_key.read_bytes()
    return PrivateCertificate.loadPEM(pem).options()


class _SessionFactory(ServerFactory):
    noisy = False

    def __init__(self, context: ProxyContext) -> None:
        self.context = context

    def buildProtocol(self, addr: Any) -> ClientSession:
        session = ClientSession(self.context)
        session.factory = self
        return session


class ProxyService(MultiService):
    """The proxy: one listener service per ``[proxy].listen`` endpoint."""

    def __init__(self, config: Config, reactor: Any, *, on_step: StepHook | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        # on_step: called after each journal step (tests inject faults there; None in production)
        self.mailbox_map = MailboxMap(config.map, open_store(config.map.store), on_step=on_step)
        self.recovery = RecoverySweep(reactor, config, self.mailbox_map)

        async def connect(backend: BackendConfig, credentials: Credentials):
            return await connect_backend(reactor, backend, credentials)

        self.context = ProxyContext(
            config=config,
            mailbox_map=self.mailbox_map,
            reactor=reactor,
            connect=connect,
            server_tls=server_tls_options(config) if config.proxy.tls_cert else None,
        )
        factory = _SessionFactory(self.context)
        self.listeners = []
        for spec in config.proxy.listen:
            svc = StreamServerEndpointService(serverFromString(reactor, spec), factory)
            svc._raiseSynchronously = True  # a port in use stops start-up with that error
            svc.setName(spec)
            svc.setServiceParent(self)
            self.listeners.append(svc)

    def startService(self) -> None:
        super().startService()
        log.info("referral-proxy listening on {listen}", listen=", ".join(self.config.proxy.listen))
        # Moves a stopped proxy left half done are finished or rolled back now, and any
        # this process gives up on later are retried every few seconds.
        self.recovery.start()

    @defer.inlineCallbacks
    def stopService(self):  # type: ignore[override]
        """Stop listening, say BYE to every client, log the backends out, and wait (a few
        seconds at most) until the BYEs are really out before the reactor tears down."""
        yield super().stopService()
        self.recovery.stop()
        sessions = list(self.context.sessions)
        closed = [s.when_closed() for s in sessions]
        for session in sessions:
            session.shutdown()
        if closed:
            everyone = defer.DeferredList(closed)
            everyone.addTimeout(SHUTDOWN_GRACE, self.reactor)
            try:
                yield everyone
            except defer.TimeoutError:
                log.warn("{n} client connection(s) still open after {s}s; closing anyway", n=len(self.context.sessions),
                         s=SHUTDOWN_GRACE)
        self.mailbox_map.close()

    def reload(self, path: str | None = None) -> None:
        """SIGHUP: read the file again and apply the map rules; a bad file changes nothing."""
        path = path or (str(self.config.path) if self.config.path else None)
        if path is None:
            return
        try:
            config = load_and_check(path, self.reactor)
        except ConfigError as e:
            log.error("reload refused, keeping the running configuration: {why}", why=str(e))
            return
        self.mailbox_map.reconfigure(config.map)
        log.info("reloaded map rules from {path}", path=path)
