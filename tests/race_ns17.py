"""Round 17 (attack17, not collected): mailbox-namespace operations from two sessions at once, with
``Far*`` on b2 and ``Shared*`` on b3, b from 4 steps before a to 4 after; judged by a census of every
backend (every message once, reachable through the proxy). ``ROUNDS=8 python3 -m pytest tests/race_ns17.py -s``.

Held, 8 rounds each (16 for a_b_while_b_a_absent), 0 bad: RENAME INBOX Far/Old<i> while b, INBOX
selected, STOREs / EXPUNGEs / APPENDs to INBOX; chains and cycles on one worker and on two (A -> FarB
while FarB -> C, FarB -> A with and without FarB, A -> Far while A -> A/kid, X -> Far/X while Far -> Y
and Far -> Shared, Shared <-> Far, A -> FarB -> SharedC while SharedC -> A); CREATE of one Far name twice;
CREATE (+ APPEND) FarX while RENAME Y FarX; DELETE FarX while UID COPY / UID MOVE into it; DELETE of a
Noselect parent while its child is renamed across; RENAME Y FarX and Z FarX; RENAME INBOX and inbox
across at once; SUBSCRIBE / UNSUBSCRIBE / LSUB during a RENAME across -- each with logins carol/carol
and CAROL/Carol; the admin ``move carol P b3`` while the client renames P or P/c across or within,
creates P/c/g, or STOREs in P/c (that session told BYE when its mailbox moved). What did not hold is
in test_rename_inbox_selected.py, test_relocation_workers.py, test_rename_check_half_done.py.
Answers that differ from Dovecot's by the README's design: NO [INUSE] for overlapping moves."""

from __future__ import annotations

import os

import pytest
from imapwire import at_once
from movecheck import seed
from race_pairs13 import _judge, _sessions, offsets

pytestmark = pytest.mark.usefixtures("clean_mail")

ROUNDS = int(os.environ.get("ROUNDS", "8"))
RULES = [{"mailbox": "Far*", "backend": "b2"}, {"mailbox": "Shared*", "backend": "b3"}]


def _msg(mid: bytes) -> bytes:
    return b"Message-Id: <%s>\r\nSubject: x\r\n\r\nhello\r\n" % mid


def _workers(proxy_factory, fleet, workers):
    if workers == 1:
        proxy = proxy_factory(rules=RULES)
        return proxy, _sessions(proxy)
    from test_workers import one_on_each
    proxy = proxy_factory(rules=RULES, workers=2)
    return proxy, list(one_on_each(proxy, proxy.pid, "carol").values())


# what session b does to INBOX while session a RENAMEs it to Far/Old<i> (b2)
INBOX_OTHER = dict(store=b"s SELECT INBOX\r\nb STORE 1:* +FLAGS (\\Answered)\r\n", append=b"b APPEND INBOX {%d+}\r\n@\r\n",
                   expunge=b"s SELECT INBOX\r\nt STORE 1:2 +FLAGS (\\Deleted)\r\nb EXPUNGE\r\n")


@pytest.mark.parametrize("other", sorted(INBOX_OTHER))
def test_rename_inbox_far_vs_selected(proxy_factory, fleet, other):
    must, may = [], []
    proxy = proxy_factory(rules=RULES)
    sessions = _sessions(proxy)
    answers = []
    for i in range(ROUNDS):
        ids = [f"in{i}-{k}@t" for k in range(4)]
        seed(fleet["b1"], "carol", "INBOX", ids)
        (may if other == "expunge" else must).extend(ids)
        mid = b"ap-%d@t" % i
        m = _msg(mid)
        tb = INBOX_OTHER[other].replace(b"%d", b"%d" % len(m)).replace(b"@\r\n", m + b"\r\n")
        ans = at_once(sessions, [b"a RENAME INBOX Far/Old%d\r\n" % i, tb], [b"a", b"b"], offsets(i, 0.004))
        answers.append(ans)
        if other == "append":
            (must if b" OK" in ans[1] else may).append(mid.decode())
        if not ans[0].startswith(b"a OK"):
            print("RENAME", i, ans)
        sessions[1].cmd(b"u", b"UNSELECT") if other != "append" else None
    bad = _judge(fleet, proxy, must, may, answers)
    assert not bad, answers


