"""A RENAME across that its own checks refuse leaves alone a session that has one of its names
selected (renamecheck.py), as Dovecot alone does.

On main (helper attack14a): session b SELECTs Shared/B; session a's ``RENAME A Shared/B`` (A
absent) is answered NO [NONEXISTENT], or ``RENAME Shared/B C`` (C there) NO [ALREADYEXISTS], and
b's next command finds its connection closed (``* BYE Your mail moved to another server``): the
move's reservations took Shared/B before its checks ran, and the watch (relocation.py) ends
every session with a name a move holds selected."""

from __future__ import annotations

import time

import pytest
from movecheck import census, seed
from race_pairs13 import RULES, _sessions

pytestmark = pytest.mark.usefixtures("clean_mail")

CASES = {
    "source absent": (b"a RENAME A Shared/B\r\n", b"a NO [NONEXISTENT]"),
    "destination there": (b"a RENAME Shared/B C\r\n", b"a NO [ALREADYEXISTS]"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_refused_rename_leaves_a_session_with_its_name_selected(proxy_factory, fleet, case):
    rename, answer = CASES[case]
    seed(fleet["b3"], "carol", "Shared/B", ["sb@t"])
    seed(fleet["b1"], "carol", "C", ["c@t"])
    proxy = proxy_factory(rules=RULES)
    a, b = _sessions(proxy)
    b.send(b"s SELECT Shared/B\r\n")
    assert b.until_tagged(b"s")[-1].startswith(b"s OK")
    for _ in range(3):  # each refused RENAME is one more chance for the watch to end b
        a.send(rename)
        assert a.until_tagged(b"a")[-1].startswith(answer)
        time.sleep(1.5)  # past the watch's next look (relocation.CHECK_SECONDS), whatever the outcome
        b.send(b"n NOOP\r\n")
        lines = b.until_tagged(b"n")
        assert lines[-1].startswith(b"n OK") and not any(line.startswith(b"* BYE") for line in lines), lines
    b.send(b"f UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])\r\n")
    assert any(b"sb@t" in line for line in b.until_tagged(b"f"))
    _counts, where = census(fleet, "carol")
    assert where["sb@t"] == [("b3", "Shared/B")] and where["c@t"] == [("b1", "C")], where
