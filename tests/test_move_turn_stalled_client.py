"""A client that sends a FETCH of bodies and a UID MOVE in one write and then never reads must not
hold the mailbox's MOVE turn (turns.py): every other session's MOVE of that mailbox waited for it
for as long as that client stayed connected (Dovecot direct runs the other session's MOVE at once:
it never reaches the stalled session's MOVE, which waits behind the FETCH's output). The MOVE now
takes its turn once no command of its session is in flight (copycommand.CopyCommands._move_in_turn)."""

from __future__ import annotations

import socket
import threading

import pytest
from imapwire import Wire
from movecheck import census, seed

pytestmark = pytest.mark.usefixtures("clean_mail")


def test_a_move_behind_output_a_client_never_reads_holds_no_turn(proxy_factory, fleet):
    mail = [f"stall-{i}@t" for i in range(40)]
    seed(fleet["b1"], "carol", "Work", mail, size=200_000)  # 8 MB: more than the sockets between hold
    for box in ("A", "B"):
        seed(fleet["b1"], "carol", box, [])
    proxy = proxy_factory()
    stalled = Wire(proxy.host, proxy.port)
    stalled.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    other = Wire(proxy.host, proxy.port)
    for w in (stalled, other):
        w.login("carol")
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    stalled.send(b"f FETCH 1:* BODY.PEEK[]\r\nm UID MOVE 1 A\r\n")  # and never read again
    assert other.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")  # (the proxy has read the stalled one's write)
    answer: list[bytes] = []
    moving = threading.Thread(target=lambda: answer.extend(other.cmd(b"m", b"UID MOVE 2 B")), daemon=True)
    moving.start()
    moving.join(60)  # a bound on a hang, not a measure: answered in milliseconds (main: not until the other closes)
    answered = list(answer)
    stalled.close()
    moving.join()
    assert answered and answered[-1].startswith(b"m OK"), answer
    assert other.cmd(b"z", b"NOOP")[-1].startswith(b"z OK")
    other.close()
    counts, where = census(fleet, "carol")
    assert {i: where[i] for i in mail if counts[i] != 1} == {}
    assert where["stall-1@t"] == [("b1", "B")]  # the stalled session's MOVE never ran: nor directly