# a and b at once; names: A<i> b1, Far... b2, Shared... b3
CHAINS = {
    "a_b_while_b_c": (b"a RENAME A# FarB#\r\n", b"b RENAME FarB# C#\r\n", ["A", "FarB"]),
    "a_b_while_b_a": (b"a RENAME A# FarB#\r\n", b"b RENAME FarB# A#\r\n", ["A", "FarB"]),
    "a_b_while_b_a_absent": (b"a RENAME A# FarB#\r\n", b"b RENAME FarB# A#\r\n", ["A"]),
    "x_farx_while_far_y": (b"a RENAME X# Far#/X\r\n", b"b RENAME Far# Y#\r\n", ["X", "Far"]),
    "x_farx_while_far_shared": (b"a RENAME X# Far#/X\r\n", b"b RENAME Far# Shared#\r\n", ["X", "Far"]),
    "a_to_child_across": (b"a RENAME A# Far#\r\n", b"b RENAME A# A#/kid\r\n", ["A"]),
    "shared_far_swap": (b"a RENAME Shared# Far#\r\n", b"b RENAME Far# Shared#\r\n", ["Shared", "Far"]),
    "three_chain": (b"a RENAME A# FarB#\r\nx RENAME FarB# SharedC#\r\n", b"b RENAME SharedC# A#\r\n", ["A"]),
}
HOME = {"A": "b1", "X": "b1", "Far": "b2", "FarB": "b2", "Shared": "b3"}


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("case", sorted(CHAINS))
def test_chains(proxy_factory, fleet, case, workers):
    a, b, names = CHAINS[case]
    must = []
    for i in range(ROUNDS):
        for n in names:
            ids = [f"{n}{i}-{k}@t" for k in range(2)]
            seed(fleet[HOME[n]], "carol", f"{n}{i}", ids)
            must += ids
    proxy, sessions = _workers(proxy_factory, fleet, workers)
    answers = []
    for i in range(ROUNDS):
        ans = at_once(sessions, [a.replace(b"#", b"%d" % i), b.replace(b"#", b"%d" % i)], [b"x" if b"\r\nx " in a else b"a", b"b"],
                      offsets(i, 0.006))
        answers.append(ans)
    bad = _judge(fleet, proxy, must, [], answers)
    assert not bad, answers


# (seeded names -> home, a's script, b's script): a and b at once, logins in other cases
PAIRS = {
    "create_same_far": ({}, b"a CREATE FarN#\r\n", b"b CREATE FarN#\r\n"),
    "create_x_while_rename_y_x": ({"Y": "b1"}, b"a RENAME Y# FarX#\r\n", b"b CREATE FarX#\r\n"),
    "create_x_append_while_rename_y_x": ({"Y": "b1"}, b"a RENAME Y# FarX#\r\n", b"b CREATE FarX#\r\nc APPEND FarX# {%d+}\r\n@\r\n"),
    "delete_x_while_copy_into": ({"Y": "b1", "FarX": "b2"}, b"s SELECT Y#\r\na UID COPY 1:* FarX#\r\n", b"b DELETE FarX#\r\n"),
    "delete_x_while_move_into": ({"Y": "b1", "FarX": "b2"}, b"s SELECT Y#\r\na UID MOVE 1:* FarX#\r\n", b"b DELETE FarX#\r\n"),
    "subscribe_during_rename": ({"Y": "b1"}, b"a RENAME Y# FarX#\r\n", b"b SUBSCRIBE Y#\r\nc LSUB \"\" *\r\n"),
    "unsubscribe_during_rename": ({"Y": "b1"}, b"a RENAME Y# FarX#\r\n", b"b UNSUBSCRIBE FarX#\r\nc SUBSCRIBE FarX#\r\n"),
    "delete_parent_noselect": ({"P/c": "b1", "FarP/c": "b2"}, b"a DELETE P#\r\n", b"b RENAME P#/c FarP#/d\r\n"),
    "rename_y_x_twice": ({"Y": "b1", "Z": "b1"}, b"a RENAME Y# FarX#\r\n", b"b RENAME Z# FarX#\r\n"),
    "rename_inbox_far_twice": ({}, b"a RENAME INBOX FarI#\r\n", b"b RENAME inbox FarJ#\r\n"),
}


