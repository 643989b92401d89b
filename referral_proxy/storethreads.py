"""The map store's thread pool, stoppable while a statement hangs.

A PostgreSQL server that is stopped (SIGSTOP, a frozen VM) keeps its sockets open and answers
nothing: a statement sent to it never returns, nor times out (the server's own timeout cannot
fire). Twisted's ThreadPool.stop() joins every thread, so a process stopping then (the admin's
``referral-proxy move`` once it has failed, a proxy shutting down) waited for the database for
ever, and its threads, not daemonic, kept it from exiting even past that. Here the threads are
daemonic and stop() waits for them only up to a bound: a thread still stuck is left behind, the
process ends, and the server drops the transaction it never finished (nothing was committed).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from twisted.python.threadpool import ThreadPool

__all__ = ["StorePool"]


def _daemon_thread(*args: Any, **kwargs: Any) -> threading.Thread:
    return threading.Thread(*args, daemon=True, **kwargs)


class StorePool(ThreadPool):
    """A ThreadPool of daemon threads whose stop() waits at most ``wait`` seconds for them."""

    threadFactory = staticmethod(_daemon_thread)  # type: ignore[assignment]

    def stop(self, wait: float | None = None) -> None:
        """Stop the threads; wait for them at most *wait* seconds in all (None: as long as they run)."""
        if wait is None:
            return super().stop()
        self.joined = True
        self.started = False
        self._team.quit()
        give_up = time.monotonic() + wait
        for thread in self.threads:
            thread.join(max(0.0, give_up - time.monotonic()))
