"""A roll-back must never strand a child under a private aside name (against real Dovecot).

Seen in a soak (seed 14707, --workers 2): a RENAME across, Shared/X on b3 to Work on b1, where b1
had Work/c but no Work. The move CREATEd Work on b1 and was cut off; its roll-back renamed Work
aside to delete it only if empty, and Dovecot's RENAME carried Work/c (59 messages) with it, to
``referral-proxy-aside-<token>/undo-0/c``: out of every client's sight, and recovery stuck on
"EXAMINE failed ... undo-0" (a DELETE of the aside with a child leaves it listed, not openable).
Judged by a census of the backends and by what a client of the proxy reaches.
"""

from __future__ import annotations

import pytest
from movecheck import census, cli, deliver_on, faulty, judge, seed, through_proxy, wait_paused
from test_moves import MASTERS, RULES, _logged_in, _no_entries, ids, rename_killed_at_created

pytestmark = pytest.mark.usefixtures("clean_mail")


def _names(backend, user: str = "carol") -> list[bytes]:
    with backend.client(user) as m:
        return [n for n in (m.list()[1] or []) if n]


def _selectable(names: list[bytes], name: bytes) -> bool:
    return any(n.endswith(b'"/" ' + name) and b"\\Noselect" not in n for n in names)


def _killed_after_create(proxy_factory, fleet) -> tuple[object, list[str], list[str], str]:
    """Shared/X (b3) renamed to Work (b1, which holds Work/c but no Work), the proxy killed with
    Work created on b1: (proxy, Shared/X's ids, Work/c's ids, the roll-back's aside name)."""
    shared, child = ids("shared", 5), ids("workc", 59)
    seed(fleet["b3"], "carol", "Shared/X", shared)
    seed(fleet["b1"], "carol", "Work/c", child)
    proxy, aside = rename_killed_at_created(proxy_factory, "Shared/X", "Work")
    assert _selectable(_names(fleet["b1"]), b"Work")
    return proxy, shared, child, aside


def _exactly_as_before(fleet, proxy, shared: list[str], child: list[str], work: list[str] = (),
                       source: str = "Shared/X") -> None:
    """Every message once, in its own mailbox, Work/c still there with its mail, nothing aside,
    everything reachable through the proxy; Work selectable only if mail was delivered to it."""
    names = _names(fleet["b1"])
    assert not [n for n in names if b"referral-proxy-aside-" in n], names
    assert _selectable(names, b"Work/c"), names
    assert _selectable(names, b"Work") == bool(work), names
    counts, where = census(fleet, "carol")
    assert judge(counts, shared + child + list(work)) == ([], [])
    assert {where[i][0] for i in child} == {("b1", "Work/c")}
    assert {where[i][0] for i in shared} == {("b3", source)}
    assert {where[i][0] for i in work} <= {("b1", "Work")}
    if proxy.process.poll() is not None:
        proxy.start()
    reached = through_proxy(proxy, "carol")
    assert [i for i in counts if reached[i] != 1] == []
    assert _no_entries(proxy)


def test_a_roll_back_deletes_the_created_parent_and_keeps_the_child_in_place(proxy_factory, fleet):
    """Recovery rolls the killed RENAME back: Work, created by the move and empty, is deleted;
    Work/c stays where it was with its 59 messages (before: Work was renamed aside with Work/c,
    renamed back, and kept: 'holds mail that is not this move's')."""
    proxy, shared, child, _aside = _killed_after_create(proxy_factory, fleet)
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "rolled back" in recovered.stdout, recovered.stdout + recovered.stderr
    _exactly_as_before(fleet, proxy, shared, child)


def test_a_move_failing_after_the_create_rolls_back_in_process_and_keeps_the_child(proxy_factory, fleet, tmp_path):
    """Not killed: the RENAME fails after Work was created on b1 (its source renamed away directly on
    b3 meanwhile), and the proxy rolls back at once: Work deleted, Work/c in place with its mail."""
    shared, child = ids("shared", 5), ids("workc", 59)
    seed(fleet["b3"], "carol", "Shared/X", shared)
    seed(fleet["b1"], "carol", "Work/c", child)
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--pause-at", "created:1", "--pause-dir", str(pause)))
    w = _logged_in(proxy)
    w.send(b"r RENAME Shared/X Work\r\n")
    wait_paused(pause, "created:1")
    with fleet["b3"].client("carol") as m:
        assert m.rename("Shared/X", "Shared/Y")[0] == "OK"
    (pause / "resume").touch()
    answer = w.until_tagged(b"r")
    assert answer[-1].startswith(b"r NO"), answer
    w.close()
    _exactly_as_before(fleet, proxy, shared, child, source="Shared/Y")


