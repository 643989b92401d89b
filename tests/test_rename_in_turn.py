"""A session MOVEs every message out of its selected mailbox while another RENAMEs that mailbox within
the same backend, at the same moment. Dovecot's MOVE copies, then expunges: a RENAME between the two
leaves the copies in the destination and the originals under the new name, the MOVE answered
"NO Mailbox was deleted under us" (Dovecot 2.3.19 direct: 6 of 60 rounds; through the proxy on main:
2 of 60, 3 messages each, tests/race_pairs.py; this test, 20 each: 2 to 4 of 30). The proxy's RENAME
on one backend now waits for the MOVEs out of the mailbox under way (crossturns.py). The same with
the selected mailbox a child of the one renamed (Dovecot renames it along: direct 5 of 40 rounds,
through the proxy on main 4 of 40). Judged by a census: every message once."""

from __future__ import annotations

import pytest
from imapwire import Wire, at_once
from movecheck import census, seed

pytestmark = pytest.mark.usefixtures("clean_mail")

ROUNDS = 30
PER_BOX = 20  # a longer MOVE: a wider window between its copy and its expunge


@pytest.mark.parametrize("parent", [False, True])
def test_a_rename_of_the_source_during_a_move_leaves_every_message_once(proxy_factory, fleet, parent):
    mail = []
    source = "P{i}/S{i}" if parent else "S{i}"
    renamed = b"P%d" if parent else b"S%d"
    for i in range(ROUNDS):
        ids = [f"src-{i}-{k}@t" for k in range(PER_BOX)]
        seed(fleet["b1"], "carol", source.format(i=i), ids, size=300)
        seed(fleet["b1"], "carol", f"A{i}", [])
        mail += ids
    proxy = proxy_factory()
    renamer = Wire(proxy.host, proxy.port, timeout=120)
    renamer.login("carol")
    answers = []
    for i in range(ROUNDS):
        mover = Wire(proxy.host, proxy.port, timeout=120)  # Dovecot says BYE once its selected mailbox is gone
        mover.login("carol")
        assert mover.cmd(b"s", b"SELECT " + source.format(i=i).encode())[-1].startswith(b"s OK")
        answers.append(at_once([mover, renamer], [b"a UID MOVE 1:* A%d\r\n" % i,
                                                  b"b RENAME " + renamed % i + b" N%d\r\n" % i], [b"a", b"b"]))
        mover.close()
    renamer.close()
    counts, where = census(fleet, "carol")
    bad = {m: where[m] for m in mail if counts[m] != 1}
    assert not bad, f"{len({m.split('-')[1] for m in bad})} of {ROUNDS} rounds: {bad} {answers}"
