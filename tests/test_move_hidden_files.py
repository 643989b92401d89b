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
from movecheck import (
    LEFT_TO_RECOVER,
    _message_files,
    _names,
    admin_move,
    body,
    cli,
    exact,
    faulty,
    quote,
    seed,
    start_paused,
    wait_paused,
)
from test_moves import MASTERS, RULES

from referral_proxy.aside import _mark

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


def test_marks_a_crash_left_in_the_aside_are_not_carried(proxy_factory, fleet):
    """A move killed while its two marks (hidden_messages) were in the aside: recovery drops them
    (drop_marks) rather than carrying them into the user's mailbox as mail; the user's mail goes."""
    seed(fleet["b1"], "carol", "Work", ["w-0@t", "w-1@t"])
    proxy = proxy_factory({**MASTERS, **LEFT_TO_RECOVER}, rules=RULES)
    killed = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3",
                 command=faulty("--kill-at", "aside:1"))  # emptied in place, then set aside
    assert killed.returncode == -9, killed.stdout + killed.stderr
    with fleet["b1"].client("carol") as m:
        (aside,) = [n for n in _names(m) if n.startswith("referral-proxy-aside-") and "/drop" not in n]
        for flags in ("", "(\\Seen \\Deleted)"):
            assert m.append(aside, flags or None, None, _mark(aside))[0] == "OK"
        assert m.append(aside, None, None, body("late@t"))[0] == "OK"  # and mail that came late
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    exact(fleet, proxy, "carol", ["w-0@t", "w-1@t", "late@t"])
    assert _message_files(fleet["b1"], "carol") == 0


def test_an_aside_the_backend_will_not_take_marks_into_is_left_not_deleted_blind(proxy_factory, fleet, tmp_path):
    """The marks refused (here: the aside's insert right taken away; at quota alike): the move ends,
    its mail at the destination once, and the aside is left (logged), never DELETEd unread."""
    seed(fleet["b1"], "carol", "Work", ["w-0@t", "w-1@t"])
    proxy = proxy_factory(MASTERS, rules=RULES)
    pause = tmp_path / "pause"
    proc = start_paused(pause, "aside:1", "move", "--config", str(proxy.config_path), "carol", "Work", "b3")
    wait_paused(pause, "aside")
    with fleet["b1"].client("carol") as m:
        (aside,) = [n for n in _names(m) if n.startswith("referral-proxy-aside-") and "/drop" not in n]
        assert m._simple_command("SETACL", quote(aside), "carol", "lrwstekxa")[0] == "OK"
    (pause / "resume").touch()
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert b"could not be read whole again" in out, out
    exact(fleet, proxy, "carol", ["w-0@t", "w-1@t"])
    with fleet["b1"].client("carol") as m:
        assert aside in _names(m)
