"""A mailbox named ``*`` is a name (RFC 3501 allows it; Dovecot keeps it): a client's RENAME
of it to another server must give it the new name. Before, the mover took ``old == "*"`` for
the admin's whole-user move: ``RENAME "*" Shared/star`` answered OK, held every name of the user,
and carried ``*`` and ``*/kid`` to b3 under their OLD names (placed there), no ``Shared/star``.
Judged by a census of the backends and the map."""

from __future__ import annotations

import pytest
from movecheck import census, cli, seed
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
