"""A move whose destination mailbox is replaced (deleted and made again) while a batch is appended.

Seen in the soak (seed 9529, `--proxies 2 --store postgresql --admin --odd-names --capitals`):
RENAME Shared/B Proj (b3 -> b1) found its batch's APPENDUID in a mailbox of another UIDVALIDITY
than the one it had made, gave up ("a destination mailbox was replaced during the move") and
rolled back; the roll-back looked for the batch's copies in the mailbox of the UIDVALIDITY it
had recorded before the batch, found another one, and removed nothing: 21 messages twice, their
source kept and their copies left in the new Proj. The copies are where APPENDUID says they are.
"""

from __future__ import annotations

import pytest
from movecheck import seed, start_paused, wait_paused
from test_moves import MASTERS, RULES, _exactly_once, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("point", ["copying:1", "copying:2"])
def test_a_destination_replaced_under_a_batch_keeps_no_copy(proxy_factory, fleet, tmp_path, point):
    work = ids("work", 1200)  # more than one batch: copying:2 has a verified batch in the old mailbox
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    pause = tmp_path / "pause"
    proc = start_paused(pause, point, "move", "--config", str(proxy.config_path), "carol", "Work", "b3")
    wait_paused(pause, point)
    try:
        with fleet["b3"].client("carol") as m:  # another session replaces the move's new mailbox
            assert m.delete("Work")[0] == "OK"
            assert m.create("Work")[0] == "OK"
    finally:
        (pause / "resume").touch()
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, out.decode()[-2000:]  # (Dovecot may refuse the batch itself: SERVERBUG)
    _exactly_once(fleet, proxy, "carol", work)
    assert _no_entries(proxy)
