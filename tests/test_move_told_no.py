"""A MOVE (or COPY) across answered NO while its copies may be at the destination is undone, not finished.

Probe h1 (stop 58): the destination Dovecot killed right after its MULTIAPPEND saved the copies; the client
heard ``NO backend b2 closed the connection`` (or ``NO [UNAVAILABLE] ... the move will be completed, or the
source kept``), and 3 s later the proxy's recovery finished the move: the messages the client was told
were not moved left the source (6 of 6). The NO is now recorded before it is said, and recovery takes the
copies back instead: each message stays in the source only, as NO says. A relay in front of the
destination's Dovecot cuts the transfer's connection once, at the chosen point. Judged by a census.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from createrelay import Relay, _close
from imapwire import Wire
from movecheck import census, journal_empty, seed
from test_moves import MASTERS, RULES

pytestmark = pytest.mark.usefixtures("clean_mail")


class CuttingRelay(Relay):
    """Relays as it is until *pattern* is seen (*up*: in a command sent up; else in a response coming down):
    then, once, that connection is closed both ways, the bytes holding it not passed on."""

    def __init__(self, host: str, port: int, pattern: bytes, up: bool) -> None:
        super().__init__(host, port)
        self.pattern, self.up = pattern, up
        self.cut = threading.Event()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        tail = b""
        try:
            while data := src.recv(65536):
                seen = tail + data
                if up == self.up and self.pattern in seen and not self.cut.is_set():
                    self.cut.set()
                    return
                tail = seen[-256:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            _close(src, dst)


@pytest.mark.parametrize("command, pattern, up", [
    (b"UID MOVE", b"OK [APPENDUID ", False),  # saved, the answer never heard: the commit unknown (CommitUnknown)
    (b"UID MOVE", b"EXAMINE Shared/Dst", True),  # saved and answered, gone before the copies were checked
    (b"UID COPY", b"OK [APPENDUID ", False),  # a COPY so told: its copies taken back too (movefinish.undo_copy)
], ids=["commit-unheard", "before-the-check", "copy-commit-unheard"])
def test_a_move_answered_no_leaves_the_messages_in_the_source_only(fleet, proxy_factory, command, pattern, up):
    ids = [f"told-no-{i}@t" for i in range(6)]
    seed(fleet["b1"], "carol", "Src", ids, size=4000)
    with fleet["b3"].client("carol") as m:
        m.create("Shared/Dst")
    b3 = fleet["b3"]
    relay = CuttingRelay(b3.host, b3.port, pattern, up)
    relay.start()
    try:
        backends = {b: dict(MASTERS["backends"][b]) for b in ("b1", "b2", "b3")}
        backends["b3"]["endpoint"] = relay.endpoint()
        proxy = proxy_factory({"backends": backends}, rules=RULES)
        w = Wire(proxy.host, proxy.port)
        w.login("carol")
        w.cmd(b"s", b"SELECT Src")
        reply = w.cmd(b"m", command + b" 1:* Shared/Dst")
        assert relay.cut.is_set(), reply
        done = b"moved" if b"MOVE" in command else b"copied"
        assert reply[-1].startswith(b"m NO [UNAVAILABLE] ") and b"nothing was " + done in reply[-1], reply
        assert not [line for line in reply if line.endswith(b" EXPUNGE\r\n")], reply
        deadline = time.monotonic() + 60  # the proxy's own recovery, every few seconds
        while True:
            _counts, where = census(fleet, "carol")
            left = {i: where[i] for i in ids if where[i] != [("b1", "Src")]}
            if not left and journal_empty(proxy) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert left == {}, left
        assert journal_empty(proxy)
        assert w.cmd(b"n", b"UID SEARCH ALL")[0] == b"* SEARCH 1 2 3 4 5 6\r\n"  # the session's view, as it was told
        w.close()
    finally:
        relay.close()


def test_without_master_users_the_no_says_the_messages_may_have_been_copied(fleet, proxy_factory):
    """Recovery cannot log in to take copies back without master users (README): the NO does not promise it."""
    ids = [f"told-maybe-{i}@t" for i in range(3)]
    seed(fleet["b1"], "carol", "Src", ids, size=4000)
    with fleet["b3"].client("carol") as m:
        m.create("Shared/Dst")
    b3 = fleet["b3"]
    relay = CuttingRelay(b3.host, b3.port, b"OK [APPENDUID ", False)
    relay.start()
    try:
        proxy = proxy_factory({"backends": {"b3": {"endpoint": relay.endpoint()}}}, rules=RULES)
        w = Wire(proxy.host, proxy.port)
        w.login("carol")
        w.cmd(b"s", b"SELECT Src")
        for tag, command in ((b"c", b"UID COPY 1:* Shared/Dst"), (b"m", b"UID MOVE 1:* Shared/Dst")):
            relay.cut.clear()
            reply = w.cmd(tag, command)
            assert relay.cut.is_set(), reply
            assert reply[-1].startswith(tag + b" NO [UNAVAILABLE] ") and b"they may have been copied" in reply[-1], reply
            assert b"taken back" not in reply[-1] and b"will be completed" not in reply[-1], reply  # (probe i1)
        assert census(fleet, "carol")[1][ids[0]][0] == ("b1", "Src")  # (the source untouched: no EXPUNGE said)
        w.close()
    finally:
        relay.close()
