"""Round 18 (attack18, not collected: ``python3 -m pytest tests/race_moves18.py``): attacks on
cross-server message moves that held, judged by a census of the backends (every message once) and,
where said, beside direct Dovecot.

* a UID MOVE across killed at each journal step (4 of 4), from a login in capitals (CAROL), between
  mailboxes whose names hold quote, backslash, %, * and mUTF-7, then `recover`;
* UID MOVE 2:4 -> Shared/A (b3) on a proxy killed at move-appending:2 / move-appended:1 / not
  killed, and UID MOVE 3:5 -> Archive/B (b2) on a second proxy sharing the store, at once (9 rounds);
* a UID MOVE / COPY across of messages another session moved away, before a NOOP: the same status and
  the same messages moved as Dovecot's own (2 of 2);
* what a session on the source and one on the destination see of a MOVE across (the mover's
  EXPUNGE/RECENT, NOOPs, FETCH FLAGS): the same untagged responses as Dovecot's own MOVE (1 of 1);
* UID MOVE 1:* of 200 into Shared/A while another session RENAMEs Shared/A (on b3, across to b2, across
  to b1), workers = 2, mail delivered to the source after (9 rounds);
* a UID MOVE of 1 and of 1000 killed at move-appended:1, its copies moved to b2 / copied back / expunged
  by a client through a second proxy before `recover` (2 of 2);
* a UID MOVE of 200 into Shared/A while another session DELETEs and CREATEs it again, pipelined,
  workers = 2 (4 rounds: OK three times, NO [TRYCREATE] once, as Dovecot; nothing twice, a NO moves none);
* UID MOVE 1:* Work -> Shared/A and 1:* Shared/A -> Work from two sessions at once, workers = 2 (5 rounds);
* a UID MOVE of 300 killed at move-appending:2 / move-appended:1 / move-expunging:1 while mail is
  delivered to both ends until `recover` is done (3 of 3).
"""

from __future__ import annotations

import pytest
from imapwire import Wire, at_once
from movecheck import Deliverer, census, cli, deliver, faulty, judge, quote, seed
from test_moves import MASTERS, RULES, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")

SRC = 'Wo"r\\k%*'
DST = 'Shared/D*e%s"t\\&AOk-'


def _q(name: str) -> bytes:
    return quote(name).encode()


@pytest.mark.parametrize("step", ["move-appending:1", "move-appending:2", "move-appended:1", "move-expunging:1"])
def test_odd_names_killed_move(proxy_factory, fleet, step):
    work = ids("work", 6)
    seed(fleet["b1"], "carol", SRC, work)
    seed(fleet["b3"], "carol", DST, ids("there", 2))
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--kill-at", step))
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.login("CAROL")
    assert w.cmd(b"s", b"SELECT " + _q(SRC))[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 2:5 " + _q(DST) + b"\r\n")
    assert w.closed(30), "not killed at " + step
    proxy.process.wait(10)
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work + ids("there", 2)) == ([], []), (where, recovered.stdout)
    assert _no_entries(proxy), recovered.stdout


