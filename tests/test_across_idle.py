"""A session in IDLE while another session MOVEs messages across servers into and out of its
mailbox, against real Dovecot: the idler hears `* n EXISTS` for one moved in and `* n EXPUNGE`
for one moved out, as it would from Dovecot's own MOVE, and its view then matches the backend's.
(It held when first tried; no other test has an idler beside a move across.) Census judged."""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, seed

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}]
MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}


def _until(w: Wire, word: bytes) -> list[bytes]:
    """Untagged lines the idler hears up to the first holding *word* (the Wire's timeout ends a hang)."""
    got = [w.line()]
    while word not in got[-1]:
        got.append(w.line())
    return got


def _ids(w: Wire) -> list[bytes]:
    lines = w.cmd(b"f", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    return [line.split(b"<")[1].split(b">")[0] for line in lines if line.startswith(b"Message-Id: <")]


def _idle_beside(idler: Wire, mover: Wire, tag: bytes, moves: list[tuple[bytes, bytes, bytes]]) -> None:
    """*idler* in IDLE while *mover* runs each (SELECT mailbox, MOVE command, the line the idler must hear)."""
    idler.send(tag + b" IDLE\r\n")
    assert idler.line().startswith(b"+ ")
    for box, move, heard in moves:
        assert mover.cmd(b"s", b"SELECT " + box)[-1].startswith(b"s OK")
        assert mover.cmd(b"m", move)[-1].startswith(b"m OK")
        assert _until(idler, heard.split()[-1])[-1] == heard + b"\r\n"
    idler.send(b"DONE\r\n")
    assert idler.until_tagged(tag)[-1].startswith(tag + b" OK")


def test_an_idler_hears_moves_across_into_and_out_of_its_mailbox(proxy_factory, fleet):
    seed(fleet["b1"], "carol", "INBOX", ["in-0@t", "in-1@t", "in-2@t"])
    seed(fleet["b3"], "carol", "Shared/P", ["p-0@t", "p-1@t"])
    proxy = proxy_factory(MASTERS, rules=RULES)
    idler, mover = Wire(proxy.host, proxy.port), Wire(proxy.host, proxy.port)
    idler.login("carol")
    mover.login("carol")
    assert idler.cmd(b"s", b"SELECT Shared/P")[-1].startswith(b"s OK")
    _idle_beside(idler, mover, b"i", [(b"INBOX", b"MOVE 2 Shared/P", b"* 3 EXISTS"),  # in-1, b1 -> b3
                                      (b"Shared/P", b"MOVE 1 INBOX", b"* 1 EXPUNGE")])  # p-0, b3 -> b1
    assert _ids(idler) == [b"p-1@t", b"in-1@t"]
    assert idler.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    _idle_beside(idler, mover, b"j", [(b"INBOX", b"UID MOVE 1 Shared/P", b"* 1 EXPUNGE")])  # in-0, b1 -> b3
    assert _ids(idler) == [b"in-2@t", b"p-0@t"]
    idler.close()
    mover.close()
    counts, where = census(fleet, "carol")
    assert dict(counts) == {i: 1 for i in ("in-0@t", "in-1@t", "in-2@t", "p-0@t", "p-1@t")}, where
    assert {i for i, w in where.items() if w[0][0] == "b3"} == {"in-0@t", "in-1@t", "p-1@t"}, where
