"""A mailbox named ``*`` is a name (RFC 3501 allows it; Dovecot keeps it): a client's RENAME
of it to another server must give it the new name. Before, the mover took ``old == "*"`` for
the admin's whole-user move: ``RENAME "*" Shared/star`` answered OK, held every name of the user,
and carried ``*`` and ``*/kid`` to b3 under their OLD names (placed there), no ``Shared/star``.
Judged by a census of the backends and the map."""

from __future__ import annotations

import pytest
from movecheck import census, cli, faulty, seed
from test_moves import MASTERS, RULES, _exactly_once, _logged_in, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


@pytest.mark.parametrize("to, far", [("Shared/star", "b3"), ("Archive/*", "b2")])
def test_a_mailbox_named_star_renamed_across_servers_gets_its_new_name(proxy_factory, fleet, to, far):
    star, kid, work = ids("star", 2), ids("kid", 2), ids("work", 2)
    seed(fleet["b1"], "carol", "*", star)
    seed(fleet["b1"], "carol", "*/kid", kid)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    reply = w.cmd(b"r", b'RENAME "*" "' + to.encode() + b'"')
    assert reply[-1].startswith(b"r OK"), reply
    assert w.cmd(b"s", b"STATUS Work (MESSAGES)")[-1].startswith(b"s OK")  # not every name was held
    w.close()
    _exactly_once(fleet, proxy, "carol", star + kid + work)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in star} == {(far, to)} and {where[i][0] for i in kid} == {(far, to + "/kid")}
    assert {where[i][0] for i in work} == {("b1", "Work")}
    shown = cli("map", "--config", str(proxy.config_path), "show", "carol").stdout
    lines = {line.strip() for line in shown.splitlines()}
    assert not {f"* -> {far}", f"*/kid -> {far}"} & lines, shown
    assert _no_entries(proxy)


@pytest.mark.parametrize("step", [None, "copied", "committed", "placed", "aside", "drained"])
def test_a_child_named_star_renamed_across_and_recovered_takes_only_itself(proxy_factory, fleet, step):
    """Soak seed 49164 (dup20a): ``RENAME inbox/Sub/* Shared/Z`` -- INBOX/Sub's child named ``*``,
    INBOX spelled in lower case -- lost to a kill and recovered. As a LIST pattern ``INBOX/Sub/*``
    would take INBOX/Sub/k and INBOX/Sub/x too; as the name it is, only ``*`` and its own child
    move, whole or cut at any step and finished or undone by ``recover``."""
    star, star_kid, sub, k, x = ids("star", 2), ids("starkid", 1), ids("sub", 2), ids("k", 2), ids("x", 1)
    seed(fleet["b1"], "carol", "INBOX/Sub", sub)
    seed(fleet["b1"], "carol", "INBOX/Sub/*", star)
    seed(fleet["b1"], "carol", "INBOX/Sub/*/c", star_kid)
    seed(fleet["b1"], "carol", "INBOX/Sub/k", k)
    seed(fleet["b1"], "carol", "INBOX/Sub/x", x)
    proxy = proxy_factory(MASTERS, rules=RULES, **({"command": faulty("--kill-at", step)} if step else {}))
    w = _logged_in(proxy)
    w.send(b'r RENAME "inbox/Sub/*" Shared/Z\r\n')
    if step is None:
        assert w.until_tagged(b"r")[-1].startswith(b"r OK")
        w.close()
    else:
        assert w.closed(60), "not killed at " + step
        proxy.process.wait(10)
        recovered = cli("recover", "--config", str(proxy.config_path))
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        proxy.start()  # (started again without the kill point: the census looks through it too)
    _exactly_once(fleet, proxy, "carol", star + star_kid + sub + k + x)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in sub} == {("b1", "INBOX/Sub")}, where
    assert {where[i][0] for i in k} == {("b1", "INBOX/Sub/k")} and where[x[0]] == [("b1", "INBOX/Sub/x")], where
    if step in (None, "committed", "placed", "aside", "drained"):  # at or past the commit point: finished
        assert {where[i][0] for i in star} == {("b3", "Shared/Z")}, where
        assert where[star_kid[0]] == [("b3", "Shared/Z/c")], where
    else:  # undone
        assert {where[i][0] for i in star} == {("b1", "INBOX/Sub/*")}, where
    assert _no_entries(proxy)
