"""One polling loop for every wait on another session's hold (a MOVE across, a check's names).

The pause doubles from *first* to *most* seconds, so a hold of milliseconds is seen almost at once
and one of seconds costs a few looks; it gives up after *seconds* waited in all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from twisted.internet import task

__all__ = ["pauses"]


async def pauses(clock: Any, seconds: float, first: float, most: float, waited: float = 0.0) -> AsyncIterator[float]:
    """Yield the seconds waited so far: at once, then after each pause, while under *seconds* in all
    (only once without a clock). The caller looks at what it waits for at each step and leaves the loop."""
    delay = first
    while True:
        yield waited
        if clock is None or waited >= seconds:
            return
        await task.deferLater(clock, delay, lambda: None)
        waited += delay
        delay = min(delay * 2, most)
