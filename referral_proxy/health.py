"""Is every backend there? A periodic connect + greeting of each, for /health.

No login: a check costs the backend one connection and one line. A backend is
healthy when it answered its last check with ``* OK``; before its first check it is
not (nothing is known yet).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .backend import NotConnected
from .backendlogin import open_connection
from .config import BackendConfig
from .netio import drop

__all__ = ["BackendHealth", "HealthChecker", "check_greeting"]

log = Logger()


@dataclass(frozen=True)
class BackendHealth:
    """The answer of one backend's last check."""

    ok: bool
    reason: str  # "greeted" or why not
    checked: float  # wall-clock time of the check


async def check_greeting(reactor: Any, backend: BackendConfig) -> str | None:
    """Connect and read the greeting: None when it is ``* OK``, else why not."""
    try:
        proto, connector = await open_connection(reactor, backend)
    except NotConnected as e:
        return f"cannot connect: {e}"
    try:
        greeting = proto.greeting
        greeting.addTimeout(backend.connect_timeout, reactor)
        start = await greeting
        if start.status != "OK":
            return f"greeted with {start.status}"
        return None
    except NotConnected as e:
        return f"cannot connect: {e}"
    except defer.TimeoutError:
        return f"no greeting within {backend.connect_timeout:g}s"
    except Exception as e:
        return f"no greeting: {e or type(e).__name__}"
    finally:
        if proto.transport is None:
            drop(proto, connector)
        else:
            proto.logout()


class HealthChecker:
    """Checks every backend each *interval* seconds; ``state`` holds the last answers."""

    def __init__(self, reactor: Any, backends: dict[str, BackendConfig], interval: float, *,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.reactor = reactor
        self.backends = backends
        self.interval = interval
        self.wall_clock = wall_clock
        self.state: dict[str, BackendHealth] = {}
        self._loop = LoopingCall(self.check_all)
        self._loop.clock = reactor
        self._running: defer.Deferred[None] | None = None
        self._again = False  # backends changed during a round: another at its end

    def start(self) -> None:
        self._loop.start(self.interval, now=True).addErrback(lambda f: log.failure("health checks stopped", f))

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def reload(self, backends: dict[str, BackendConfig]) -> None:
        """SIGHUP: the new backends; one added, or whose endpoint changed, is "not checked yet" until a
        round (now, or right after the one under way) has checked it."""
        for name in list(self.state):
            if name not in backends or backends[name] != self.backends.get(name):
                del self.state[name]
        self.backends = backends
        if self._running is not None:
            self._again = True
        elif self._loop.running:
            self.check_all()

    def check_all(self) -> defer.Deferred[None] | None:
        """One round (skipped while the last one is still running)."""
        if self._running is not None:
            return None
        self._again = False
        d = defer.DeferredList([defer.ensureDeferred(self._check(n, b)) for n, b in self.backends.items()])

        def done(_: object) -> None:
            self._running = None
            if self._again:
                self.check_all()

        d.addBoth(done)
        self._running = d
        return None

    async def _check(self, name: str, backend: BackendConfig) -> None:
        why = await check_greeting(self.reactor, backend)
        if self.backends.get(name) != backend:  # removed or changed by a reload meanwhile: not its state
            return
        before = self.state.get(name)
        self.state[name] = BackendHealth(why is None, why or "greeted", self.wall_clock())
        if why is not None and (before is None or before.ok):
            log.warn("health: backend {name} is down: {why}", name=name, why=why)
        elif why is None and before is not None and not before.ok:
            log.info("health: backend {name} is back", name=name)

    def healthy(self) -> tuple[bool, list[str]]:
        """(every backend answered its last check, one line per backend)."""
        lines, ok = [], True
        for name in self.backends:
            state = self.state.get(name)
            if state is None:
                ok = False
                lines.append(f"{name}: not checked yet")
            else:
                ok = ok and state.ok
                lines.append(f"{name}: {'ok' if state.ok else 'DOWN'} ({state.reason})")
        return ok, lines
