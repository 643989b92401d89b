"""Dovecot's own MOVE stalled on a lock outlives its client and commits after a RENAME of its source:
the message is left twice, by Dovecot alone as through the proxy (soak A, seed 49164: duplicate dup20a).

The soak's story (history.txt, proxy.log of the run): b1 SIGKILLed; 0.7 s later a client's
``UID MOVE`` of o-INBOX/Sub-1 from INBOX/Sub to INBOX (both on b1: relayed as it is) got no
answer in the 1.45 s before the proxy was killed; 6 s later ``RENAME Inbox/Sub "Shared/50% off"``
(across, b1 -> b3) copied INBOX/Sub, o-INBOX/Sub-1 still in it, and deleted it (its recovery
finished it "at drained"). The census found the message in b3's Shared/50% off AND b1's INBOX.
The same client's next MOVE into b1's INBOX took 113 s and was answered OK 121 s after the kill
of b1: INBOX was locked that long by what the killed Dovecot left. Dovecot's MOVE on maildir
hard-links the message into the destination's tmp/ first, waits for the destination's
dovecot-uidlist lock to commit it, and only then expunges the source; its imap process does not
notice that its client is gone while it waits. So the stalled MOVE committed into INBOX ~2
minutes later, after the RENAME had taken INBOX/Sub -- message and all -- elsewhere.

Measured here with the lock held by the test (a dovecot-uidlist.lock naming a live process of
its own, as a killed Dovecot's lock acts until it is stale): Dovecot alone, a same-server
``RENAME INBOX/Sub Other`` during the stall leaves the message in Other and in INBOX; the proxy's
RENAME across (whole, or cut at ``drained`` and recovered) leaves it in Shared/50% off and INBOX,
the same two. Never none; the other messages once. Nothing the proxy sees tells it: the stalled
copy is a file in INBOX's tmp/, not in any IMAP answer, and the source message is still there,
unflagged, when the RENAME copies and verifies it. Taking the source copy out because a
same-content message appears in INBOX later would be a guess that deletes a user's real second
copy; the rule stays "twice rather than once where two were made".
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from imapwire import Wire
from movecheck import census, cli, faulty, seed
from test_moves import MASTERS, RULES, _no_entries

pytestmark = pytest.mark.usefixtures("clean_mail")

SUB = ["sub-1@t", "sub-2@t"]


class HeldLock:
    """INBOX's dovecot-uidlist.lock of *user* on *backend*, naming a live process (Dovecot waits:
    a lock of a process that exists is not taken over until it is stale, two minutes unchanged)."""

    def __init__(self, backend, user: str) -> None:
        self.root = Path(backend.user_mail_dir(user))
        self.holder = subprocess.Popen(["sleep", "600"])
        self.path = self.root / "dovecot-uidlist.lock"
        self.path.write_text(f"{self.holder.pid}:{socket.gethostname()}")

    def stalled_move_linked(self, timeout: float = 30.0) -> bool:
        """Has a MOVE hard-linked its message into INBOX's tmp/ (and waits for the lock to commit it)?"""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any((self.root / "tmp").iterdir()):
                return True
            time.sleep(0.05)
        return False

    def release(self, timeout: float = 60.0) -> bool:
        """Remove the lock; True once the stalled MOVE committed (INBOX's tmp/ empty again)."""
        self.path.unlink(missing_ok=True)
        self.holder.kill()
        self.holder.wait()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not any((self.root / "tmp").iterdir()):
                return True
            time.sleep(0.1)
        return False


def _stalled_move(host: str, port: int, source: bytes = b"INBOX/Sub") -> Wire:
    """A session that SELECTs *source* and sends ``UID MOVE 1 INBOX`` (its first message), not waiting for it."""
    w = Wire(host, port, timeout=120)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT " + source)[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1 INBOX\r\n")
    return w


def _seed(fleet) -> HeldLock:
    seed(fleet["b1"], "carol", "INBOX", ["in-1@t"])
    seed(fleet["b1"], "carol", "INBOX/Sub", SUB)
    return HeldLock(fleet["b1"], "carol")


