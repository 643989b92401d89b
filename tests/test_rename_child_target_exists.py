"""A RENAME on one backend whose child would land on a mailbox that exists (soak C seed 76056).

Dovecot renames the mailbox and each child; a child whose new name is taken stays where it was
("rename(.A.c, .B.c) failed: Directory not empty" in its log) and the RENAME is answered OK. The
proxy moved that child's placement to the new name all the same: in the soak, INBOX/Sub/*/c (placed
on b3 by an admin move) stayed on b3 under its old name, routed now by the rules to b1, and its 89
messages were out of the client's reach. The proxy refuses such a RENAME before Dovecot sees it:
NO [ALREADYEXISTS], nothing renamed, every message where it was.
"""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import exact, seed
from test_moves import MASTERS, RULES

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("where", [("Work/x", "Proj", "b1"), ("Shared/A", "Shared/B", "b3")])
def test_a_rename_whose_child_would_land_on_an_existing_mailbox_is_refused(proxy_factory, fleet, where):
    old, new, backend = where
    seed(fleet[backend], "carol", old, ["old@t"])
    seed(fleet[backend], "carol", old + "/c", ["old-c@t"])
    seed(fleet[backend], "carol", new + "/c", ["new-c@t"])  # the new name's parent not made: no ALREADYEXISTS
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("carol")
    answer = w.cmd(b"r", b'RENAME "%s" "%s"' % (old.encode(), new.encode()))[-1]
    assert answer.startswith(b"r NO [ALREADYEXISTS]"), answer
    listed = b"".join(w.cmd(b"l", b'LIST "" "*"'))
    w.close()
    assert b'"/" "%s/c"\r\n' % old.encode() in listed and b'"/" "%s/c"\r\n' % new.encode() in listed, listed
    counts, where_ = exact(fleet, proxy, "carol", ["old@t", "old-c@t", "new-c@t"])
    assert where_["old-c@t"] == [(backend, old + "/c")], where_
