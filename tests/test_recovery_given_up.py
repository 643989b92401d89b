"""An entry its owner gave up (disowned: the MOVE across whose destination mailbox was deleted under it, probe
v2 of stop 52) is recovered at the proxy's next quick check, not at the 30-second sweep: until then its names
answered NO [INUSE] (a COPY or MOVE out of the source waited 10 s and was refused)."""

from __future__ import annotations

import time

from movecheck import journal_empty, journal_store
from storehelp import now

from referral_proxy.journal import Reservation, Step


def test_an_entry_given_up_is_recovered_at_the_next_check(proxy_factory):
    proxy = proxy_factory()
    store = journal_store(proxy)
    try:
        entry = now(store.begin_move("carol", "move", [Reservation("Work")], {}, "given-up-owner", "/"))
        now(store.journal_step(entry, Step.PLANNED, {}, "given-up-owner"))
        assert now(store.disown(entry, "given-up-owner"))
    finally:
        now(store.close())
    deadline = time.monotonic() + 120
    while not journal_empty(proxy) and time.monotonic() < deadline:  # polled, never a timed assertion
        time.sleep(0.2)
    assert journal_empty(proxy)
    assert "gave them up; recovering them now" in proxy.stderr_text(), proxy.stderr_text()[-2000:]