def test_a_roll_back_whose_parent_got_mail_keeps_it_and_the_child_in_place(proxy_factory, fleet):
    """A delivery reached the created Work before the roll-back: Work is kept with it, Work/c too."""
    proxy, shared, child, _aside = _killed_after_create(proxy_factory, fleet)
    late = ids("late", 1)
    with fleet["b1"].client("carol") as m:
        assert deliver_on(m, "Work", late[0]) == "Work"
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "rolled back" in recovered.stdout, recovered.stdout + recovered.stderr
    _exactly_as_before(fleet, proxy, shared, child, late)


@pytest.mark.parametrize("then", ["renamed", "deleted", "delivered"])
def test_children_stranded_under_the_aside_by_a_cut_off_roll_back_are_put_back(proxy_factory, fleet, then):
    """A roll-back of today's code cut off after its RENAME aside left Work/c under the aside:
    *renamed* (just that), *deleted* (the aside DELETEd too, as in the soak: listed, not openable,
    its child still under it), *delivered* (the aside holds a message delivered to Work before).
    Recovery puts the child back as Work/c and settles the aside: nothing lost, nothing aside."""
    proxy, shared, child, aside = _killed_after_create(proxy_factory, fleet)
    late = ids("late", 1) if then == "delivered" else []
    with fleet["b1"].client("carol") as m:
        if late:
            assert deliver_on(m, "Work", late[0]) == "Work"
        assert m.rename("Work", aside)[0] == "OK"  # Dovecot carries Work/c along
        if then == "deleted":
            assert m.delete(aside)[0] == "OK"
    names = _names(fleet["b1"])
    assert _selectable(names, aside.encode() + b"/c") and not _selectable(names, b"Work/c"), names
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "rolled back" in recovered.stdout, recovered.stdout + recovered.stderr
    _exactly_as_before(fleet, proxy, shared, child, late)


@pytest.mark.parametrize("killed", [False, True])
def test_a_child_made_on_the_source_during_a_move_is_put_back_not_left_aside(proxy_factory, fleet, tmp_path, killed):
    """Past the commit point each source is renamed aside to be emptied and deleted; Dovecot's RENAME
    carries a child the move did not take (made straight on the backend meanwhile, as a delivery with
    :create would) along. Before, it was left under the aside name ('kept on b1 under ...'): out of
    every client's sight. It is put back as Work/new on b1, where the rules send it; *killed*: the
    proxy killed right after that RENAME aside, recovery finishes the move."""
    work, new = ids("work", 20), ids("new", 7)
    seed(fleet["b1"], "carol", "Work", work)
    pause = tmp_path / "pause"
    pause.mkdir()
    options = ["--pause-at", "placed:1", "--pause-dir", str(pause)] + (["--kill-at", "aside:1"] if killed else [])
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty(*options))
    w = _logged_in(proxy)
    w.send(b"r RENAME Work Shared/W\r\n")
    wait_paused(pause, "placed:1")
    seed(fleet["b1"], "carol", "Work/new", new)
    (pause / "resume").touch()
    if killed:
        assert w.closed(30), "the proxy was not killed at aside:1"
        proxy.process.wait(10)
        recovered = cli("recover", "--config", str(proxy.config_path))
        assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
        proxy.start()
    else:
        reply = w.until_tagged(b"r")
        assert reply[-1].startswith(b"r OK"), reply
        w.close()
    names = _names(fleet["b1"])
    assert not [n for n in names if b"referral-proxy-aside-" in n], names
    counts, where = census(fleet, "carol")
    assert judge(counts, work + new) == ([], [])
    assert {where[i][0] for i in work} == {("b3", "Shared/W")}
    assert {where[i][0] for i in new} == {("b1", "Work/new")}
    reached = through_proxy(proxy, "carol")
    assert [i for i in counts if reached[i] != 1] == []
    assert _no_entries(proxy)
