"""/metrics and the map store's transfer totals (the admin move, counted by another process):
read through the store's asynchronous contract, never waited for longer than STORE_WAIT,
never shown as a counter that goes back to zero when the store is away.

The site is driven through twisted.web's own test request (no socket); the store is a
real MemoryStore or one whose reads the test answers (or never answers) itself."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from referral_proxy.journal import StoreUnavailable
from referral_proxy.metrics import STORE_WAIT, StoreTotals, make_registry, metrics_site
from referral_proxy.observe import Observer
from referral_proxy.store import MemoryStore


def _samples(body: bytes) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name.startswith("referral_proxy_transfer"):
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _get(site, clock: Clock | None = None) -> tuple[DummyRequest, defer.Deferred]:
    request = DummyRequest([b"metrics"])
    resource = site.getResourceFor(request)
    finished = request.notifyFinish()
    result = resource.render(request)
    if result is not NOT_DONE_YET:
        request.write(result)
        request.finish()
    return request, finished


class Answered:
    """A store read the test answers (or fails, or never answers) by hand, as PostgreSQL's pool would."""

    def __init__(self) -> None:
        self.pending: list[defer.Deferred] = []

    async def transfer_counts(self):
        d: defer.Deferred = defer.Deferred()
        self.pending.append(d)
        return await d


def _site(read, clock):
    observer = Observer(clock=clock.seconds)
    observer.transferred(None, "copy", "ok", 500, 0.0)
    totals = StoreTotals(read, clock)
    return metrics_site(make_registry(observer, None, None, totals), None, totals), totals


def test_admin_moves_counted_in_the_store_are_added_to_the_proxys_own():
    store, clock = MemoryStore(), Clock()
    site, _ = _site(store.transfer_counts, clock)
    request, finished = _get(site)
    assert finished.called  # a local store answers at once: the scrape is not deferred
    before = _samples(b"".join(request.written))
    assert before[("referral_proxy_transfer_bytes_total", (("kind", "admin_move"),))] == 0
    assert ("referral_proxy_transfers_total", (("kind", "admin_move"), ("result", "ok"))) not in before
    for result, n in (("ok", 1000), ("ok", 234), ("failed", 0)):
        defer.ensureDeferred(store.count_transfer("admin_move", result, n))
    request, _ = _get(site)
    after = _samples(b"".join(request.written))
    assert after[("referral_proxy_transfers_total", (("kind", "admin_move"), ("result", "ok")))] == 2
    assert after[("referral_proxy_transfers_total", (("kind", "admin_move"), ("result", "failed")))] == 1
    assert after[("referral_proxy_transfer_bytes_total", (("kind", "admin_move"),))] == 1234
    assert after[("referral_proxy_transfers_total", (("kind", "copy"), ("result", "ok")))] == 1  # the proxy's own
    assert after[("referral_proxy_transfer_bytes_total", (("kind", "copy"),))] == 500


def test_a_scrape_waits_for_the_store_at_most_store_wait_and_keeps_the_last_totals():
    clock, store = Clock(), Answered()
    site, totals = _site(store.transfer_counts, clock)
    request, finished = _get(site)
    assert not finished.called and len(store.pending) == 1  # the reactor is free while the store answers
    second, second_finished = _get(site)
    assert len(store.pending) == 1  # scrapes meanwhile share the one read
    store.pending.pop().callback({("admin_move", "ok"): (3, 300)})
    assert finished.called and second_finished.called
    for r in (request, second):
        assert _samples(b"".join(r.written))[("referral_proxy_transfer_bytes_total", (("kind", "admin_move"),))] == 300

    # The store away: the read fails; the last totals are served (a counter never seems to go back to 0).
    request, finished = _get(site)
    store.pending.pop().errback(StoreUnavailable("PostgreSQL: connection refused"))
    assert finished.called
    samples = _samples(b"".join(request.written))
    assert samples[("referral_proxy_transfers_total", (("kind", "admin_move"), ("result", "ok")))] == 3

    # A read that hangs: the scrape is answered after STORE_WAIT seconds with the last totals.
    request, finished = _get(site)
    clock.advance(STORE_WAIT - 0.01)
    assert not finished.called
    clock.advance(0.02)
    assert finished.called
    assert _samples(b"".join(request.written))[("referral_proxy_transfer_bytes_total", (("kind", "admin_move"),))] == 300
    request, finished = _get(site)  # the hung read is still the one read: no second one piles up
    assert len(store.pending) == 1
    store.pending.pop().callback({("admin_move", "ok"): (4, 400)})
    assert finished.called and totals.latest == {("admin_move", "ok"): (4, 400)}
    assert clock.getDelayedCalls() == []  # every timer cancelled or fired


def test_totals_never_read_are_absent_rather_than_zero():
    clock, store = Clock(), Answered()
    site, _ = _site(store.transfer_counts, clock)
    request, finished = _get(site)
    store.pending.pop().errback(StoreUnavailable("PostgreSQL: connection refused"))
    samples = _samples(b"".join(request.written))
    assert ("referral_proxy_transfer_bytes_total", (("kind", "admin_move"),)) not in samples
    assert samples[("referral_proxy_transfer_bytes_total", (("kind", "copy"),))] == 500  # the rest is served


def test_a_scraper_that_hangs_up_meanwhile_is_not_written_to():
    clock, store = Clock(), Answered()
    site, _ = _site(store.transfer_counts, clock)
    request, finished = _get(site)
    finished.addErrback(lambda f: None)
    request.processingFailed(Exception("scraper gone"))  # what a lost connection does to notifyFinish
    store.pending.pop().callback({})
    assert request.written == [] and request.finished == 0
