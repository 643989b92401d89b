"""Cross-server moves never lose or duplicate mail (issue 9): one test per case, against real Dovecot.

Judged by a census of the backends (every message by its Message-Id, movecheck.py),
and by what a client of the proxy can reach, never by the proxy's own answers.
"""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import time

import pytest
from imapwire import Wire, at_once
from movecheck import (
    LEFT_TO_RECOVER,
    QUICK_REFUSAL,
    Deliverer,
    census,
    cli,
    deliver,
    deliver_on,
    faulty,
    inbox_apart,
    journal_empty,
    journal_killed_move,
    journal_store,
    judge,
    merged,
    multiappend,
    quote,
    seed,
    start_paused,
    through_proxy,
    wait_paused,
)
from storehelp import now

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Archive/*", "backend": "b2"},
         {"user": "bob", "mailbox": "*", "backend": "b2"}]
MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}


def ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}@t" for i in range(n)]


def _logged_in(proxy, user: str = "carol") -> Wire:
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login(user)
    return w


def _at_once(wires: list[Wire], commands: list[bytes]) -> list[bytes]:
    """Send each command on its own connection at the same moment; each one's tagged answer."""
    tags = [b"r%d" % i for i in range(len(wires))]
    return at_once(wires, [t + b" " + c + b"\r\n" for t, c in zip(tags, commands)], tags)


_store = journal_store  # the proxy's map store (SQLite, or PostgreSQL with RP_TEST_STORE), as another process opens it
_no_entries = journal_empty


def _exactly_once(fleet, proxy, user: str, must, may=(), hidden=()) -> None:
    """Every *must* message once on the backends (*may* ones at most once), nothing else; and each
    reachable through the proxy (but *hidden* ones, which were out of its sight from the start)."""
    counts, where = census(fleet, user)
    lost, duplicated = judge(counts, must, may)
    assert not lost and not duplicated, (f"lost {lost[:5]} ({len(lost)}), duplicated "
                                         f"{[(d, where[d]) for d in duplicated[:5]]} ({len(duplicated)})")
    reached = through_proxy(proxy, user)
    unreachable = [i for i in counts if reached[i] != 1 and i not in hidden]
    assert not unreachable, f"unreachable through the proxy: {[(i, where[i]) for i in unreachable[:5]]}"


# -- 1. two overlapping RENAMEs ---------------------------------------------------------------------


@pytest.mark.parametrize("run", range(4))
def test_overlapping_renames_one_wins_the_other_is_untouched(proxy_factory, fleet, run):
    big, child, small = ids("big", 1500), ids("bigc", 10), ids("small", 5)
    seed(fleet["b1"], "carol", "Big", big, size=400)
    seed(fleet["b1"], "carol", "Big/c", child)
    seed(fleet["b1"], "carol", "Small", small)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w1, w2 = _logged_in(proxy), _logged_in(proxy)
    a1, a2 = _at_once([w1, w2], [b"RENAME Big Shared/Z", b"RENAME Small Shared/Z/c"])
    assert [a1.startswith(b"r0 OK"), a2.startswith(b"r1 OK")].count(True) == 1, (a1, a2)
    loser = a2 if a1.startswith(b"r0 OK") else a1
    assert b" NO [INUSE]" in loser or b" NO [ALREADYEXISTS]" in loser, loser
    _exactly_once(fleet, proxy, "carol", big + child + small)
    counts, where = census(fleet, "carol")
    if a1.startswith(b"r0 OK"):  # the loser's mailbox is where it was, whole
        assert {where[i][0] for i in small} == {("b1", "Small")}
        assert {where[i][0] for i in child} == {("b3", "Shared/Z/c")}
    else:
        assert {where[i][0] for i in small} == {("b3", "Shared/Z/c")}
        assert {where[i][0] for i in big} == {("b1", "Big")}
    assert _no_entries(proxy)


# -- 2. the same mailbox renamed twice at once -----------------------------------------------------------


def test_the_same_mailbox_renamed_twice_at_once_moves_once(proxy_factory, fleet):
    work = ids("work", 300)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    answers = _at_once([_logged_in(proxy), _logged_in(proxy)], [b"RENAME Work Shared/A", b"RENAME Work Shared/B"])
    assert sum(a.split()[1] == b"OK" for a in answers) == 1, answers
    assert any(b"NO [INUSE]" in a or b"NO [NONEXISTENT]" in a for a in answers), answers
    _exactly_once(fleet, proxy, "carol", work)


def test_two_proxy_processes_sharing_the_store_rename_the_same_mailbox_once(proxy_factory, fleet, tmp_path):
    work, child = ids("work", 300), ids("workc", 5)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Work/c", child)
    store = tmp_path / "shared.sqlite3"
    shared = {**MASTERS, "map": {"store": f"sqlite:{store}"}}
    p1, p2 = proxy_factory(shared, rules=RULES), proxy_factory(shared, rules=RULES)
    answers = _at_once([_logged_in(p1), _logged_in(p2)], [b"RENAME Work Shared/A", b"RENAME Work Archive/B"])
    assert sum(a.split()[1] == b"OK" for a in answers) == 1, answers
    assert any(b"NO [INUSE]" in a or b"NO [NONEXISTENT]" in a for a in answers), answers
    _exactly_once(fleet, p1, "carol", work + child)
    _exactly_once(fleet, p2, "carol", work + child)
    counts, where = census(fleet, "carol")
    to = ("b3", "Shared/A") if answers[0].split()[1] == b"OK" else ("b2", "Archive/B")
    assert {where[i][0] for i in work} == {to} and {where[i][0] for i in child} == {(to[0], to[1] + "/c")}
    assert _no_entries(p1) and _no_entries(p2)


# -- 3. mail delivered to the source during a move -------------------------------------------------------------


@pytest.mark.parametrize("run", range(2))
def test_mail_delivered_during_an_admin_move_is_never_lost(proxy_factory, fleet, run):
    work = ids("work", 400)
    seed(fleet["b1"], "carol", "Work", work, size=3000)
    proxy = proxy_factory(MASTERS, rules=RULES)
    # Bursts of deliveries 20 ms apart. (One that commits at the very moment the source is renamed
    # aside leaves its lock in the renamed maildir: the move then leaves its end to recovery.)
    deliverers = [Deliverer(fleet["b1"], "carol", "Work", f"live{run}{k}", pause=0.02, burst=25) for k in range(2)]
    for d in deliverers:
        d.start()
    try:
        result = cli("move", "--config", str(proxy.config_path), "carol", "Work", "b3", timeout=600)
    finally:
        for d in deliverers:
            d.stop()
    assert "nothing changed" not in result.stderr
    if result.returncode != 0:  # committed, its end left to recovery: deliveries are over now
        assert "move committed but not finished" in result.stderr, result.stdout + result.stderr
        recovered = cli("recover", "--config", str(proxy.config_path), timeout=600)
        assert "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    acked = [i for d in deliverers for i in d.acked]
    refused = [i for d in deliverers for i in d.refused]
    assert len(acked) > 20, "the deliveries did not overlap the move"
    _exactly_once(fleet, proxy, "carol", work + acked, may=refused)
    assert _no_entries(proxy)


# copying:2, delta-copying:2: the batch's hashes journaled, its MULTIAPPEND open before its last byte.
MOVE_STEPS = ["reserved:1", "planned:1", "creating:1", "created:1", "copying:1", "copying:2", "copied:1",
              "committed:1", "subscribed:1", "placed:1", "aside:1", "delta-copying:1", "delta-copying:2",
              "delta-copied:1", "drained:1"]


@pytest.mark.parametrize("step", MOVE_STEPS)
def test_delivery_at_each_step_of_a_rename_is_carried_or_left_reachable(proxy_factory, fleet, tmp_path, step):
    work = ids("work", 20)
    seed(fleet["b1"], "carol", "Work", work)
    pause = tmp_path / "pause"
    pause.mkdir()
    # A delta step is reached only if something arrived after the first pass: deliver at COMMITTED too.
    points = (["committed:1"] if step.startswith("delta") else []) + [step]
    options = [o for p in points for o in ("--pause-at", p)]
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty(*options, "--pause-dir", str(pause)))
    w = _logged_in(proxy)
    w.send(b"r RENAME Work Shared/W\r\n")
    delivered = {"early@t": deliver(fleet["b1"], "carol", "Work", "early@t")}  # before or while it starts
    for point in points:
        assert wait_paused(pause, point) == point
        # The proxy is stopped at this step: deliveries straight to the source backend.
        for k in range(3):
            mid = f"at-{point}-{k}@t"
            delivered[mid] = deliver(fleet["b1"], "carol", "Work", mid)
        (pause / "resume").touch()
    reply = w.until_tagged(b"r")
    w.close()
    delivered["late@t"] = deliver(fleet["b1"], "carol", "Work", "late@t")
    assert reply[-1].startswith(b"r OK"), reply
    acked = [i for i, where in delivered.items() if where]
    assert len(acked) == len(delivered)
    _exactly_once(fleet, proxy, "carol", work + acked)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in work} == {("b3", "Shared/W")}
    assert _no_entries(proxy)


# -- 4. names are names ------------------------------------------------------------------------------


def test_a_wildcard_is_a_name_not_a_pattern(proxy_factory, fleet):
    inbox, work, pct = ids("inbox", 5), ids("work", 3), ids("pct", 4)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "50% off", pct)
    seed(fleet["b1"], "carol", "50xx off", ids("xx", 2))
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    for cmd in (b'RENAME "%" Shared/Y', b'RENAME "*" Shared/Y', b'RENAME "Wor%" Shared/Y'):
        reply = w.cmd(b"r", cmd)
        assert reply[-1].startswith(b"r NO [NONEXISTENT]"), (cmd, reply)
    assert sum(census(fleet, "carol", [fleet["b1"]])[0].values()) == 14  # nothing moved
    assert w.cmd(b"p", b'RENAME "50% off" "Shared/50% off"')[-1].startswith(b"p OK")
    w.close()
    _exactly_once(fleet, proxy, "carol", inbox + work + pct + ids("xx", 2))
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in pct} == {("b3", "Shared/50% off")}
    assert {where[i][0] for i in ids("xx", 2)} == {("b1", "50xx off")}
    assert {where[i][0] for i in inbox} == {("b1", "INBOX")}


def test_admin_move_takes_names_as_names_and_users_canonically(proxy_factory, fleet):
    work, pct, xx = ids("work", 3), ids("pct", 4), ids("xx", 2)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "50% off", pct)
    seed(fleet["b1"], "carol", "50xx off", xx)
    proxy = proxy_factory(MASTERS, rules=RULES)
    config = str(proxy.config_path)
    for pattern in ("%", "Wor%", "50*"):
        refused = cli("move", "--config", config, "carol", pattern, "b3")
        assert refused.returncode != 0 and "NONEXISTENT" in refused.stderr, (pattern, refused.stdout + refused.stderr)
    assert sum(census(fleet, "carol", [fleet["b1"]])[0].values()) == 9  # nothing moved
    moved = cli("move", "--config", config, "CAROL", "50% off", "b3")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    _exactly_once(fleet, proxy, "carol", work + pct + xx)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in pct} == {("b3", "50% off")}
    assert {where[i][0] for i in work + xx} == {("b1", "Work"), ("b1", "50xx off")}
    assert _no_entries(proxy)


@pytest.mark.parametrize("name", ['q"uo\\te', "a*b", "Caf&AOk-", "with space/and % sign"])
def test_odd_names_move_across_servers(proxy_factory, fleet, name):
    mail, child = ids("odd", 4), ids("oddchild", 2)
    seed(fleet["b1"], "carol", name, mail)
    seed(fleet["b1"], "carol", name + "/kid", child)
    seed(fleet["b1"], "carol", name + "x", ids("near", 1))  # a prefix is not a parent
    if "%" in name or "*" in name:  # what the name would match as a LIST pattern stays where it is
        seed(fleet["b1"], "carol", name.replace("%", "x").replace("*", "yy"), ids("alike", 2))
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    reply = w.cmd(b"r", b"RENAME " + quote(name).encode() + b" " + quote("Shared/" + name).encode())
    assert reply[-1].startswith(b"r OK"), reply
    w.close()
    alike = ids("alike", 2) if "%" in name or "*" in name else []
    _exactly_once(fleet, proxy, "carol", mail + child + ids("near", 1) + alike)
    counts, where = census(fleet, "carol")
    assert all(where[i][0][0] == "b1" for i in alike)
    assert {where[i][0] for i in mail} == {("b3", "Shared/" + name)}
    assert {where[i][0] for i in child} == {("b3", "Shared/" + name + "/kid")}
    assert where[ids("near", 1)[0]] == [("b1", name + "x")]


# -- 5. whole-user moves, pre-existing destinations, retries ---------------------------------------------------


def test_whole_user_move_into_a_backend_that_already_has_mail(proxy_factory, fleet):
    inbox, work, stray = ids("inbox", 50), ids("work", 20), ids("stray", 1)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b2"], "carol", "INBOX", stray)
    inbox_apart(fleet["b1"], fleet["b2"], "carol")  # made in one second: a move into it is refused
    proxy = proxy_factory(MASTERS, rules=RULES)
    result = cli("move", "--config", str(proxy.config_path), "carol", "*", "b2")
    assert result.returncode == 0, result.stdout + result.stderr
    _exactly_once(fleet, proxy, "carol", inbox + work + stray)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in inbox + stray} == {("b2", "INBOX")}


@pytest.mark.parametrize("step", ["copying:1", "copying:2", "copied:1", "creating:1", "created:1", "copied:2",
                                  "committed:1", "placed:1", "drained:1", "delta-copying:1", "delta-copying:2"])
def test_whole_user_move_killed_recovered_and_retried_multiplies_nothing(proxy_factory, fleet, step):
    inbox, work, stray = ids("inbox", 50), ids("work", 20), ids("stray", 1)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b2"], "carol", "INBOX", stray)
    inbox_apart(fleet["b1"], fleet["b2"], "carol")  # made in one second: a move into it is refused
    proxy = proxy_factory({**MASTERS, **LEFT_TO_RECOVER}, rules=RULES)
    before_b2, _ = census(fleet, "carol", [fleet["b2"]])
    config = str(proxy.config_path)
    if step.startswith("delta-copying"):  # something new to carry at the end: delivered while stopped
        killed = cli("move", "--config", config, "carol", "*", "b2",
                     command=faulty("--kill-at", "placed:1"))
        deliver(fleet["b1"], "carol", "INBOX", "late@t")
        inbox = inbox + ["late@t"]
        killed = cli("recover", "--config", config, command=faulty("--kill-at", step))
    else:
        killed = cli("move", "--config", config, "carol", "*", "b2", command=faulty("--kill-at", step))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    recovered = cli("recover", "--config", config)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    committed = step in ("committed:1", "placed:1", "drained:1", "delta-copying:1", "delta-copying:2")
    assert ("finished" if committed else "rolled back") in recovered.stdout, recovered.stdout
    if not committed:  # the destination is exactly as it was
        assert census(fleet, "carol", [fleet["b2"]])[0] == before_b2
        again = cli("move", "--config", config, "carol", "*", "b2")
        assert again.returncode == 0, again.stdout + again.stderr
    _exactly_once(fleet, proxy, "carol", inbox + work + stray)
    assert _no_entries(proxy)


def test_admin_move_whose_roll_back_fails_says_so_and_recover_undoes_it(proxy_factory, fleet, spare_backend, tmp_path):
    """The destination dies mid-copy: the roll-back cannot reach it either. `move` must not say
    "nothing changed" (copies and a created mailbox are there); `recover` then undoes it exactly."""
    work, child = ids("work", 20), ids("child", 5)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Work/c", child)
    far = {"endpoint": spare_backend.endpoint, "url": spare_backend.url,
           "master_user": MASTER_USER, "master_password": MASTER_PASSWORD}
    proxy = proxy_factory({**MASTERS, "backends": {**MASTERS["backends"], "b4": far}}, rules=RULES)
    config = str(proxy.config_path)
    pause = tmp_path / "pause"
    pause.mkdir()
    outcome: list = []
    mover = threading.Thread(target=lambda: outcome.append(cli(
        "move", "--config", config, "carol", "Work", "b4",
        command=faulty("--pause-at", "created:2", "--pause-dir", str(pause)))))
    mover.start()
    try:
        wait_paused(pause, "created:2")  # Work copied to b4, Work/c created there
        spare_backend.kill()
        (pause / "resume").touch()
        mover.join(180)
    finally:
        spare_backend.start()
    (result,) = outcome
    assert result.returncode == 1, result.stdout + result.stderr
    assert "nothing changed" not in result.stderr and "left to `referral-proxy recover`" in result.stderr, result.stderr
    assert census(fleet, "carol", [spare_backend])[0], "the copies this test is about are not there"
    recovered = cli("recover", "--config", config)
    assert recovered.returncode == 0 and "rolled back" in recovered.stdout, recovered.stdout + recovered.stderr
    assert not census(fleet, "carol", [spare_backend])[0]  # the destination exactly as it was: empty
    with spare_backend.client("carol") as m:
        assert [n for n in (m.list()[1] or []) if n and b"Work" in n] == []
    _exactly_once(fleet, proxy, "carol", work + child)
    again = cli("move", "--config", config, "carol", "Work", "b4")
    assert again.returncode == 0, again.stdout + again.stderr
    counts, where = census(fleet, "carol", [*fleet.backends.values(), spare_backend])
    assert {i: n for i, n in counts.items() if n != 1} == {} and set(counts) == set(work + child)
    assert {where[i][0] for i in work} == {("spare", "Work")} and {where[i][0] for i in child} == {("spare", "Work/c")}
    assert _no_entries(proxy)


# -- 6. a RENAME on one backend whose children the map routes elsewhere ----------------------------------------


def test_same_backend_rename_that_would_strand_children_is_refused(proxy_factory, fleet):
    proj, docs = ids("proj", 3), ids("docs", 4)
    seed(fleet["b1"], "carol", "Proj", proj)
    seed(fleet["b1"], "carol", "Proj/Docs", docs)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    reply = w.cmd(b"r", b"RENAME Proj Shared")  # "Shared" is on b1, "Shared/Docs" would be b3's
    assert reply[-1].startswith(b"r NO [CANNOT]"), reply
    assert w.cmd(b"s", b"RENAME Proj Project")[-1].startswith(b"s OK")  # children stay on b1: fine
    w.close()
    _exactly_once(fleet, proxy, "carol", proj + docs)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in docs} == {("b1", "Project/Docs")}


def test_a_rename_is_refused_when_a_child_is_placed_on_another_backend(proxy_factory, fleet):
    """Proj/Remote lives on b3 (map set): b1 would rename Proj alone and Proj/Remote keep its old
    name, half the hierarchy renamed. Refused before anything changes (more: tests/test_hierarchy.py)."""
    proj, remote = ids("proj", 3), ids("remote", 2)
    seed(fleet["b1"], "carol", "Proj", proj)
    seed(fleet["b3"], "carol", "Proj/Remote", remote)  # placed on b3 below
    proxy = proxy_factory(MASTERS, rules=RULES)
    assert cli("map", "--config", str(proxy.config_path), "set", "carol", "Proj/Remote", "b3").returncode == 0
    w = _logged_in(proxy)
    reply = w.cmd(b"r", b"RENAME Proj Proj2")
    assert reply[-1].startswith(b"r NO [CANNOT] A mailbox inside lives on another server"), reply
    w.close()
    _exactly_once(fleet, proxy, "carol", proj + remote)
    counts, where = census(fleet, "carol")
    assert {where[i][0] for i in proj} == {("b1", "Proj")} and {where[i][0] for i in remote} == {("b3", "Proj/Remote")}


# -- 7. user names are canonical ----------------------------------------------------------------------------


def test_a_login_in_capitals_is_routed_by_the_users_rules(proxy_factory, fleet):
    proxy = proxy_factory(MASTERS, rules=RULES)
    m = proxy.imaplib()
    m.login("BOB", "secret")
    assert m.append("INBOX", None, None, b"Message-Id: <upper@t>\r\n\r\nhi\r\n")[0] == "OK"
    m.logout()
    counts, where = census(fleet, "bob")
    assert where["upper@t"] == [("b2", "INBOX")]
    assert cli("map", "--config", str(proxy.config_path), "set", "BOB", "Notes", "b3").returncode == 0
    shown = cli("map", "--config", str(proxy.config_path), "show", "Bob").stdout
    assert "user bob: home b2" in shown and "Notes -> b3" in shown and "*" in shown


# -- 8. a cross-server MOVE killed between the destination's commit and the source's expunge -----------------------


@pytest.mark.parametrize("step, outcome", [("move-appending:1", "nothing moved"), ("move-appending:2", "nothing moved"),
                                           ("move-appended:1", "finished"), ("move-expunging:1", "finished")])
def test_cross_server_move_killed_midway_is_finished_by_recover(proxy_factory, fleet, step, outcome):
    work = ids("work", 30)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--kill-at", step))
    w = _logged_in(proxy)
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1:* Shared/Dest\r\n")
    assert w.closed(30), "the proxy was not killed at " + step
    proxy.process.wait(10)
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and outcome in recovered.stdout, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    boxes = {where[i][0] for i in work}
    assert boxes == ({("b3", "Shared/Dest")} if outcome == "finished" else {("b1", "Work")})
    assert "nothing to recover" in cli("recover", "--config", str(proxy.config_path)).stdout


def _move_killed_after_the_commit(proxy_factory, fleet, work: list[str], uids: bytes):
    """*work* in Work on b1; UID MOVE *uids* to Shared/Dest (b3) killed once b3 committed the copies."""
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--kill-at", "move-appended:1"))
    w = _logged_in(proxy)
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE " + uids + b" Shared/Dest\r\n")
    assert w.closed(30), "the proxy was not killed at move-appended"
    proxy.process.wait(10)
    return proxy


@pytest.mark.parametrize("how", ["admin move", "RENAME across"])
def test_messages_expunged_between_a_moves_batches_are_left_out_and_the_move_finishes(proxy_factory, fleet, tmp_path,
                                                                                   how):
    """Another session expunges 3 copied messages and 3 of the next batch, not yet read, between two batches
    of a move (Dovecot's own RENAME succeeds whatever others expunge): the move was rolled back whole, "NO
    unexpected message 503 from b1" (probe t3 of stop 51), and a busy mailbox could never be moved. Now the
    batch's MULTIAPPEND is refused whole and sent again without them; the copies of the 3 copied go back."""
    mail = ids("batch", 520)  # two batches (copystream.BATCH_MESSAGES = 500)
    seed(fleet["b1"], "carol", "Work", mail)
    pause = tmp_path / "pause"
    if how == "admin move":
        proxy = proxy_factory(MASTERS, rules=RULES)
        mover = start_paused(pause, "copied:1", "move", "--config", str(proxy.config_path), "carol", "Work", "b2")
    else:
        proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--pause-at", "copied:1", "--pause-dir", str(pause)))
        pause.mkdir()
        w = _logged_in(proxy)
        w.send(b"r RENAME Work Archive/Work\r\n")
    assert wait_paused(pause, "copied:1") == "copied:1"
    with fleet["b1"].client("carol") as m:
        assert m.select("Work")[0] == "OK"
        assert m.uid("STORE", "1:3,503:505", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert m.expunge()[0] == "OK"
    (pause / "resume").touch()
    if how == "admin move":
        said = b"".join(part or b"" for part in mover.communicate(timeout=300)).decode()
        assert mover.returncode == 0, said
        to = ("b2", "Work")
    else:
        answer = w.until_tagged(b"r")
        assert answer[-1].startswith(b"r OK"), answer
        to = ("b2", "Archive/Work")
    gone = [mail[i] for i in (0, 1, 2, 502, 503, 504)]
    counts, where = census(fleet, "carol")
    assert judge(counts, [i for i in mail if i not in gone]) == ([], [])
    assert {where[i][0] for i in mail if i not in gone} == {to}
    assert _no_entries(proxy)


def _flags_by_id(m, mailbox: str) -> dict[str, set[str]]:
    assert m.select(quote(mailbox), readonly=True)[0] == "OK"
    typ, data = m.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    out = {}
    for item in data:
        if isinstance(item, tuple):
            flags = re.search(rb"FLAGS \(([^)]*)\)", item[0]).group(1).decode().split()
            out[re.search(rb"<([^>]+)>", item[1]).group(1).decode()] = {f for f in flags if f != "\\Recent"}
    return out


@pytest.mark.parametrize("step", ["move-appended:1", "move-expunging:1"])
def test_flags_changed_on_a_killed_moves_sources_before_recover_reach_their_copies(proxy_factory, fleet, step):
    """Killed at move-appended, sources' flags changed before recovery (probe t3 of stop 51: keywords and
    \\Flagged lost, \\Seen back, an un-deleted message still \\Deleted at the destination, expunged by the
    next EXPUNGE). Recovery carries them as the MOVE does: added and cleared, a client's own change on a copy kept."""
    work = ids("late", 6)  # seeded: 1, 4 \Seen; 3, 6 \Flagged $Work; 2, 5 none
    seed(fleet["b1"], "carol", "Work", work)
    with fleet["b1"].client("carol") as m:
        assert m.select("Work")[0] == "OK"
        assert m.uid("STORE", "5", "+FLAGS", "(\\Deleted)")[0] == "OK"
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--kill-at", step))  # (move-expunging: probe u2)
    w = _logged_in(proxy)
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1:* Shared/Dest\r\n")
    assert w.closed(30), "the proxy was not killed at " + step
    proxy.process.wait(10)
    with fleet["b1"].client("carol") as m:
        assert m.select("Work")[0] == "OK"
        for uids, change, flags in (("1", "-FLAGS", "(\\Seen)"), ("2", "+FLAGS", "(\\Answered kwlate)"),
                                    ("3", "-FLAGS", "(\\Flagged)"), ("5", "-FLAGS", "(\\Deleted)"),
                                    ("4", "-FLAGS", "(\\Seen)")):
            assert m.uid("STORE", uids, change, flags)[0] == "OK"
    with fleet["b3"].client("carol") as m:  # a client's change on the copy of 4: kept beside the source's
        assert m.select(quote("Shared/Dest"))[0] == "OK"
        typ, data = m.uid("SEARCH", "HEADER", "Message-Id", work[3])
        assert m.uid("STORE", data[0].decode(), "+FLAGS", "(\\Answered)")[0] == "OK"
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    with fleet["b3"].client("carol") as m:
        got = _flags_by_id(m, "Shared/Dest")
    assert got == {work[0]: set(), work[1]: {"\\Answered", "kwlate"}, work[2]: {"$Work"},
                   work[3]: {"\\Answered"}, work[4]: set(), work[5]: {"\\Flagged", "$Work"}}, got
    assert _no_entries(proxy)


@pytest.mark.parametrize("then", ["moved on", "moved to a third backend", "expunged"])
def test_a_killed_moves_copy_moved_on_before_recover_is_not_duplicated(proxy_factory, fleet, then):
    """A MOVE to another server killed after the destination committed, before the source's
    expunge; before recovery another client moves the copies on (same backend: Dovecot's own MOVE;
    to a third backend: as the proxy's MOVE across does, append there and expunge) or expunges
    them. Seen in the soak (seed 7): recovery found the copies gone from the destination and kept
    the source, so a message moved on was there twice (to a third backend, b2, until attack6).
    Moved on: the source goes; expunged (found nowhere): the source stays (never lose)."""
    work = ids("work", 4)
    seed(fleet["b3"], "carol", "Shared/Next", [])
    seed(fleet["b2"], "carol", "Archive/Next", [])
    proxy = _move_killed_after_the_commit(proxy_factory, fleet, work, b"1:2")
    with fleet["b3"].client("carol") as m:
        assert m.select("Shared/Dest")[1] == [b"2"]
        if then == "moved on":
            assert m.uid("MOVE", "1:*", "Shared/Next")[0] == "OK"
        else:
            if then == "moved to a third backend":
                _copy_directly(fleet, "b3", "Shared/Dest", "b2", "Archive/Next", "1:*")
            m.store("1:*", "+FLAGS", "(\\Deleted)")
            assert m.expunge()[0] == "OK"
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    moved = {"moved on": {("b3", "Shared/Next")}, "moved to a third backend": {("b2", "Archive/Next")},
             "expunged": {("b1", "Work")}}[then]
    assert {where[i][0] for i in work[:2]} == moved and {where[i][0] for i in work[2:]} == {("b1", "Work")}
    assert _no_entries(proxy)


@pytest.mark.parametrize("renamed", ["destination", "destination, made again", "source"])
def test_a_killed_moves_mailbox_renamed_before_recover_is_followed(proxy_factory, fleet, renamed):
    """Killed after the destination committed; before recovery a client straight on Dovecot renames
    the destination (or the source) mailbox. Recovery said "destination mailbox gone: the source is
    left as it is" (or "source mailbox gone"): the messages twice, in the source and in the renamed
    destination (helper recovery17). A renamed mailbox keeps its UIDVALIDITY, unique on its
    backend: it is followed under its new name (not to one made again under the old name)."""
    work = ids("work", 4)
    proxy = _move_killed_after_the_commit(proxy_factory, fleet, work, b"1:2")
    backend, old, new = ("b3", "Shared/Dest", "Shared/Moved") if renamed != "source" else ("b1", "Work", "Work2")
    with fleet[backend].client("carol") as m:
        assert m.rename(quote(old), quote(new))[0] == "OK"
        if "again" in renamed:  # and mail delivered to the new one: not the move's
            assert m.create(quote(old))[0] == "OK"
            assert deliver(fleet[backend], "carol", old, "new@t") == old
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work + (["new@t"] if "again" in renamed else [])) == ([], []), where
    dst, src = ("b3", "Shared/Dest" if renamed == "source" else new), ("b1", new if renamed == "source" else "Work")
    assert {where[i][0] for i in work[:2]} == {dst} and {where[i][0] for i in work[2:]} == {src}
    assert _no_entries(proxy)


def test_a_killed_moves_copy_and_source_both_moved_on_before_recover_are_left_and_the_entry_ends(proxy_factory, fleet):
    """Killed after the destination committed; before recovery one client moves the copies on and
    another moves the sources away (the soak, seed 11017: the move's proxy dead, both seen through
    the other one). Recovery stopped at "message UID 1 vanished from the source", every time: the
    entry stayed, pinning both mailboxes for good. Neither message is the move's to remove now (each
    is where a client put it): left as they are, and the entry ends."""
    work = ids("work", 4)
    seed(fleet["b3"], "carol", "Shared/Next", [])
    seed(fleet["b1"], "carol", "Kept", [])
    proxy = _move_killed_after_the_commit(proxy_factory, fleet, work, b"1:2")
    with fleet["b3"].client("carol") as m:
        assert m.select("Shared/Dest")[1] == [b"2"]
        assert m.uid("MOVE", "1:*", "Shared/Next")[0] == "OK"
    with fleet["b1"].client("carol") as m:
        m.select("Work")
        assert m.uid("MOVE", "1", "Kept")[0] == "OK"  # work-0's source; work-1's stays in Work
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert "finished: 1 message(s) removed from the source; 1 left" in recovered.stdout, recovered.stdout
    counts, where = census(fleet, "carol")
    assert sorted(where["work-0@t"]) == [("b1", "Kept"), ("b3", "Shared/Next")]  # twice: each a client's
    assert where["work-1@t"] == [("b3", "Shared/Next")]
    assert {where[i][0] for i in work[2:]} == {("b1", "Work")}
    assert _no_entries(proxy)


def test_a_recovery_of_a_move_cut_off_after_its_expunge_keeps_the_copies(proxy_factory, fleet, tmp_path):
    """Recovering a killed MOVE to another server expunges the sources, then ends the entry. Cut
    off in between (seen in the soak, seed 7: the proxy stopped during its start-up recovery), the
    next recovery found the sources gone, took that for another client's doing and took the copies
    back: the messages were nowhere. Now the recovery journals what it will expunge first."""
    work = ids("work", 3)
    proxy = _move_killed_after_the_commit(proxy_factory, fleet, work, b"1:2")
    pause = tmp_path / "pause"
    recovering = start_paused(pause, "move-expunging:1", "recover", "--config", str(proxy.config_path))
    try:
        wait_paused(pause, "move-expunging:1")
        with fleet["b1"].client("carol") as m:  # what the recovery does next: the sources go
            m.select("Work")
            m.uid("STORE", "1:2", "+FLAGS.SILENT", "(\\Deleted)")
            assert m.uid("EXPUNGE", "1:2")[0] == "OK"
    finally:
        recovering.kill()  # cut off before it ended the entry
        recovering.wait(30)
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "finished" in recovered.stdout, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], [])
    assert {where[i][0] for i in work[:2]} == {("b3", "Shared/Dest")} and where[work[2]] == [("b1", "Work")]
    assert _no_entries(proxy)


@pytest.mark.parametrize("back", [True, False])
def test_a_killed_moves_copy_moved_back_before_recover_is_not_duplicated(proxy_factory, fleet, back):
    """Killed after the destination committed: the user sees the message in both places and moves the
    copy back before recovery runs. Recovery must not keep the original beside the returned copy; and
    when the copy is just gone (expunged), the original stays: nothing is verified anywhere."""
    work = ids("work", 3)
    proxy = _move_killed_after_the_commit(proxy_factory, fleet, work, b"1:*")
    with fleet["b3"].client("carol") as m:  # a client moves the copy of work-1 back (as Dovecot would: copy, expunge)
        m.select(quote("Shared/Dest"))
        (uid,) = m.uid("SEARCH", "HEADER", "Message-Id", "work-1@t")[1][0].split()
        copy = [item[1] for item in m.uid("FETCH", uid, "(BODY.PEEK[])")[1] if isinstance(item, tuple)][0]
        if back:
            with fleet["b1"].client("carol") as b1:
                assert b1.append(quote("Work"), None, None, copy)[0] == "OK"
        m.uid("STORE", uid, "+FLAGS.SILENT", "(\\Deleted)")
        m.uid("EXPUNGE", uid)
    recovered = cli("recover", "--config", str(proxy.config_path))
    removed = "finished: 3 message(s)" if back else "finished: 2 message(s)"
    assert recovered.returncode == 0 and removed in recovered.stdout, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], []), where
    assert {where[i][0] for i in ("work-0@t", "work-2@t")} == {("b3", "Shared/Dest")}
    assert where["work-1@t"] == [("b1", "Work")]


# -- the hard case: killed after the destination committed a MULTIAPPEND, before its APPENDUID was journaled ----------


def _copy_directly(fleet, src: str, src_box: str, dst: str, dst_box: str, uids: str, *, kept: bool = True) -> None:
    """What the proxy's MULTIAPPEND would have saved: the same bodies, in UID order, straight to *dst*,
    with their INTERNALDATE (copystream keeps it); *kept* False: without it, as a user's own APPEND."""
    import re

    with fleet[src].client("carol") as m:
        m.select(quote(src_box), readonly=True)
        typ, data = m.uid("FETCH", uids, "(INTERNALDATE BODY.PEEK[])")
        found = [(re.search(rb'INTERNALDATE ("[^"]*")', item[0]), item[1]) for item in data if isinstance(item, tuple)]
    with fleet[dst].client("carol") as m:
        multiappend(m, [b"s APPEND " + quote(dst_box).encode()] + [
            b" ()" + (b" " + d.group(1) if kept and d else b"") + b" {%d+}\r\n" % len(b) + b for d, b in found])


def _hashes(backend, mailbox: str, uids: str) -> list[str]:
    """sha256 of the bodies of *uids* in *mailbox*, in UID order (what the proxy journals)."""
    import hashlib

    with backend.client("carol") as m:
        m.select(quote(mailbox), readonly=True)
        typ, data = m.uid("FETCH", uids, "(BODY.PEEK[])")
        return [hashlib.sha256(item[1]).hexdigest() for item in data if isinstance(item, tuple)]


def _state(backend, mailbox: str) -> tuple[int, int]:
    with backend.client("carol") as m:
        typ, data = m.status(quote(mailbox), "(UIDVALIDITY UIDNEXT)")
        words = data[0].decode().replace("(", " ").replace(")", " ").split()
        return int(words[words.index("UIDVALIDITY") + 1]), int(words[words.index("UIDNEXT") + 1])


def _killed_move_data(fleet, uids: str, source: str = "Work") -> dict:
    """The journal data of a MOVE of *source*'s *uids* (b1) to Shared/Dest (b3) killed at move-appending,
    its hashes journaled: the MULTIAPPEND's outcome unknown (movecheck.journal_killed_move)."""
    validity, uidnext = _state(fleet["b3"], "Shared/Dest")
    return {"src": "b1", "src_mailbox": source, "src_validity": _state(fleet["b1"], source)[0], "src_uids": uids,
            "dst": "b3", "dst_mailbox": "Shared/Dest", "dst_validity": validity, "dst_uidnext": uidnext,
            "hashes": _hashes(fleet["b1"], source, uids)}


def _rolled_back_by_recovery(proxy, data: dict) -> None:
    """A whole-user move of carol's journaled at copying by a process now gone, then `recover`."""
    from referral_proxy.journal import Reservation, Step

    store = _store(proxy)
    entry = now(store.begin_move("carol", "move", [Reservation(None)], data, "gone.example:1:1", "/"))
    now(store.journal_step(entry, Step.COPYING, data, "gone.example:1:1"))
    now(store.disown(entry, "gone.example:1:1"))  # its process is gone
    now(store.close())
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert "rolled back" in recovered.stdout, recovered.stdout + recovered.stderr


@pytest.mark.parametrize("committed", [True, False])
def test_a_batch_in_flight_is_found_by_content_and_rolled_back(proxy_factory, fleet, committed):
    inbox, stray = ids("inbox", 10), ids("stray", 1)
    seed(fleet["b1"], "carol", "INBOX", inbox)
    seed(fleet["b2"], "carol", "INBOX", stray)
    inbox_apart(fleet["b1"], fleet["b2"], "carol")  # made in one second: a move into it is refused
    proxy = proxy_factory(MASTERS, rules=RULES)
    before_b2, _ = census(fleet, "carol", [fleet["b2"]])
    validity, uidnext = _state(fleet["b2"], "INBOX")
    if committed:
        _copy_directly(fleet, "b1", "INBOX", "b2", "INBOX", "1:10")
    data = {"src": "b1", "dst": "b2", "old": "*", "new": "*", "token": "t0", "pairs": [["INBOX", "INBOX"]],
            "created": [], "validity": {"0": _state(fleet["b1"], "INBOX")[0]}, "batches": [],
            "pending": {"pair": 0, "src": "1:10", "validity": validity, "uidnext": uidnext,
                        "hashes": _hashes(fleet["b1"], "INBOX", "1:10")}, "aside": [], "drained": []}
    _rolled_back_by_recovery(proxy, data)
    assert census(fleet, "carol", [fleet["b2"]])[0] == before_b2  # exactly as it was: the stray, alone
    _exactly_once(fleet, proxy, "carol", inbox + stray, hidden=stray)


def test_a_batch_whose_hashes_were_never_journaled_is_rolled_back_without_its_source(proxy_factory, fleet):
    """A batch journaled in flight without its hashes never sent its MULTIAPPEND's last byte: nothing
    to look for, so the roll-back asks nothing of the source (mover.roll_back's "hashes" guard). Its
    source down -- as when it is what failed mid-copy -- the move is still rolled back, not left."""
    from referral_proxy.fleet import free_port

    port = free_port("127.0.0.1")  # nothing listens there
    gone = {"endpoint": f"tcp:host=127.0.0.1:port={port}", "url": f"imap://127.0.0.1:{port}", "tls": "none",
            "master_user": MASTER_USER, "master_password": MASTER_PASSWORD}
    proxy = proxy_factory({**MASTERS, "backends": {**MASTERS["backends"], "b4": gone}}, rules=RULES)
    seed(fleet["b2"], "carol", "Work", [])  # as the move created it
    validity, uidnext = _state(fleet["b2"], "Work")
    data = {"src": "b4", "dst": "b2", "old": "Work", "new": "Work", "token": "t0", "pairs": [["Work", "Work"]],
            "created": [0], "validity": {"0": 1}, "batches": [],
            "pending": {"pair": 0, "src": "1:3", "validity": validity, "uidnext": uidnext}, "aside": [], "drained": []}
    _rolled_back_by_recovery(proxy, data)
    with fleet["b2"].client("carol") as m:
        assert [n for n in (m.list()[1] or []) if n and b"Work" in n] == []  # the mailbox it made: deleted
    assert _no_entries(proxy)


@pytest.mark.parametrize("committed", [True, False, "moved meanwhile"])
def test_a_move_in_flight_is_found_by_content_and_finished(proxy_factory, fleet, committed):
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    proxy = proxy_factory(MASTERS, rules=RULES)
    data = _killed_move_data(fleet, "2:4")
    if committed:
        _copy_directly(fleet, "b1", "Work", "b3", "Shared/Dest", "2:4")
    if committed == "moved meanwhile":  # another client moved one of them away before the crash
        with fleet["b1"].client("carol") as m:
            m.create("Other")
            m.select("Work")
            assert m.uid("MOVE", "3", "Other")[0] == "OK"
    journal_killed_move(proxy, data)
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    removed = {True: "3 message(s) removed", False: "never committed", "moved meanwhile": "2 message(s) removed"}
    assert removed[committed] in recovered.stdout, recovered.stdout
    _exactly_once(fleet, proxy, "carol", work + ids("there", 2))
    counts, where = census(fleet, "carol")
    if committed == "moved meanwhile":  # its copy was taken back: it is where the other client put it
        assert where[work[2]] == [("b1", "Other")]
        assert {where[i][0] for i in (work[1], work[3])} == {("b3", "Shared/Dest")}
    else:
        assert {where[i][0] for i in work[1:4]} == {("b3", "Shared/Dest") if committed else ("b1", "Work")}



def test_a_message_another_client_moved_to_the_destination_is_not_taken_for_the_killed_moves_copy(proxy_factory,
                                                                                                  fleet):
    """A MOVE of one message cut off with its MULTIAPPEND's outcome unknown (never committed, here);
    before recovery another client moves that same message to the destination itself (appended
    there, expunged at the source: an RFC 3501 move). Recovery finds a message of that content above
    the recorded UIDNEXT and took it for its copy; the source gone, it took that "copy" back: the
    message was nowhere (seen in the soak, seed 6043). Now a copy found by content is taken back
    only if its content is somewhere else too."""
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    proxy = proxy_factory(MASTERS, rules=RULES)
    data = _killed_move_data(fleet, "3")
    journal_killed_move(proxy, data)
    _copy_directly(fleet, "b1", "Work", "b3", "Shared/Dest", "3")  # the other client's move, then its expunge
    with fleet["b1"].client("carol") as m:
        m.select("Work")
        assert m.uid("STORE", "3", "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
        assert m.uid("EXPUNGE", "3")[0] == "OK"
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    _exactly_once(fleet, proxy, "carol", work + ids("there", 2))
    assert census(fleet, "carol")[1][work[2]] == [("b3", "Shared/Dest")]


@pytest.mark.parametrize("then", ["committed, moved on", "committed, the middle one moved on",
                                  "committed, moved back", "never committed, an old copy elsewhere"])
def test_a_killed_moves_copies_moved_on_before_recovery_take_their_sources_along(proxy_factory, fleet, then):
    """A MOVE cut off with its MULTIAPPEND's outcome unknown, which committed; before recovery another
    client moves every copy on (Shared/Dest -> Shared/Other): no copy left where the move saved it,
    so nothing ties the messages found elsewhere to the move; the sources stay, the messages twice
    (soak, seed 41049). 79beff0 took them "once" by a SAVEDATE guess that any other instance of the
    content re-saved meanwhile also passes (soak A, seed 49002: one where the user made two; see
    test_another_instance_re_saved_before_recovery_does_not_take_a_killed_moves_source): in doubt,
    twice, never once. So too every copy moved back to the source (appended there, expunged from
    the destination). Only the middle copy moved on (helper recovery17): the two left are found
    by content, which ties the run to the move, and the middle one's source goes too (once).
    Never committed, the destination's new UIDs taken and expunged by another client and a copy of
    work-2 saved elsewhere before the move began: the sources stay."""
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    seed(fleet["b3"], "carol", "Shared/Other", [])
    if not then.startswith("committed"):
        _copy_directly(fleet, "b1", "Work", "b3", "Shared/Other", "3")  # the user's own, long before
        time.sleep(3.5)  # well before the move began
    proxy = proxy_factory(MASTERS, rules=RULES)
    data = _killed_move_data(fleet, "2:4")
    uidnext = data["dst_uidnext"]
    journal_killed_move(proxy, data)
    moving = f"{uidnext}:*"
    if then.startswith("committed"):
        _copy_directly(fleet, "b1", "Work", "b3", "Shared/Dest", "2:4")  # what the MULTIAPPEND saved
        moved_to = "Shared/Other"
        moving = f"{uidnext + 1}" if "middle" in then else moving
        if "back" in then:  # as a client's move across does: append to the source, expunge
            _copy_directly(fleet, "b3", "Shared/Dest", "b1", "Work", moving)
    else:
        seed(fleet["b3"], "carol", "Shared/Dest", ids("passing", 3))  # another client's, expunged again
        moved_to = "Shared/Gone"
    with fleet["b3"].client("carol") as m:
        m.create(quote(moved_to))
        m.select(quote("Shared/Dest"))
        if "back" in then:
            m.uid("STORE", moving, "+FLAGS.SILENT", "(\\Deleted)")
            assert m.uid("EXPUNGE", moving)[0] == "OK"
        else:
            assert m.uid("MOVE", moving, quote(moved_to))[0] == "OK"
        if moved_to == "Shared/Gone":
            assert m.delete(quote(moved_to))[0] == "OK"
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    if then == "committed, moved on":  # twice: the sources, and their copies where the client put them
        assert "never committed, or every copy was moved on" in recovered.stdout, recovered.stdout
        assert counts == {**{i: 1 for i in work + ids("there", 2)}, **{i: 2 for i in work[1:4]}}, where
        assert all(sorted(where[i]) == [("b1", "Work"), ("b3", "Shared/Other")] for i in work[1:4]), where
    elif "back" in then:  # twice, both in Work: the sources, and their copies moved back
        assert "never committed, or every copy was moved on" in recovered.stdout, recovered.stdout
        assert counts == {**{i: 1 for i in work + ids("there", 2)}, **{i: 2 for i in work[1:4]}}, where
        assert {where[i][0] for i in work} == {("b1", "Work")}
    elif then.startswith("committed"):
        assert "3 message(s) removed from the source" in recovered.stdout, recovered.stdout
        _exactly_once(fleet, proxy, "carol", work + ids("there", 2))
        assert [where[i][0] for i in work[1:4]] == [("b3", "Shared/Dest"), ("b3", "Shared/Other"), ("b3", "Shared/Dest")]
    else:
        assert "never committed" in recovered.stdout, recovered.stdout
        assert counts == {**{i: 1 for i in work + ids("there", 2)}, work[2]: 2}, where
        assert sorted(where[work[2]]) == [("b1", "Work"), ("b3", "Shared/Other")]
    assert _no_entries(proxy)


def _journaled_killed_move(proxy_factory, fleet, n: int, uids: str, *, copy: bool = False, also=(), config=MASTERS):
    """Work (*n* messages, b1) and Shared/Dest (2, b3), *also* [(backend, mailbox)] made empty, a
    proxy (of *config*), and a MOVE of *uids* to Shared/Dest journaled as killed before its APPENDUID
    (*copy*: its MULTIAPPEND committed). The proxy, the journal data, Work's ids."""
    work = ids("work", n)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    for backend, box in also:
        seed(fleet[backend], "carol", box, [])
    proxy = proxy_factory(config, rules=RULES)
    data = _killed_move_data(fleet, uids)
    journal_killed_move(proxy, data)
    if copy:
        _copy_directly(fleet, "b1", "Work", "b3", "Shared/Dest", uids)
    return proxy, data, work


def test_a_killed_moves_copies_of_identical_bodies_one_moved_on_take_both_sources(proxy_factory, fleet):
    """Two source messages of the same body (the same sha256) in a MOVE cut off with its outcome
    unknown, committed; before recovery a client moves the first copy on and mail is delivered to
    the destination. The copy left was matched to the first place of the run, the second place
    inferred on the new mail's UID, and the second source stayed: three of that message (helper
    recovery17). The run is now the one whose other places are free."""
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    _copy_directly(fleet, "b1", "Work", "b1", "Work", "3")  # uid 6: work-2 again
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    proxy = proxy_factory(MASTERS, rules=RULES)
    data = _killed_move_data(fleet, "3,6")
    data["src_uids"] = "3,6"
    u = data["dst_uidnext"]
    journal_killed_move(proxy, data)
    _copy_directly(fleet, "b1", "Work", "b3", "Shared/Dest", "3,6")
    with fleet["b3"].client("carol") as m:
        m.create(quote("Shared/Y"))
        m.select(quote("Shared/Dest"))
        assert m.uid("MOVE", f"{u}", quote("Shared/Y"))[0] == "OK"
    deliver(fleet["b3"], "carol", "Shared/Dest", "new@t")
    assert cli("recover", "--config", str(proxy.config_path)).returncode == 0
    counts, where = census(fleet, "carol")
    assert counts["work-2@t"] == 2 and ("b1", "Work") not in where["work-2@t"], where["work-2@t"]
    assert _no_entries(proxy)


@pytest.mark.parametrize("twice", ["sequential", "at once"])
def test_a_killed_move_of_fifty_whose_copies_went_every_way_is_recovered_once_by_two_recoveries(proxy_factory,
                                                                                                   fleet, twice):
    """50 messages, outcome unknown, committed; before recovery a client moves 10 copies to another
    backend, 10 on in the same one, flags 5, copies 5 (two of those then), and mail is delivered to
    the destination; `recover` then runs twice, one after the other or at once: every source goes,
    once (held in round 17; nothing ran two recoveries of one entry)."""
    proxy, data, work = _journaled_killed_move(proxy_factory, fleet, 60, "5:54", copy=True, also=[("b2", "Archive/X")])
    u = data["dst_uidnext"]
    _copy_directly(fleet, "b3", "Shared/Dest", "b2", "Archive/X", f"{u}:{u + 9}")
    with fleet["b3"].client("carol") as m:
        m.create(quote("Shared/Y"))
        m.select(quote("Shared/Dest"))
        m.uid("STORE", f"{u}:{u + 9}", "+FLAGS.SILENT", "(\\Deleted)")
        assert m.uid("EXPUNGE", f"{u}:{u + 9}")[0] == "OK"
        assert m.uid("MOVE", f"{u + 10}:{u + 19}", quote("Shared/Y"))[0] == "OK"
        m.uid("STORE", f"{u + 20}:{u + 24}", "+FLAGS", "(\\Flagged)")
        assert m.uid("COPY", f"{u + 25}:{u + 29}", quote("Shared/Y"))[0] == "OK"
    deliver(fleet["b3"], "carol", "Shared/Dest", "new@t")
    if twice == "at once":
        cmd = [sys.executable, "-m", "referral_proxy", "recover", "--config", str(proxy.config_path)]
        ps = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
        for p in ps:
            assert p.communicate(timeout=300) is not None and p.returncode == 0
    else:
        for _ in range(2):
            assert cli("recover", "--config", str(proxy.config_path)).returncode == 0
    counts, where = census(fleet, "carol")
    bad = {i: where[i] for i in work if counts[i] != (2 if i in work[29:34] else 1)}
    assert not bad, bad
    assert all(("b1", "Work") not in where[i] for i in work[4:54])
    assert counts["new@t"] == 1
    assert _no_entries(proxy)


def test_a_recovery_of_moved_on_copies_cut_off_at_its_expunge_is_finished_by_the_next(proxy_factory, fleet, tmp_path):
    """A killed MOVE (outcome unknown, committed) whose first two copies a client moved on (the third,
    left, ties the run to the move): its recovery killed at its own MOVE_EXPUNGING step; the next one
    finishes it, each message once, where the client put it (held in round 17; it covered the
    SAVEDATE path, every copy moved on, until recovery19 dropped that guess)."""
    proxy, data, work = _journaled_killed_move(proxy_factory, fleet, 5, "2:4", copy=True)
    u = data["dst_uidnext"]
    with fleet["b3"].client("carol") as m:
        m.create(quote("Shared/Y"))
        m.select(quote("Shared/Dest"))
        assert m.uid("MOVE", f"{u}:{u + 1}", quote("Shared/Y"))[0] == "OK"
    pause = tmp_path / "pause"
    rec = start_paused(pause, "move-expunging:1", "recover", "--config", str(proxy.config_path))
    try:
        wait_paused(pause, "move-expunging:1")
    finally:
        rec.kill()
        rec.wait(30)
    assert cli("recover", "--config", str(proxy.config_path)).returncode == 0
    counts, where = census(fleet, "carol")
    assert all(counts[i] == 1 for i in work), where
    assert [where[i][0] for i in work[1:4]] == [("b3", "Shared/Y")] * 2 + [("b3", "Shared/Dest")]
    assert _no_entries(proxy)


@pytest.mark.parametrize("own", ["copied within the source", "copied to another mailbox of its backend",
                                 "appended elsewhere", "appended to the source", "appended on another backend",
                                 "copied across through the proxy"])
def test_a_clients_own_copy_does_not_take_a_never_committed_moves_source(proxy_factory, fleet, own):
    """A MOVE of work-2 cut off before APPENDUID that never committed; the user then copies work-2
    (COPY within Work: soak seed 43154, through the proxy 0.9 s after the MOVE's NO; or to Other on
    b1), or APPENDs the same body (to Shared/Y, to Work itself -- a duplicate delivery --, to
    Archive/X on b2); a mail delivered to Shared/Dest is expunged (room for the copy). Recovery took
    the user's copy for the move's moved back (or on) and expunged the source: one work-2 where the
    user had made two. A copy Dovecot made keeps the X-GUID of the message itself; the move's copy,
    APPENDed, has a new one, and the source's INTERNALDATE, which an APPEND without one does not
    (helper attack18: the three APPENDs failed on main)."""
    proxy, data, work = _journaled_killed_move(proxy_factory, fleet, 5, "3", also=[("b3", "Shared/Y"),
                                                                                   ("b1", "Other"),
                                                                                   ("b2", "Archive/X")],
                                               config=merged(MASTERS, QUICK_REFUSAL))  # the COPY across
    u = data["dst_uidnext"]
    made, sweep = 2, False
    if own.startswith("appended"):  # the user's own copy, after the move began
        to = {"appended elsewhere": ("b3", "Shared/Y"), "appended to the source": ("b1", "Work"),
              "appended on another backend": ("b2", "Archive/X")}[own]
        _copy_directly(fleet, "b1", "Work", *to, "3", kept=False)
    elif own == "copied across through the proxy":
        w = _logged_in(proxy)
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
        answer = w.cmd(b"c", b"UID COPY 3 Archive/X")[-1]
        # it waits for the cut-off MOVE of its source (copywait.py): NO [INUSE] after move_wait_seconds, or OK
        # if the proxy's own sweep (every 30 s) recovered the MOVE meanwhile
        assert answer.startswith((b"c OK", b"c NO [INUSE]")), answer
        made, sweep = (2, True) if answer.startswith(b"c OK") else (1, False)
        w.cmd(b"l", b"LOGOUT")
    else:
        with fleet["b1"].client("carol") as m:
            m.select("Work")
            assert m.uid("COPY", "3", "Work" if "within" in own else "Other")[0] == "OK"
    deliver(fleet["b3"], "carol", "Shared/Dest", "passing@t")
    with fleet["b3"].client("carol") as m:
        m.select(quote("Shared/Dest"))
        m.uid("STORE", f"{u}", "+FLAGS.SILENT", "(\\Deleted)")
        m.uid("EXPUNGE", f"{u}")
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert counts["work-2@t"] == made and ("b1", "Work") in where["work-2@t"], (where["work-2@t"], recovered.stdout)
    assert sweep or "never committed" in recovered.stdout, recovered.stdout
    assert _no_entries(proxy)


@pytest.mark.parametrize("then", ["renamed across through the proxy", "moved across through the proxy",
                                  "moved within another backend", "moved within the source's backend"])
def test_another_instance_re_saved_before_recovery_does_not_take_a_killed_moves_source(proxy_factory, fleet, then):
    """Soak A, seed 49002: work-2 twice (the user's COPY of it, to Keep, within b1); a MOVE of the
    one in Work to Shared/Dest (b3) cut off with its MULTIAPPEND's outcome unknown (never committed;
    the destination's new UIDs taken and expunged by another client: room for the copy); before
    recovery the OTHER instance is saved anew elsewhere: Keep RENAMEd across to Archive/Keep (b2)
    through the proxy, or it is moved across through the proxy, or moved by Dovecot itself within
    b2 (a copy kept there from before the move) or within b1. Each is saved since the move began,
    with the source's INTERNALDATE and (but within b1) another X-GUID: recovery took it for the
    move's copy moved on and expunged the source: work-2 once where the user made it twice."""
    work = ids("work", 5)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/Dest", ids("there", 2))
    for backend, box in (("b1", "Other"), ("b2", "Archive/X")):
        seed(fleet[backend], "carol", box, [])
    with fleet["b1"].client("carol") as m:
        m.create("Keep")
        m.select("Work")
        assert m.uid("COPY", "3", "Keep")[0] == "OK"  # the user's second instance, before the move
    if then == "moved within another backend":  # the second instance on b2 (as a COPY across leaves it)
        seed(fleet["b2"], "carol", "Archive/Keep", [])
        _copy_directly(fleet, "b1", "Keep", "b2", "Archive/Keep", "1")
        with fleet["b1"].client("carol") as m:
            m.select("Keep")
            m.uid("STORE", "1", "+FLAGS.SILENT", "(\\Deleted)")
            assert m.uid("EXPUNGE", "1")[0] == "OK"
    time.sleep(3.5)  # both instances saved well before the move began (main's filter: SAVEDATE, 2 s slack)
    proxy = proxy_factory(MASTERS, rules=RULES)
    data = _killed_move_data(fleet, "3")
    u = data["dst_uidnext"]
    journal_killed_move(proxy, data)
    deliver(fleet["b3"], "carol", "Shared/Dest", "passing@t")  # another client's, expunged again
    with fleet["b3"].client("carol") as m:
        m.select(quote("Shared/Dest"))
        m.uid("STORE", f"{u}", "+FLAGS.SILENT", "(\\Deleted)")
        m.uid("EXPUNGE", f"{u}")
    time.sleep(1.5)  # the other instance re-saved a second or more after the move began
    if then.endswith("through the proxy"):
        w = _logged_in(proxy)
        if then.startswith("renamed"):
            assert w.cmd(b"r", b"RENAME Keep Archive/Keep")[-1].startswith(b"r OK")
        else:
            assert w.cmd(b"s", b"SELECT Keep")[-1].startswith(b"s OK")
            assert w.cmd(b"m", b"UID MOVE 1 Archive/X")[-1].startswith(b"m OK")
        w.cmd(b"l", b"LOGOUT")
    else:
        b, box, to = ("b2", "Archive/Keep", "Archive/X") if "another" in then else ("b1", "Keep", "Other")
        with fleet[b].client("carol") as m:
            m.select(quote(box))
            assert m.uid("MOVE", "1", quote(to))[0] == "OK"
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert counts["work-2@t"] == 2 and ("b1", "Work") in where["work-2@t"], (where["work-2@t"], recovered.stdout)
    assert all(counts[i] == 1 for i in work if i != "work-2@t"), where
    assert "never committed" in recovered.stdout, recovered.stdout
    assert _no_entries(proxy)


def test_moving_messages_out_of_a_mailbox_being_moved_is_in_use(proxy_factory, fleet):
    from referral_proxy.journal import Reservation, Step

    work = ids("work", 3)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Other", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")  # selected before the move began
    store = _store(proxy)
    entry = now(store.begin_move("carol", "move", [Reservation("Work"), Reservation("Shared/W")], {}, "x", "/"))
    now(store.journal_step(entry, Step.COPYING, {}, "x"))  # under way: refused at once, not after holds.WAIT
    now(store.settle())  # as MailboxMap.begin_move does (PostgreSQL: the proxy has the reservation)
    for command in (b"UID MOVE 1 Other", b"MOVE 1 Shared/X", b"UID COPY 2 Shared/W"):
        assert w.cmd(b"m", command)[-1].startswith(b"m NO [INUSE]"), command
    assert w.cmd(b"c", b"UID COPY 1 Other")[-1].startswith(b"c OK")  # a copy out takes nothing away
    now(store.end_move(entry))
    now(store.settle())
    now(store.close())
    assert w.cmd(b"n", b"UID MOVE 2 Other")[-1].startswith(b"n OK")
    w.close()
    counts, where = census(fleet, "carol")
    assert counts == {work[0]: 2, work[1]: 1, work[2]: 1}, where  # the copy, and nothing else
    assert where[work[1]] == [("b1", "Other")]


def test_changes_in_a_selected_mailbox_being_moved_are_in_use(proxy_factory, fleet):
    """A STORE or EXPUNGE in the copy being moved would be lost at its new place (flags) or come
    back there (an expunged message): refused while the move holds it, on the fast path (one
    command per read) and the long way (pipelined); reading goes on."""
    from referral_proxy.journal import Reservation

    work = ids("work", 4)
    seed(fleet["b1"], "carol", "Proj", [])
    seed(fleet["b1"], "carol", "Proj/Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    assert w.cmd(b"s", b"SELECT Proj/Work")[-1].startswith(b"s OK")
    store = _store(proxy)
    entry = now(store.begin_move("carol", "rename", [Reservation("Proj", subtree=True)], {}, "x", "/"))
    now(store.settle())
    changes = (b"STORE 1 +FLAGS (\\Deleted)", b"UID STORE 2 +FLAGS.SILENT (\\Deleted)", b"EXPUNGE",
               b"UID EXPUNGE 1:*", b"CLOSE")
    for command in changes:
        assert w.cmd(b"m", command)[-1].startswith(b"m NO [INUSE]"), command
    w.send(b"".join(b"p%d %s\r\n" % (i, c) for i, c in enumerate(changes)) + b"f FETCH 1:* FLAGS\r\n")
    lines = w.until_tagged(b"f")
    for i in range(len(changes)):
        assert any(line.startswith(b"p%d NO [INUSE]" % i) for line in lines), (i, lines)
    assert lines[-1].startswith(b"f OK") and not any(b"Deleted" in line for line in lines), lines
    now(store.end_move(entry))
    now(store.settle())
    now(store.close())
    assert w.cmd(b"d", b"STORE 1 +FLAGS (\\Deleted)")[-1].startswith(b"d OK")
    assert w.cmd(b"e", b"EXPUNGE")[-1].startswith(b"e OK")
    w.close()
    counts, where = census(fleet, "carol")
    assert counts == {m: 1 for m in work[1:]}, where


def test_a_mailbox_renamed_away_while_another_session_moves_its_mail_out(proxy_factory, fleet):
    """While a RENAME carries Proj to another server, a second session that has Proj selected
    moves messages out the RFC 3501 way (COPY, STORE \\Deleted, EXPUNGE): each message ends up
    where the answers say, once: never both moved out and carried along, never lost."""
    big = ids("big", 3000)
    seed(fleet["b1"], "carol", "Proj", big, size=300)
    seed(fleet["b1"], "carol", "Other", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    a, b = _logged_in(proxy), _logged_in(proxy)
    assert a.cmd(b"s", b"SELECT Proj")[-1].startswith(b"s OK")
    renamed: list[bytes] = []
    mover = threading.Thread(target=lambda: renamed.append(b.cmd(b"r", b"RENAME Proj Shared/Proj")[-1]))
    mover.start()
    copied, flagged, expunged = [], [], False
    try:
        for k in range(1, 61):
            if a.cmd(b"c", b"UID COPY %d Other" % k)[-1].startswith(b"c OK"):
                copied.append(big[k - 1])
                if a.cmd(b"d", b"UID STORE %d +FLAGS.SILENT (\\Deleted)" % k)[-1].startswith(b"d OK"):
                    flagged.append(big[k - 1])
        expunged = a.cmd(b"e", b"EXPUNGE")[-1].startswith(b"e OK")
    except ConnectionError:
        pass  # the moved mailbox's session ends (Dovecot: BYE): nothing answered OK after that
    mover.join(180)
    assert renamed and renamed[0].startswith(b"r OK"), renamed
    counts, where = census(fleet, "carol")
    gone = set(flagged) if expunged else set()  # expunged from Proj, before or instead of being carried
    expected = {m: (m not in gone) + (m in copied) for m in big}
    wrong = {m: (expected[m], where.get(m)) for m in big if counts[m] != expected[m]}
    assert not wrong, (len(wrong), list(wrong.items())[:5])
    assert set(counts) == set(big), "something else appeared"


def test_a_source_set_aside_is_never_shown_nor_taken_from_a_client(proxy_factory, fleet):
    """While a move empties the source it renamed aside (here: the move killed there, until
    recover), a client neither sees that name in LIST/LSUB nor can open, rename or fill it."""
    work = ids("work", 6)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Work/c", ids("workc", 2))
    proxy = proxy_factory({**MASTERS, **LEFT_TO_RECOVER}, rules=RULES)
    config = str(proxy.config_path)
    killed = cli("move", "--config", config, "carol", "Work", "b3", command=faulty("--kill-at", "aside:1"))
    assert killed.returncode == -9, killed.stdout + killed.stderr
    direct = Wire(fleet["b1"].host, fleet["b1"].port)
    direct.login("carol")
    aside = [line.rsplit(b" ", 1)[-1].strip(b'"\r\n') for line in direct.cmd(b"l", b'LIST "" "*"')
             if b"referral-proxy-aside-" in line]
    direct.close()
    assert aside, "the move was killed before it set the source aside"
    w = _logged_in(proxy)
    for command in (b'LIST "" "*"', b'LIST "" "referral-proxy-*"', b'LIST "" "%"', b'LSUB "" "*"',
                    b'RLIST "" "*"', b'LIST (SUBSCRIBED) "" "*"'):
        reply = w.cmd(b"l", command)
        assert reply[-1].startswith(b"l OK") and not any(b"aside" in line.lower() for line in reply), (command, reply)
    for name in aside + [aside[0].upper()]:
        for command in (b"SELECT ", b"EXAMINE ", b"STATUS %s (MESSAGES)", b"DELETE ", b"RENAME %s Other",
                        b"RENAME Other %s", b"CREATE %s/x", b"APPEND %s {1+}\r\nx", b"SUBSCRIBE "):
            text = command % name if b"%s" in command else command + name
            assert w.cmd(b"c", text)[-1].startswith(b"c NO [CANNOT]"), text
    w.close()
    recovered = cli("recover", "--config", config)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    _exactly_once(fleet, proxy, "carol", work + ids("workc", 2))
    assert _no_entries(proxy)


@pytest.mark.parametrize("delivered", [True, False])
def test_a_roll_back_cut_off_between_its_renames_is_finished_by_the_next(proxy_factory, fleet, delivered):
    """Rolling back a RENAME that had created its destination renames it aside, looks, then deletes it
    or (a delivery reached it) renames it back. A roll-back cut off between those RENAMEs (recovery
    stopped with the proxy, a backend killed: seen in the soak) leaves the destination under the
    private aside name: the next roll-back must settle that, not find the name gone and call it done
    (the delivered mail then out of every client's sight)."""
    shared = ids("shared", 5)
    seed(fleet["b3"], "carol", "Shared/X", shared)
    proxy, aside = rename_killed_at_created(proxy_factory, "Shared/X", "Proj")
    late = ids("late", 1)
    with fleet["b1"].client("carol") as m:
        if delivered:
            assert deliver_on(m, "Proj", late[0]) == "Proj"
        assert m.rename("Proj", aside)[0] == "OK"  # where the cut-off roll-back left it
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "rolled back" in recovered.stdout, recovered.stdout + recovered.stderr
    with fleet["b1"].client("carol") as m:
        names = [n for n in (m.list()[1] or []) if n]
    assert not [n for n in names if b"referral-proxy-aside-" in n and b"undo" in n], names
    assert any(n.endswith(b"Proj") for n in names) == delivered, names
    proxy.start()
    _exactly_once(fleet, proxy, "carol", shared + (late if delivered else []))
    assert census(fleet, "carol")[1][shared[0]] == [("b3", "Shared/X")]
    assert _no_entries(proxy)


def test_names_no_backend_accepts_get_its_answer_and_change_nothing(proxy_factory, fleet):
    work = ids("work", 3)
    seed(fleet["b1"], "carol", "Work", work)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    direct = Wire(fleet["b1"].host, fleet["b1"].port)
    direct.login("carol")
    for cmd in (b"RENAME {4+}\r\na\r\nb Other", b"RENAME Work {4+}\r\na\r\nb", b"RENAME {3+}\r\n\xe9t\xe9 Other",
                b"RENAME Work {3+}\r\nx\xe9y", b"RENAME Work {10+}\r\nShared/\xe9\r\n", b"RENAME {4+}\r\nW\x00rk Shared/N"):
        reply, theirs = w.cmd(b"r", cmd)[-1], direct.cmd(b"r", cmd)[-1]
        # NUL: Dovecot looks for "W" (NO); the proxy refuses the name it would not route by (BAD)
        assert reply.split()[1] == (b"BAD" if b"\x00" in cmd else theirs.split()[1]), (cmd, reply, theirs)
        assert theirs.split()[1] == b"NO", (cmd, theirs)
        assert b"UNAVAILABLE" not in reply and b"SERVERBUG" not in reply and b"\xe9" not in reply, (cmd, reply)
    assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
    w.close()
    direct.close()
    _exactly_once(fleet, proxy, "carol", work)
    assert census(fleet, "carol")[1][work[0]] == [("b1", "Work")]
    assert _no_entries(proxy)


def rename_killed_at_created(proxy_factory, old: str, new: str) -> tuple[object, str]:
    """carol's RENAME *old* (b3) *new* (b1) through a proxy killed once *new* is created on b1: the
    proxy, and the private name its roll-back renames *new* to (``.../undo-0``)."""
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--kill-at", "created:1"))
    w = _logged_in(proxy)
    w.send(b"r RENAME %s %s\r\n" % (old.encode(), new.encode()))
    assert w.closed(30), f"the proxy was not killed with {new} created on b1"
    proxy.process.wait(10)
    store = _store(proxy)
    try:
        (entry,) = now(store.journal())
    finally:
        now(store.close())
    return proxy, f"referral-proxy-aside-{entry.data['token']}/undo-0"


def test_a_killed_moves_copies_moved_on_through_the_proxy_keep_their_date_and_take_their_sources(proxy_factory,
                                                                                                  fleet):
    """A killed MOVE (outcome unknown, committed) whose copies a client moves on through the proxy
    itself, across to b2 (an APPEND with the copy's INTERNALDATE) and within b3, the last left where
    the move saved it (it ties the run to the move): the sources go, each message once (held).
    Every copy moved on, nothing ties them to the move: the sources stay (see the seed 41049 test)."""
    proxy, data, work = _journaled_killed_move(proxy_factory, fleet, 6, "2:5", copy=True,
                                               also=[("b2", "Archive/X"), ("b3", "Shared/Y")])
    u = data["dst_uidnext"]
    w = _logged_in(proxy, "Carol")
    assert w.cmd(b"s", b"SELECT Shared/Dest")[-1].startswith(b"s OK")
    assert w.cmd(b"m", b"UID MOVE %d:%d Archive/X" % (u, u + 1))[-1].startswith(b"m OK")
    assert w.cmd(b"n", b"UID MOVE %d Shared/Y" % (u + 2))[-1].startswith(b"n OK")
    w.cmd(b"l", b"LOGOUT")
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "4 message(s) removed" in recovered.stdout, recovered.stdout
    _exactly_once(fleet, proxy, "carol", work + ids("there", 2))
    counts, where = census(fleet, "carol")
    assert [where[i][0] for i in work[1:5]] == [("b2", "Archive/X")] * 2 + [("b3", "Shared/Y"), ("b3", "Shared/Dest")]
    assert _no_entries(proxy)
