"""The session fuzzer (tests/sessionfuzz.py) with fixed seeds, against the real proxy in
front of three real Dovecot backends: every mutated session gets its sentinel NOOP
answered or a clean BYE, every line it gets is an IMAP response (none forged), no
traceback reaches the proxy's log, the proxy's memory does not grow with the streams,
and every mailbox made is on the backend the map says. ``python tests/sessionfuzz.py
--seed S --streams N`` runs longer; ``--only I`` replays one stream.
"""

from __future__ import annotations

import pytest
import sessionfuzz
from procmem import rss

from referral_proxy.observe import Observer

pytestmark = pytest.mark.usefixtures("clean_mail")

STREAMS = 2500  # ~1 minute on two busy cores


def test_mutated_sessions_are_answered_or_end_with_a_clean_bye(proxy_factory, fleet):
    proxy = proxy_factory(rules=sessionfuzz.RULES, **sessionfuzz.LIMITS)
    before = sessionfuzz.census(fleet)
    stats, memory, problems = sessionfuzz.run(proxy.host, proxy.port, seed=10, streams=STREAMS, workers=8,
                                              rss=lambda: rss(proxy.pid)[0], log_text=proxy.stderr_text)
    assert stats.streams == STREAMS
    assert [(f.index, f.verdict, f.detail) for f in stats.failures] == []
    assert problems == []
    assert stats.verdicts.get("answered", 0) > STREAMS // 2  # most streams reach their sentinel
    assert stats.verdicts.get("backend-serverbug", 0) <= 3, stats.verdicts  # Dovecot's own, under the churn: rare
    # Bounded: what thousands of sessions leave behind is not kept (a closed backend
    # connection per logged-in session was, 9 KB each, until the fuzzer showed it). The
    # first streams warm the process up (allocator arenas, caches, young objects that the
    # tuned collector keeps longer: ~10 MB, flat after ~3,000 streams of 7,500 measured),
    # so the leak check is the growth over the second half: 1,250 sessions at 9 KB would
    # be 11 MB there.
    mb = [round(m / 1e6, 1) for m in memory]
    half = len(memory) // 2
    assert max(memory[half:]) - memory[half] < 6 * 1024 * 1024, mb
    assert max(memory) - memory[0] < 24 * 1024 * 1024, mb
    # A census of the backends: every mailbox made is where the map puts it (nothing
    # smuggled past the routing: a literal's bytes, a command after NOOP's arguments).
    assert sessionfuzz.misplaced(before, sessionfuzz.census(fleet)) == []


def test_closed_backend_connections_are_not_kept_without_a_scrape():
    class Conn:
        closed = False
        bytes_in = bytes_out = 10

    o = Observer()
    live = []
    for _ in range(10_000):
        c = Conn()
        o.backend_opened(c)
        live.append(c)
        if len(live) > 5:
            live.pop(0).closed = True
    assert len(o._backends) < 200  # noqa: SLF001 (what is held is the point)
    assert o.backend_connections() == 5 and o.backend_bytes() == (100_000, 100_000)


def test_a_forged_line_is_found():
    """What the fuzzer calls forged: issue 10's CRLF echoed into NO [TRYCREATE], a bad tag echoed."""
    ok = b"* OK hi\r\n* 1 FETCH (BODY[] {9}\r\nt1 OK x\r\n)\r\n+ Ready\r\nt1 NO [TRYCREATE] no\r\nt2 OK"
    assert sessionfuzz.malformed(ok) is None
    forged = b"t1 NO [TRYCREATE] Mailbox doesn't exist: Evil\r\nX9 CREATE Far/Injected\r\n"
    assert sessionfuzz.malformed(forged) == b"X9 CREATE Far/Injected"
    assert sessionfuzz.malformed(b't"1 BAD Error\r\n') == b't"1 BAD Error'
