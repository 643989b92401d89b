"""A MOVE across whose UID EXPUNGE keeps a source, whatever the tries (another session clearing its
\\Deleted each time, or Dovecot keeping it: soak C 76065), is settled in the session.

Before, it was answered ``NO [COPYUID ...] ... removing them from the source failed and will be retried``
and left to recovery, which needs master users: on a proxy without them (warned at start, CI of c4e7b6e)
the message stayed at both ends for good. Now the sources kept stay, their copies are taken back, the others
are moved, and the client is told so: ``NO [INUSE]``, an EXPUNGE and a COPYUID for each message moved.
A relay in front of the source's Dovecot leaves one UID out of every UID EXPUNGE the proxy sends.
Judged by a census of the backends, by content.
"""

from __future__ import annotations

import re
import socket

import pytest
from createrelay import Relay, _close
from imapwire import Wire
from movecheck import census, journal_empty, seed
from test_moves import MASTERS

from referral_proxy.imap.uidset import expand_uid_set, uid_set

pytestmark = pytest.mark.usefixtures("clean_mail")

_EXPUNGE = re.compile(rb"^(\S+ UID EXPUNGE )(\S+)$")


class KeepingRelay(Relay):
    """Relays as it is, except that *kept* is left out of each ``UID EXPUNGE`` sent up (``expunges``: how many)."""

    def __init__(self, host: str, port: int, kept: int) -> None:
        super().__init__(host, port)
        self.kept = kept
        self.expunges = 0

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        pending = b""
        try:
            while data := src.recv(65536):
                if not up:
                    dst.sendall(data)
                    continue
                pending += data  # (upward: commands and APPEND literals, none of them ending in a UID EXPUNGE line)
                *lines, pending = pending.split(b"\r\n")
                out = []
                for line in lines:
                    if (m := _EXPUNGE.match(line)) and self.kept in expand_uid_set(m.group(2)):
                        self.expunges += 1
                        rest = [u for u in expand_uid_set(m.group(2)) if u != self.kept]
                        line = m.group(1) + (uid_set(rest) if rest else b"999999")
                    out.append(line + b"\r\n")
                if out:
                    dst.sendall(b"".join(out))
        except OSError:
            pass
        finally:
            _close(src, dst)


@pytest.mark.parametrize("masters", [False, True], ids=["no-master-user", "master-users"])
def test_a_source_the_expunge_keeps_stays_and_its_copy_is_taken_back(fleet, proxy_factory, masters):
    ids = [f"kept-{i}@t" for i in range(10)]
    seed(fleet["b1"], "alice", "Src", ids, size=2000)
    with fleet["b3"].client("alice") as m:
        m.create("Shared/Dst")
    b1 = fleet["b1"]
    relay = KeepingRelay(b1.host, b1.port, kept=3)
    relay.start()
    try:
        backends = {b: dict(MASTERS["backends"][b]) if masters else {} for b in ("b1", "b2", "b3")}
        backends["b1"]["endpoint"] = relay.endpoint()
        proxy = proxy_factory({"backends": backends}, rules=[{"mailbox": "Shared/*", "backend": "b3"}])
        w = Wire(proxy.host, proxy.port)
        w.login("alice")
        w.cmd(b"s", b"SELECT Src")
        reply = w.cmd(b"m", b"UID MOVE 1:* Shared/Dst")
        assert relay.expunges >= 1, reply
        assert reply[-1].startswith(b"m NO [INUSE] "), reply
        assert sum(line.endswith(b" EXPUNGE\r\n") for line in reply) == 9, reply
        copyuids = [line.split()[4] for line in reply if line.startswith(b"* OK [COPYUID ")]
        assert [expand_uid_set(c) for c in copyuids] == [[1, 2, 4, 5, 6, 7, 8, 9, 10]], reply
        _counts, where = census(fleet, "alice")
        assert {i: where[i] for i in ids} == {i: [("b1", "Src")] if i == "kept-2@t" else [("b3", "Shared/Dst")]
                                             for i in ids}
        kept = w.cmd(b"f", b"UID FETCH 1:* (UID FLAGS)")[:-1]  # the one left, its \Deleted (the move's) taken back
        assert len(kept) == 1 and kept[0].startswith(b"* 1 FETCH (UID 3 FLAGS (") and b"\\Deleted" not in kept[0], kept
        w.close()
        assert journal_empty(proxy)
    finally:
        relay.close()
