"""A RENAME never gives a child a name that is a mailbox where the map sends it now (probe l7 of stop 60, LOST:
hidden).

`R` is placed on b3 by a move; `R/c/f` made through the proxy goes to b1 (its parent `R/c` does not exist, so it is
not "directly inside" a placed mailbox: the default). A RENAME of a parent with a child `f` to `R/c`, across servers
or on b3 alone, placed `R/c/f` on b3 over b1's: b1's `R/c/f` and its mail reachable by nobody (3 of 3; 1 of 1 on one
backend; seen in soak-like rounds as mailboxes on two backends). Dovecot alone renames the parent and leaves that
child; the proxy refuses the RENAME before anything changes, as it refuses a child's name that lives on another
server (hierarchy.TAKEN). Real Dovecot; judged by a census and by what the proxy shows.
"""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, cli, through_proxy

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("where", ["across", "one-backend"])
def test_a_rename_whose_child_would_take_a_routed_mailboxs_name_is_refused(proxy_factory, fleet, where):
    masters = {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}
    proxy = proxy_factory({"backends": masters})
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    parent = "P sp/c/d" if where == "across" else "X"
    for name in ("R", parent):
        assert w.cmd(b"c", b'CREATE "%s"' % name.encode())[-1].startswith(b"c OK")
    for name in ("R",) if where == "across" else ("R", "X"):
        moved = cli("move", "--config", str(proxy.config_path), "carol", name, "b3", timeout=300)
        assert moved.returncode == 0, moved.stdout + moved.stderr
    w.close()
    w = Wire(proxy.host, proxy.port, timeout=60)  # (the moves ended the session)
    w.login("carol")
    assert w.cmd(b"c", b'CREATE "%s/f"' % parent.encode())[-1].startswith(b"c OK")  # with its parent
    assert w.cmd(b"c", b'CREATE "R/c/f"')[-1].startswith(b"c OK")  # on b1, the default
    for box, mid in (("R/c/f", "keep-1"), ("R/c/f", "keep-2"), (parent + "/f", "moved-1")):
        message = b"Message-Id: <%s>\r\nSubject: x\r\n\r\nbody %s\r\n" % (mid.encode(), mid.encode())
        w.send(b'a APPEND "%s" {%d}\r\n' % (box.encode(), len(message)))
        assert w.line().startswith(b"+")
        w.send(message + b"\r\n")
        assert w.until_tagged(b"a")[-1].startswith(b"a OK")
    said = w.cmd(b"r", b'RENAME "%s" "R/c"' % parent.encode())[-1]
    assert said.startswith(b"r NO [CANNOT]"), said  # main: r OK, R/c/f placed on b3 over b1's
    w.close()
    counts, where_ = census(fleet, "carol")
    assert counts["keep-1"] == counts["keep-2"] == counts["moved-1"] == 1, dict(where_)
    shown = through_proxy(proxy, "carol")  # every message reachable through the proxy
    assert shown["keep-1"] == shown["keep-2"] == shown["moved-1"] == 1, shown
