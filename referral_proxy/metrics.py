"""``[metrics].listen``: Prometheus families at ``/metrics``, backend health at ``/health``.

The families are built at scrape time from the Observer's plain counters (one custom
collector; the hot path takes no lock) and served from the reactor thread, so a scrape
sees a consistent picture. Exposition is the Prometheus text format 0.0.4, where the
gauge ``referral_proxy_sessions`` and the counter ``referral_proxy_sessions_total`` are
two distinct families.

Transfers run by other processes (the admin ``move``) are counted in the map store
(``count_transfer``); a scrape first reads those totals through the store's asynchronous
contract (PostgreSQL: in its thread pool; the reactor never waits), at most
STORE_WAIT seconds, else it serves the last totals read (a store away: none at all
until one read succeeds, never a counter that seems to go back to zero).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from prometheus_client import exposition
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from twisted.internet import defer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from .admission import Admission
from .health import HealthChecker
from .observe import COMMAND_BUCKETS, TRANSFER_KINDS, Observer
from .store import TransferCounts

__all__ = ["ProxyCollector", "StoreTotals", "make_registry", "metrics_site", "STORE_WAIT"]

log = Logger()

CONTENT_TYPE = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)
_BOUNDS = [f"{b:g}" for b in COMMAND_BUCKETS] + ["+Inf"]
STORE_WAIT = 2.0  # seconds a scrape waits for the map store's totals before it serves the last ones read


class StoreTotals:
    """The map store's transfer counters as of the last read; ``refresh()`` reads them again.

    One read at a time (scrapes meanwhile share it, so a store that hangs never piles up
    reads); ``latest`` is None until a read has succeeded."""

    def __init__(self, read: Callable[[], Awaitable[TransferCounts]], clock: Any, wait: float = STORE_WAIT) -> None:
        self._read, self._clock, self.wait = read, clock, wait
        self.latest: TransferCounts | None = None
        self._reading: defer.Deferred[None] | None = None
        self._failing = False

    def refresh(self) -> defer.Deferred[None]:
        """Fires (never fails) when a read is done, or after ``wait`` seconds, whichever is first."""
        reading = self._reading
        if reading is None:
            reading = defer.ensureDeferred(self._once())
            if reading.called:  # a local store (SQLite, memory) answers at once
                return defer.succeed(None)
            self._reading = reading

            def clear(result: object) -> object:
                self._reading = None
                return result

            reading.addBoth(clear)
        answered: defer.Deferred[None] = defer.Deferred()

        def done(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not answered.called:
                answered.callback(None)

        timer = self._clock.callLater(self.wait, done, None)
        reading.addBoth(done)
        return answered

    async def _once(self) -> None:
        try:
            self.latest = dict(await self._read())
            if self._failing:
                log.info("metrics: the map store's transfer totals can be read again")
            self._failing = False
        except Exception as e:  # StoreUnavailable mostly: the last totals read are served
            if not self._failing:
                log.warn("metrics: the map store's transfer totals (admin_move) cannot be read: {why}",
                         why=str(e) or type(e).__name__)
            self._failing = True


class ProxyCollector:
    """The referral_proxy_* families, read from an Observer (and a HealthChecker).

    *store*: the transfers other processes counted in the map store (the admin move),
    added to the Observer's; every proxy sharing the store shows the same totals of them."""

    def __init__(self, observer: Observer, health: HealthChecker | None = None, admission: Admission | None = None,
                 store: StoreTotals | None = None, keepalive: Any = None) -> None:
        self.observer = observer
        self.health = health
        self.admission = admission
        self.store = store
        self.keepalive = keepalive  # keepalive.KeepAlive, or None

    def describe(self) -> list[Metric]:
        return []  # built at every scrape

    def collect(self) -> Iterator[Metric]:
        o = self.observer
        backend_in, backend_out = o.backend_bytes()
        yield GaugeMetricFamily("referral_proxy_sessions", "Client sessions open now.", value=o.sessions)
        yield _counter("referral_proxy_sessions", "Client sessions ended, by how they ended.", ["outcome"],
                       o.sessions_total)
        yield _counter("referral_proxy_logins", "Logins, by result.", ["result"], o.logins_total)
        yield _counter("referral_proxy_refused_connections",
                       "Connections refused with * BYE [UNAVAILABLE] before a session started, by the limit they hit.",
                       ["reason"], o.refusals_total)
        yield CounterMetricFamily("referral_proxy_login_delays", "Logins held by the failed-login penalty.",
                                  value=o.login_delays_total)
        yield CounterMetricFamily("referral_proxy_login_delay_seconds",
                                  "Seconds logins were held by the failed-login penalty.", value=o.login_delay_seconds)
        if self.admission is not None and self.admission.fd_sessions is not None:
            yield GaugeMetricFamily("referral_proxy_fd_sessions",
                                    "Sessions the process's file descriptors allow (max_connections is lowered to it).",
                                    value=self.admission.fd_sessions)
        yield _counter("referral_proxy_commands", "Client commands answered, by command and result.",
                       ["command", "result"], o.commands_total)
        yield _counter("referral_proxy_referrals", "RFC 2193/2221 referrals sent, by command.", ["command"],
                       o.referrals_total)
        yield GaugeMetricFamily("referral_proxy_backend_connections", "Backend connections open for clients now.",
                                value=o.backend_connections())
        if self.keepalive is not None:
            yield GaugeMetricFamily("referral_proxy_backend_parked",
                                    "Backend connections parked for their user's next login now (backend_keepalive; "
                                    "counted in referral_proxy_backend_connections too).", value=self.keepalive.ready)
            yield CounterMetricFamily("referral_proxy_backend_reused",
                                      "Logins that took a parked backend connection instead of logging in to the backend.",
                                      value=self.keepalive.reused)
        yield _counter("referral_proxy_backend_connect_failures",
                       "Backend connections that could not be made (connect, TLS, greeting).", ["backend"],
                       o.connect_failures)
        yield _counter("referral_proxy_bytes", "IMAP bytes relayed, by direction.", ["direction"], {
            "client_in": o.bytes_client_in, "client_out": o.bytes_client_out,
            "backend_in": backend_in, "backend_out": backend_out})
        transfers = dict(o.transfers_total)
        transfer_bytes = {kind: o.transfer_bytes.get(kind, 0) for kind in TRANSFER_KINDS}
        if self.store is not None:
            shared = self.store.latest
            if shared is None:  # not read yet (the store away): absent rather than a false 0
                transfer_bytes.pop("admin_move", None)
            for (kind, result), (n, nbytes) in (shared or {}).items():
                transfers[(kind, result)] = transfers.get((kind, result), 0) + n
                transfer_bytes[kind] = transfer_bytes.get(kind, 0) + nbytes
        yield _counter("referral_proxy_transfers", "Cross-server COPY, MOVE, RENAME and admin moves "
                       "(admin_move: from the map store, the same in every proxy sharing it).",
                       ["kind", "result"], transfers)
        yield _counter("referral_proxy_transfer_bytes", "Message bytes carried between backends.", ["kind"],
                       transfer_bytes)
        family = HistogramMetricFamily("referral_proxy_command_seconds",
                                       "Time from a command's line to its tagged answer, by command.",
                                       labels=["command"])
        for command, (counts, total) in sorted(o.command_seconds.items()):
            cumulative, buckets = 0, []
            for bound, n in zip(_BOUNDS, counts):
                cumulative += n
                buckets.append((bound, cumulative))
            family.add_metric([command], buckets, total[0])
        yield family
        yield GaugeMetricFamily("referral_proxy_map_store_up",
                                "1 while the map store is reachable (0: routing from the cached map, moves refused).",
                                value=1 if o.map_store_up else 0)
        yield _counter("referral_proxy_map_store_outages", "Times the map store became unreachable.", [],
                       {(): o.map_store_outages})
        if self.health is not None:
            family = GaugeMetricFamily("referral_proxy_backend_up",
                                       "1 when the backend answered its last health check with a greeting.",
                                       labels=["backend"])
            for name in self.health.backends:
                state = self.health.state.get(name)
                family.add_metric([name], 1 if state is not None and state.ok else 0)
            yield family