def _home(n: str) -> str:
    return "b2" if n.startswith("Far") else "b3" if n.startswith("Shared") else "b1"


@pytest.mark.parametrize("logins", [("carol", "carol"), ("CAROL", "Carol")], ids=["same", "cases"])
@pytest.mark.parametrize("case", sorted(PAIRS))
def test_pairs(proxy_factory, fleet, case, logins):
    seeded, a, b = PAIRS[case]
    must, may = [], []
    for i in range(ROUNDS):
        for n in seeded:
            parts = n.split("/")
            name = parts[0] + str(i) + ("/" + "/".join(parts[1:]) if len(parts) > 1 else "")
            ids = [f"{name}-{k}@t" for k in range(2)]
            seed(fleet[seeded[n]], "carol", name, ids)
            (may if "delete" in case else must).extend(ids)
        if "inbox" in case:
            ids = [f"inbox{i}-{k}@t" for k in range(2)]
            seed(fleet["b1"], "carol", "INBOX", ids)
            must.extend(ids)
    proxy = proxy_factory(rules=RULES)
    from imapwire import Wire
    sessions = []
    for user in logins:
        w = Wire(proxy.host, proxy.port, timeout=120)
        w.login(user)
        sessions.append(w)
    answers = []
    for i in range(ROUNDS):
        mid = b"b-%d@t" % i
        m = _msg(mid)
        tb = b.replace(b"#", b"%d" % i).replace(b"%d", b"%d" % len(m)).replace(b"@\r\n", m + b"\r\n")
        ans = at_once(sessions, [a.replace(b"#", b"%d" % i), tb], [b"a", b"c" if b"\r\nc " in tb else b"b"],
                      offsets(i, 0.006))
        answers.append(ans)
        if b"APPEND" in tb:
            (must if b" OK" in ans[1] else may).append(mid.decode())
        for w in sessions:
            w.cmd(b"u", b"UNSELECT")
    bad = _judge(fleet, proxy, must, may, answers)
    assert not bad, answers


ADMIN = {  # (client's script, the admin's move: mailbox, backend)
    "child_across_vs_parent_move": (b"a RENAME P#/c FarC#\r\n", "P#", "b3"),
    "parent_across_vs_parent_move": (b"a RENAME P# FarP#\r\n", "P#", "b3"),
    "child_within_vs_parent_move": (b"a RENAME P#/c P#/d\r\n", "P#", "b3"),
    "select_child_vs_parent_move": (b"s SELECT P#/c\r\na UID STORE 1:* +FLAGS (\\Answered)\r\n", "P#", "b3"),
    "create_grandchild_vs_parent_move": (b"a CREATE P#/c/g\r\n", "P#", "b3"),
}


@pytest.mark.parametrize("case", sorted(ADMIN))
def test_admin_move_vs_client(proxy_factory, fleet, case):
    import threading
    import time as _t

    from movecheck import cli
    from test_moves import MASTERS
    script, box, backend = ADMIN[case]
    must = []
    for i in range(ROUNDS):
        seed(fleet["b1"], "carol", f"P{i}", [f"p{i}@t"])
        seed(fleet["b1"], "carol", f"P{i}/c", [f"c{i}-{k}@t" for k in range(3)])
        must += [f"p{i}@t"] + [f"c{i}-{k}@t" for k in range(3)]
    proxy = proxy_factory(MASTERS, rules=RULES)
    (w,) = _sessions(proxy, 1)
    answers = []
    for i in range(ROUNDS):
        out = {}

        def admin(out=out, i=i):
            out["r"] = cli("move", "--config", str(proxy.config_path), "carol", box.replace("#", str(i)), backend)
        t = threading.Thread(target=admin)
        t.start()
        _t.sleep(0.05 * (i % 8))
        try:
            w.send(script.replace(b"#", b"%d" % i))
            ans = w.until_tagged(b"a")[-1]
            w.cmd(b"u", b"UNSELECT")
        except ConnectionError:  # its selected mailbox moved (relocation.py): BYE, log in again
            ans = b"BYE"
            (w,) = _sessions(proxy, 1)
        t.join(120)
        answers.append((ans, out["r"].returncode, out["r"].stderr[-150:]))
    print("ANSWERS", answers)
    bad = _judge(fleet, proxy, must, [], [a[:1] for a in answers])
    assert not bad, answers
