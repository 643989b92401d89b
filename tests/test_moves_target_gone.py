"""A COPY or MOVE across whose target another session deletes after the proxy found it there.

RFC 3501 6.4.7: a COPY to a mailbox that does not exist fails with ``[TRYCREATE]``, and
Dovecot's own COPY/MOVE says so whenever it finds the target gone. The proxy looks for the
target first (mailops.refused_target), then, for a MOVE, asks the target's STATUS before its
MULTIAPPEND: a DELETE between the two gave ``NO [NONEXISTENT] STATUS failed on b3: ...``, a
client then retried into nothing instead of creating the mailbox (seen by the attack8 round).
A relay in front of b3 holds the proxy's command until the target is gone.
"""

from __future__ import annotations

import pytest
from imapwire import Wire
from test_moves_drain import _Holder
from test_transfer import RULES, _contents, _seed

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("command", [b"MOVE", b"UID MOVE", b"COPY"])
def test_a_target_deleted_after_it_was_found_gets_trycreate_and_nothing_moves(proxy_factory, fleet, command):
    _seed(fleet["b1"], "Work", 3)
    b3 = fleet["b3"]
    with b3.client("alice") as m:
        assert m.create("Shared/Dest")[0] == "OK"
    before = _contents(fleet["b1"], "Work")
    holder = _Holder(b3.host, b3.port, rb"^\S+ (STATUS Shared/Dest \(UIDVALIDITY|APPEND Shared/Dest )")
    holder.start()
    try:
        proxy = proxy_factory({"backends": {"b3": {"endpoint": f"tcp:host=127.0.0.1:port={holder.port}"}}},
                              rules=RULES)
        w = Wire(proxy.host, proxy.port, timeout=60)
        w.login()
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
        w.send(b"c " + command + b" 1:* Shared/Dest\r\n")
        assert holder.held.wait(60), "the proxy never reached the target"
        with b3.client("alice") as m:
            assert m.delete("Shared/Dest")[0] == "OK"
        holder.release.set()
        reply = w.until_tagged(b"c")
        assert reply[-1].startswith(b"c NO [TRYCREATE] "), (holder.line, reply)
        w.close()
    finally:
        holder.close()
    assert _contents(fleet["b1"], "Work") == before
    with b3.client("alice") as m:
        assert m.list('""', "Shared/*") == ("OK", [None]), "a mailbox was made"