@pytest.mark.parametrize("step", ["move-appending:2", "move-appended:1", None])
@pytest.mark.parametrize("run", range(3))
def test_two_moves_of_one_message_at_once_one_killed(proxy_factory, fleet, tmp_path, step, run):
    """UID MOVE 2:4 Work -> Shared/A (b3) on a proxy killed at *step* (None: not killed) and UID MOVE
    3:5 Work -> Archive/B (b2) on another sharing its store, at once; then `recover`: each once."""
    work = ids("work", 6)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/A", [])
    seed(fleet["b2"], "carol", "Archive/B", [])
    store = tmp_path / "shared.sqlite3"
    shared = {**MASTERS, "map": {"store": f"sqlite:{store}", "recovery_check_seconds": 3600}}
    p1 = proxy_factory(shared, rules=RULES, **({"command": faulty("--kill-at", step)} if step else {}))
    p2 = proxy_factory(shared, rules=RULES)
    wires = []
    for p in (p1, p2):
        w = Wire(p.host, p.port, timeout=120)
        w.login("Carol")
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
        wires.append(w)
    answers = at_once(wires, [b"a UID MOVE 2:4 Shared/A\r\n", b"b UID MOVE 3:5 Archive/B\r\n"], [b"a", b"b"])
    if step and b"EXPUNGEISSUED" not in answers[0]:  # else it never reached the kill point
        p1.process.wait(30)
    recovered = cli("recover", "--config", str(p2.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    assert judge(counts, work) == ([], []), (where, answers, recovered.stdout)
    assert not answers[1].startswith(b"b OK") or all(where[i][0][0] == "b2" for i in work[4:5]), (where, answers)
    assert _no_entries(p2), recovered.stdout


@pytest.mark.parametrize("verb", [b"MOVE", b"COPY"])
def test_a_move_of_messages_another_session_moved_meanwhile_beside_dovecot(proxy_factory, fleet, verb):
    """Session X selects Work; session Y moves 3:5 away; X, before any NOOP, UID MOVEs 2:4 across
    (through the proxy, to Shared/A on b3) and, on direct Dovecot, to Other: the same status, the
    same messages moved."""
    work = ids("work", 6)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b1"], "carol", "Other", [])
    seed(fleet["b1"], "carol", "Gone", [])
    seed(fleet["b3"], "carol", "Shared/A", [])
    proxy = proxy_factory(MASTERS, rules=RULES)
    x = Wire(proxy.host, proxy.port, timeout=120)
    x.login("carol")
    assert x.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    with fleet["b1"].client("carol") as m:
        m.select("Work")
        assert m.uid("MOVE", "3:5", "Gone")[0] == "OK"
    via = x.cmd(b"m", b"UID " + verb + b" 2:4 Shared/A")
    seed(fleet["b1"], "carol", "Work2", work)
    with fleet["b1"].client("carol") as d, fleet["b1"].client("carol") as e:
        d.select("Work2")
        e.select("Work2")
        assert e.uid("MOVE", "3:5", "Gone")[0] == "OK"
        typ, data = d.uid(verb.decode(), "2:4", "Other")
    counts, where = census(fleet, "carol")
    moved_proxy = sorted(i for i in work if ("b3", "Shared/A") in where[i])
    moved_direct = sorted(i for i in work if ("b1", "Other") in where[i])
    assert (via[-1].split()[1].decode(), moved_proxy) == (typ, moved_direct), (via, typ, data, where)


def _untagged(lines: list[bytes]) -> list[bytes]:
    return [ln for ln in lines if ln.startswith(b"* ") and not ln.startswith(b"* OK")]


def test_what_other_sessions_see_of_a_move_across_beside_dovecot(proxy_factory, fleet):
    """B selected on the source, C on the destination (empty, selected before), while A UID MOVEs
    2:3 across (Work -> Shared/A, b3); then B and C NOOP and C FETCHes FLAGS: the same untagged
    responses as direct Dovecot's own MOVE between two mailboxes (Work2 -> Other on b1)."""
    work = ids("work", 4)
    seed(fleet["b1"], "carol", "Work", work)
    seed(fleet["b3"], "carol", "Shared/A", [])
    seed(fleet["b1"], "carol", "Work2", work)
    seed(fleet["b1"], "carol", "Other", [])
    proxy = proxy_factory(MASTERS, rules=RULES)

    def run(connect, src: bytes, dst: bytes) -> list[list[bytes]]:
        a, b, c = connect(), connect(), connect()
        for w, box in ((a, src), (b, src), (c, dst)):
            assert w.cmd(b"s", b"SELECT " + box)[-1].startswith(b"s OK")
        moved = a.cmd(b"m", b"UID MOVE 2:3 " + dst)
        return [_untagged(moved) + moved[-1].split()[:2],
                _untagged(b.cmd(b"n", b"NOOP")), _untagged(c.cmd(b"n", b"NOOP")),
                _untagged(c.cmd(b"f", b"FETCH 1:* (FLAGS)")), _untagged(c.cmd(b"g", b"FETCH 1:* (FLAGS)"))]

    def via_proxy() -> Wire:
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login("carol")
        return w

    def direct() -> Wire:
        b1 = fleet["b1"]
        w = Wire(b1.host, b1.port, timeout=120)
        w.login("carol")
        return w

    got = run(via_proxy, b"Work", b"Shared/A")
    want = run(direct, b"Work2", b"Other")
    assert got == want


def _two_sessions(proxy_factory, login):
    """A proxy with workers = 2 and two sessions logged in as *login*, the first with Work selected."""
    proxy = proxy_factory(MASTERS, rules=RULES, workers=2)
    wires = []
    for _ in range(2):
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login(login)
        wires.append(w)
    assert wires[0].cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    return proxy, wires


@pytest.mark.parametrize("rename", [b"RENAME Shared/A Shared/B", b"RENAME Shared/A Archive/A", b"RENAME Shared/A Work/A"])
@pytest.mark.parametrize("run", range(3))
def test_a_move_across_while_its_destination_is_renamed(proxy_factory, fleet, rename, run):
    """UID MOVE 1:200 Work -> Shared/A (b3) and a RENAME of Shared/A (on b3, across to b2, across to
    b1) from another session at once, workers = 2: every message once, reachable; mail delivered to
    Work meanwhile too."""
    work = ids("work", 200)
    seed(fleet["b1"], "carol", "Work", work, size=300)
    seed(fleet["b3"], "carol", "Shared/A", ids("there", 3))
    proxy, wires = _two_sessions(proxy_factory, "CAROL")
    delivered = []
    answers = at_once(wires, [b"a UID MOVE 1:* Shared/A\r\n", b"b " + rename + b"\r\n"], [b"a", b"b"],
                      delays=[0, 0.05 * run])
    for k in range(3):
        if deliver(fleet["b1"], "carol", "Work", f"late-{k}@t"):
            delivered.append(f"late-{k}@t")
    counts, where = census(fleet, "carol")
    assert judge(counts, work + ids("there", 3) + delivered) == ([], []), (answers, where)
    assert _no_entries(proxy)


@pytest.mark.parametrize("n", [1, 1000])
def test_a_killed_move_of_n_whose_copies_a_client_moves_around_through_the_proxy(proxy_factory, fleet, tmp_path, n):
    """UID MOVE 1:* of *n* Work -> Shared/Dest killed at move-appended:1; through a second proxy
    sharing the store a client moves the first half of the copies to Archive/X (b2), copies one
    back to Work (across), and one is expunged on b3; then `recover`: each message once, the one
    copied back twice (the client made two; or once, the COPY refused NO [INUSE] after waiting for the
    cut-off MOVE: copywait.py), the expunged copy's source kept."""
    work = ids("work", n)
    seed(fleet["b1"], "carol", "Work", work, size=300)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    seed(fleet["b2"], "carol", "Archive/X", [])
    shared = {**MASTERS, "map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}", "recovery_check_seconds": 3600}}
    p1 = proxy_factory(shared, rules=RULES, command=faulty("--kill-at", "move-appended:1"))
    p2 = proxy_factory(shared, rules=RULES)
    w = Wire(p1.host, p1.port, timeout=300)
    w.login("carol")
    assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
    w.send(b"m UID MOVE 1:* Shared/Dest\r\n")
    assert w.closed(120)
    p1.process.wait(30)
    half = max(1, n // 2)
    c = Wire(p2.host, p2.port, timeout=300)
    c.login("CAROL")
    assert c.cmd(b"s", b"SELECT Shared/Dest")[-1].startswith(b"s OK")
    assert c.cmd(b"m", b"UID MOVE 1:%d Archive/X" % half)[-1].startswith(b"m OK")
    twice, expunged = [], []
    if n > 1:
        copied = c.cmd(b"c", b"UID COPY %d Work" % (half + 2))[-1]
        # NO [INUSE]: it waited move_wait_seconds for the cut-off MOVE holding Work and Shared/Dest (copywait.py)
        assert copied.startswith((b"c OK", b"c NO [INUSE]")), copied
        twice, expunged = ([work[half + 1]] if copied.startswith(b"c OK") else []), [work[half]]
        with fleet["b3"].client("carol") as m:
            m.select(quote("Shared/Dest"))
            m.uid("STORE", f"{half + 1}", "+FLAGS.SILENT", "(\\Deleted)")
            m.uid("EXPUNGE", f"{half + 1}")
    c.cmd(b"l", b"LOGOUT")
    recovered = cli("recover", "--config", str(p2.config_path), timeout=600)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    counts, where = census(fleet, "carol")
    bad = {i: where[i] for i in work if counts[i] != (2 if i in twice else 1)}
    assert not bad, (bad, recovered.stdout)
    assert all(where[i] == [("b1", "Work")] for i in expunged), recovered.stdout
    assert {where[i][0] for i in work[:half]} == {("b2", "Archive/X")}
    assert _no_entries(p2)


@pytest.mark.parametrize("run", range(4))
def test_a_move_across_while_its_destination_is_deleted_and_made_again(proxy_factory, fleet, run):
    """UID MOVE 1:* of 200 Work -> Shared/A (b3) while another session DELETEs Shared/A and CREATEs it
    again (pipelined), mail delivered to Shared/A in between: nothing twice; a MOVE answered NO
    leaves every message in Work; one answered OK may have lost them only to the DELETE after it."""
    work = ids("work", 200)
    seed(fleet["b1"], "carol", "Work", work, size=300)
    seed(fleet["b3"], "carol", "Shared/A", [])
    proxy, wires = _two_sessions(proxy_factory, "carol")
    answers = at_once(wires, [b"a UID MOVE 1:* Shared/A\r\n", b"d DELETE Shared/A\r\nc CREATE Shared/A\r\n"],
                      [b"a", b"c"], delays=[0, 0.03 * run])
    late = [f"late-{k}@t" for k in range(2) if deliver(fleet["b3"], "carol", "Shared/A", f"late-{k}@t")]
    counts, where = census(fleet, "carol")
    lost, duplicated = judge(counts, late, work)
    assert not lost and not duplicated, (answers, where)
    if not answers[0].startswith(b"a OK"):
        assert all(where[i] == [("b1", "Work")] for i in work), (answers, where)
    else:  # all moved: in Shared/A, or deleted with it
        assert all(("b1", "Work") not in where.get(i, []) for i in work), (answers, where)
    assert _no_entries(proxy)


@pytest.mark.parametrize("run", range(5))
def test_moves_across_in_opposite_directions_at_once(proxy_factory, fleet, run):
    """Session A UID MOVEs 1:* Work (b1) -> Shared/A (b3), session B 1:* Shared/A -> Work, at once,
    workers = 2, logins in two cases: every message once (held)."""
    work, there = ids("work", 40), ids("there", 40)
    seed(fleet["b1"], "carol", "Work", work, size=300)
    seed(fleet["b3"], "carol", "Shared/A", there, size=300)
    proxy = proxy_factory(MASTERS, rules=RULES, workers=2)
    wires = []
    for user, box in (("carol", b"Work"), ("CAROL", b"Shared/A")):
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login(user)
        assert w.cmd(b"s", b"SELECT " + box)[-1].startswith(b"s OK")
        wires.append(w)
    answers = at_once(wires, [b"a UID MOVE 1:* Shared/A\r\n", b"b UID MOVE 1:* Work\r\n"], [b"a", b"b"],
                      delays=[0, 0.01 * run])
    counts, where = census(fleet, "carol")
    assert judge(counts, work + there) == ([], []), (answers, where)
    assert _no_entries(proxy)


@pytest.mark.parametrize("step", ["move-appending:2", "move-appended:1", "move-expunging:1"])
def test_a_killed_move_across_with_mail_delivered_to_both_ends_until_recovered(proxy_factory, fleet, step):
    """UID MOVE 1:* of 300 Work -> Shared/Dest killed at *step* while mail is delivered to Work and to
    Shared/Dest, and on through `recover`: every message once, the delivered ones where delivered."""
    work = ids("work", 300)
    seed(fleet["b1"], "carol", "Work", work, size=300)
    seed(fleet["b3"], "carol", "Shared/Dest", [])
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--kill-at", step))
    into_src = Deliverer(fleet["b1"], "carol", "Work", "src")
    into_dst = Deliverer(fleet["b3"], "carol", "Shared/Dest", "dst")
    into_src.start()
    into_dst.start()
    try:
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login("Carol")
        assert w.cmd(b"s", b"SELECT Work")[-1].startswith(b"s OK")
        w.send(b"m UID MOVE 1:300 Shared/Dest\r\n")
        assert w.closed(60)
        proxy.process.wait(30)
        recovered = cli("recover", "--config", str(proxy.config_path))
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    finally:
        into_src.stop()
        into_dst.stop()
    counts, where = census(fleet, "carol")
    live = into_src.acked + into_dst.acked
    assert judge(counts, work + live, into_src.refused + into_dst.refused) == ([], []), recovered.stdout
    assert all(where[i] == [("b1", "Work")] for i in into_src.acked)
    assert all(where[i] == [("b3", "Shared/Dest")] for i in into_dst.acked)
    assert len({where[i][0] for i in work}) == 1, recovered.stdout
    assert _no_entries(proxy)