def test_dovecot_alone_leaves_a_stalled_move_twice_after_a_rename_of_its_source(fleet):
    """The reference: no proxy. Dovecot's own RENAME within b1 during the stall: two copies."""
    lock = _seed(fleet)
    try:
        w = _stalled_move(fleet["b1"].host, fleet["b1"].port)
        assert lock.stalled_move_linked()
        w.close()  # its client gone, as the proxy killed in the soak
        with fleet["b1"].client("carol") as m:
            assert m.rename('"INBOX/Sub"', '"Other"')[0] == "OK"
    finally:
        assert lock.release()
    counts, where = census(fleet, "carol")
    assert sorted(where["sub-1@t"]) == [("b1", "INBOX"), ("b1", "Other")], where
    assert where["sub-2@t"] == [("b1", "Other")] and where["in-1@t"] == [("b1", "INBOX")], where


@pytest.mark.parametrize("cut", ["whole", "drained"])
def test_proxy_rename_across_after_a_stalled_relayed_move_leaves_what_dovecot_alone_leaves(
        proxy_factory, fleet, cut):
    """Through the proxy, as in the soak: the relayed MOVE stalls, the proxy is killed, the RENAME
    across of its source (case-insensitive ``Inbox/Sub``) runs whole, or is cut right after its
    drain and finished by ``recover``. The message is where Dovecot alone leaves it: in the renamed
    source and in INBOX; never nowhere, and every other message once."""
    lock = _seed(fleet)
    try:
        relay = proxy_factory(MASTERS, rules=RULES)
        w = _stalled_move(relay.host, relay.port)
        assert lock.stalled_move_linked()
        relay.kill()
        w.close()
        proxy = proxy_factory(MASTERS, rules=RULES, **({"command": faulty("--kill-at", "drained")} if cut == "drained" else {}))
        r = Wire(proxy.host, proxy.port, timeout=120)
        r.login("carol")
        r.send(b'r RENAME Inbox/Sub "Shared/50% off"\r\n')
        if cut == "whole":
            assert r.until_tagged(b"r")[-1].startswith(b"r OK"), "the RENAME across was refused"
        else:
            assert r.closed(60), "not killed at drained"
            proxy.process.wait(10)
            recovered = cli("recover", "--config", str(proxy.config_path))
            assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    finally:
        assert lock.release()
    counts, where = census(fleet, "carol")
    assert sorted(where["sub-1@t"]) == [("b1", "INBOX"), ("b3", "Shared/50% off")], where
    assert where["sub-2@t"] == [("b3", "Shared/50% off")] and where["in-1@t"] == [("b1", "INBOX")], where
    assert not os.listdir(Path(fleet["b1"].user_mail_dir("carol")) / "tmp")
    assert _no_entries(proxy)


def test_a_client_still_there_keeps_its_move_and_the_rename_across_takes_its_copy_back(proxy_factory, fleet):
    """The proxy not killed: the stalled MOVE's client stays; the RENAME across runs meanwhile. It
    waits for the MOVE's turn before it sets its source aside (mover.Mover.turn, soak C seed 70552):
    the MOVE commits, OK, and the move takes back its copy of the message that left: once, in INBOX.
    (Before, Dovecot answered the MOVE ``NO Mailbox was deleted under us`` with both copies kept.)"""
    lock = _seed(fleet)
    try:
        proxy = proxy_factory(MASTERS, rules=RULES)
        w = _stalled_move(proxy.host, proxy.port)
        assert lock.stalled_move_linked()
        r = Wire(proxy.host, proxy.port, timeout=120)
        r.login("carol")
        r.send(b'r RENAME Inbox/Sub "Shared/50% off"\r\n')
        time.sleep(3)  # (it copies, commits and waits for the MOVE's turn)
    finally:
        assert lock.release()
    answer = w.until_tagged(b"m")
    assert any(b"[COPYUID " in line for line in answer) and answer[-1].startswith(b"m OK"), answer
    assert r.until_tagged(b"r")[-1].startswith(b"r OK")
    deadline = time.monotonic() + 60
    while not _no_entries(proxy) and time.monotonic() < deadline:  # (finished behind its answer)
        time.sleep(0.2)
    counts, where = census(fleet, "carol")
    assert where["sub-1@t"] == [("b1", "INBOX")], where
    assert where["sub-2@t"] == [("b3", "Shared/50% off")] and where["in-1@t"] == [("b1", "INBOX")], where
    assert _no_entries(proxy)
