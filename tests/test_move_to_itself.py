"""A MOVE into the selected mailbox itself is refused (probe x4, stop 52): Dovecot 2.3.19 answers one whose set
names a message another session expunged meanwhile NO [EXPUNGEISSUED], having expunged the others without copying
them: lost, directly and through the proxy alike (/tmp/probes/x4/move_to_self.py). A COPY there is relayed."""

from __future__ import annotations

import pytest

from referral_proxy.testing.fakes import SessionHarness


def _selected(name: bytes) -> SessionHarness:
    h = SessionHarness()
    h.login()
    h.send(b"s SELECT " + name + b"\r\n")
    h.from_backend(h.to_backend().split(b" ")[0] + b" OK [READ-WRITE] selected\r\n")
    h.to_client()
    return h


@pytest.mark.parametrize("selected,command", [(b"INBOX", b"MOVE 1:3 INBOX"), (b"INBOX", b"UID MOVE 4 inbox"),
                                              (b"Work", b'UID MOVE 1:* "Work"'), (b"Work/Sub", b"MOVE 2 Work/Sub")])
def test_a_move_into_the_selected_mailbox_is_refused(selected, command):
    h = _selected(selected)
    h.send(b"m " + command + b"\r\nn NOOP\r\n")
    assert h.to_client().startswith(b"m NO [CANNOT] Messages are not moved into the mailbox they are in")
    sent = h.to_backend()
    assert sent.endswith(b"NOOP\r\n") and b"MOVE" not in sent, sent


def test_a_copy_into_it_is_relayed():
    h = _selected(b"Work")
    h.send(b"c COPY 1 Work\r\n")
    assert h.to_backend().endswith(b" COPY 1 Work\r\n")