def _counter(name: str, doc: str, labels: list[str], values: dict[Any, int]) -> CounterMetricFamily:
    """A counter family from {label value (or tuple of them): count}, in label order."""
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, n in sorted(values.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], n)
    return family


def make_registry(observer: Observer, health: HealthChecker | None = None, admission: Admission | None = None,
                  store: StoreTotals | None = None, keepalive: Any = None) -> CollectorRegistry:
    """A registry of its own: the proxy's families plus the process, platform and GC ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(observer, health, admission, store, keepalive))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


class _Metrics(Resource):
    isLeaf = True

    def __init__(self, registry: CollectorRegistry, store: StoreTotals | None) -> None:
        super().__init__()
        self.registry = registry
        self.store = store

    def render_GET(self, request: Any) -> Any:
        request.setHeader(b"Content-Type", CONTENT_TYPE.encode())
        if self.store is None:
            return exposition.generate_latest(self.registry)
        gone: list[bool] = []
        request.notifyFinish().addErrback(lambda _: gone.append(True))  # the scraper hung up meanwhile

        def answer(_: object) -> None:
            if gone:
                return
            try:
                body = exposition.generate_latest(self.registry)
            except Exception:
                log.failure("metrics: a scrape failed")
                request.setResponseCode(500)
                body = b"metrics could not be collected\n"
            request.write(body)
            request.finish()

        self.store.refresh().addCallback(answer)
        return NOT_DONE_YET


class _Health(Resource):
    isLeaf = True

    def __init__(self, health: HealthChecker | None) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        if self.health is None:
            return b"ok\n"
        ok, lines = self.health.healthy()
        if not ok:
            request.setResponseCode(503)
        return ("\n".join(["ok" if ok else "unhealthy", *lines]) + "\n").encode()


class _Site(Site):
    def log(self, request: Any) -> None:
        """Scrapes every few seconds would drown the log: at debug level only."""
        log.debug("{method} {path} {code}", method=request.method, path=request.uri, code=request.code)


def metrics_site(registry: CollectorRegistry, health: HealthChecker | None, store: StoreTotals | None = None) -> Site:
    """The HTTP site: /metrics and /health (anything else: 404); with *store*, each scrape
    reads the map store's totals first (asynchronously, STORE_WAIT seconds at most)."""
    root = Resource()
    root.putChild(b"metrics", _Metrics(registry, store))
    root.putChild(b"health", _Health(health))
    site = _Site(root)
    site.noisy = False
    site.displayTracebacks = False
    return site
