"""A move whose drain meets a message Dovecot dies on still finishes, every message once.

Seen in soaks (seeds 12022, 15318, 19131: `--proxies 2 --store postgresql`): after SIGKILLs, b1's
maildir index of Work gave one UID to two files ("Broken file dovecot-uidlist ... UIDs not ordered
(11 >= 11)"); from then on Dovecot 2.3.19 panics on every UID MOVE (and UID COPY) of that message
(`mail-index-transaction-finish.c: line 185 ... assertion failed`, the quota plugin asking its size
in mailbox_save_begin), while UID STORE + UID EXPUNGE of it work. The drain removes a move's
verified source messages with UID MOVE to a private drop, so each recovery died there and the
move's names stayed NO [INUSE] for good. tests/data/dovecot-panic/carol is that damaged Work as
the soak left it (19 messages; UID 11 is the one Dovecot dies on), with the root index files it
needs to die (INBOX's messages themselves left out: Dovecot drops them from its index).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
from pathlib import Path

import pytest
from imapwire import Wire
from movecheck import census, cli, judge, through_proxy
from test_moves import MASTERS, RULES, _logged_in, _no_entries

pytestmark = pytest.mark.usefixtures("clean_mail")

DAMAGED = Path(__file__).parent / "data" / "dovecot-panic" / "carol"


def _ids() -> list[str]:
    return [re.search(rb"(?im)^message-id: <([^>]*)>", p.read_bytes())[1].decode()
            for p in (DAMAGED / ".Work" / "cur").iterdir()]


def _install(backend) -> None:
    """b1's carol is the damaged one, before her first login."""
    target = backend.user_mail_dir("carol")
    assert not target.exists()
    shutil.copytree(DAMAGED, target)
    for box in (target, target / ".Work"):
        for sub in ("cur", "new", "tmp"):
            (box / sub).mkdir(exist_ok=True)
    owner = pwd.getpwnam("dovecot")
    for path in [target, *target.rglob("*")]:
        os.chown(path, owner.pw_uid, owner.pw_gid)


def _move_dies(backend) -> bool:
    """Does Dovecot die on `UID MOVE 11` of the damaged Work (direct)?"""
    w = Wire(backend.host, backend.port, timeout=30)
    w.cmd(b"l", b"LOGIN carol secret")
    w.cmd(b"c", b"CREATE Probe")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    try:
        return not w.cmd(b"m", b"UID MOVE 11 Probe")[-1].startswith(b"m OK")
    except (ConnectionError, OSError, EOFError):
        return True
    finally:
        w.close()


def test_a_rename_across_whose_drain_dovecot_dies_on_finishes_by_recovery(proxy_factory, fleet):
    b1 = fleet["b1"]
    _install(b1)
    work = _ids()
    if not _move_dies(b1):
        pytest.skip("this Dovecot does not die on the damaged mailbox (the state is Dovecot 2.3.19's)")
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    answer = w.cmd(b"r", b"RENAME Work Archive/W")[-1]
    w.close()
    proxy.stop()
    outs = [answer.decode(errors="replace")]
    for _ in range(4):  # each recovery met the panic for good before
        done = cli("recover", "--config", str(proxy.config_path))
        outs.append(done.stdout + done.stderr)
        if "nothing to recover" in done.stdout:
            break
    assert "nothing to recover" in outs[-1], outs
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], []), where
    proxy.start()
    reached = through_proxy(proxy, "carol")
    assert [i for i in counts if reached[i] != 1] == [], reached
    assert _no_entries(proxy)
