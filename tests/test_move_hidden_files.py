"""A mailbox moved across whose maildir holds a message file Dovecot's index does not know.

Soak C seed 72556 (and 68001): a Dovecot process rewrote a mailbox's dovecot-uidlist while another
session's RENAME moved its directory; the message files stayed in cur/, named by no uidlist record,
and Dovecot trusts its index while new/ and cur/ keep the mtimes it recorded: the mailbox looked
empty. A RENAME across then copied nothing and DELETEd its private aside, the files with it: lost.

Here the same state is made by hand (files put into an empty mailbox's cur/, the directory's mtime
set back to what Dovecot recorded; with a message Dovecot sees, the drain's own expunge changes
cur/ and the next look finds the rest), and the census (by content, every backend, every file on disk) must find every
message once after a RENAME across and after the admin move.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from imapwire import Wire
from movecheck import _message_files, admin_move, body, exact, seed
from test_moves import MASTERS, RULES

pytestmark = pytest.mark.usefixtures("clean_mail")

HIDDEN = ["hidden-0@t", "hidden-1@t"]


def hide_messages(backend, user: str, folder: str, mids: list[str]) -> None:
    """A file for each of *mids* in *folder*'s cur/ that Dovecot's index and uidlist do not name (its sync
    state recorded with new/ and cur/ old, then cur/'s mtime put back after the file is added)."""
    box = Path(backend.user_mail_dir(user)) / folder
    old = time.time() - 100
    for d in ("cur", "new"):
        os.utime(box / d, (old, old))
    with backend.client(user) as m:  # a full read now records those (old, so not "dirty") mtimes
        assert m.select('"' + folder[1:].replace(".", "/") + '"', readonly=True)[0] == "OK"
    cur = box / "cur"
    before = os.stat(cur)
    owner = cur.stat()
    for n, mid in enumerate(mids):
        path = cur / f"{int(old)}.M{n}P1.hidden:2,S"
        path.write_bytes(body(mid))
        os.chown(path, owner.st_uid, owner.st_gid)
    os.utime(cur, ns=(before.st_atime_ns, before.st_mtime_ns))


def _seen(backend, user: str, name: str) -> int:
    with backend.client(user) as m:
        typ, data = m.select('"' + name + '"', readonly=True)
        assert typ == "OK", data
        return int(data[0])


@pytest.mark.parametrize("how", ["rename", "admin"])
def test_a_file_the_index_does_not_know_is_moved_too(proxy_factory, fleet, how):
    seed(fleet["b1"], "carol", "Work", [])
    hide_messages(fleet["b1"], "carol", ".Work", HIDDEN)
    assert _seen(fleet["b1"], "carol", "Work") == 0  # Dovecot does not see them: the state of the soak
    assert _message_files(fleet["b1"], "carol") == len(HIDDEN)
    proxy = proxy_factory(MASTERS, rules=RULES)
    if how == "rename":
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login("carol")
        assert w.cmd(b"r", b"RENAME Work Archive/Work")[-1].startswith(b"r OK")
        w.close()
    else:
        done = admin_move(proxy, "carol", "Work", "b3")
        out, err = done.communicate(timeout=300)
        assert done.returncode == 0, (out, err)
    exact(fleet, proxy, "carol", HIDDEN)
    assert _message_files(fleet["b1"], "carol") == 0  # nothing left behind on b1, out of sight
