"""Memory per idle logged-in session, the proxy in front of real Dovecot: the Python heap
that N idle sessions add (tracemalloc, ``referral_proxy/testing/memtrace.py``), divided by
N, stays under a generous bound. A bound on bytes, not on time: the same on a loaded
machine and a fresh one. ``python bench/bench_memory.py`` shows where each byte goes.
"""

from __future__ import annotations

import time

from referral_proxy.testing import memtrace

WARM = 20  # sessions before the first snapshot: caches, the first backend connection
SESSIONS = 150
# Measured 7.3-8.3 KB on this branch (bench/README.md); main before it: 19.2 KB (a copy of
# the backend's capability list per connection, empty deques and sets per session). Twice
# what it is now, so a regression of a few hundred bytes passes and a gross one fails.
BOUND = 16 * 1024
RAISED = {"max_connections_per_ip": 10_000, "max_unauthenticated_per_ip": 10_000,
          "max_connections_per_user": 10_000, "login_penalty": 0}


def test_an_idle_logged_in_session_costs_a_bounded_python_heap(proxy_factory, tmp_path):
    trace = tmp_path / "trace"
    trace.mkdir()
    proxy = proxy_factory(command=memtrace.command(trace), **RAISED)
    password = proxy.users["alice"]
    clients: list[memtrace.IdleClient] = []
    try:
        clients += [memtrace.IdleClient(proxy.host, proxy.port, "alice", password) for _ in range(WARM)]
        time.sleep(0.3)  # the last backend LOGOUTs of the login checks, if any, are done
        before = memtrace.request_snapshot(proxy.pid, trace, 1)
        clients += [memtrace.IdleClient(proxy.host, proxy.port, "alice", password) for _ in range(SESSIONS)]
        time.sleep(0.3)
        after = memtrace.request_snapshot(proxy.pid, trace, 2)
    finally:
        for c in clients:
            c.close()
    # The snapshots saw the sessions (each logged in: IdleClient waits for the NOOP's OK), give
    # or take one in passing: the start-up's greeting probe, a health check's connection.
    for kind in ("ClientSession", "BackendProtocol"):
        assert abs(after.objects.get(kind, 0) - before.objects.get(kind, 0) - SESSIONS) <= 2, kind
    per_session = memtrace.per_session(before, after, SESSIONS)
    assert 1024 < per_session < BOUND, "\n".join([f"{per_session:.0f} B per session; the growth per session:",
                                                  *memtrace.top_lines(before, after, SESSIONS, 25)])

