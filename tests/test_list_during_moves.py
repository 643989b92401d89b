"""A RENAME across backends (and an admin move) looks atomic to every other client's LIST, LSUB and STATUS.

Dovecot's own RENAME is: another session sees the old name or the new one, never both, never
neither. Through the proxy the move is many steps (mover.py); another session's listing must
be, at each of them, exactly what it was before the move (before the commit point) or exactly
what it is after it (past the commit point): the same lines, flags and all. The move runs in
one proxy process, stopped at each journal step (faultproxy.py stops that whole process); the
other session is a client of a second proxy on the same map store; and, unstopped, a client of
the same proxy asking in a loop while a big mailbox moves.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from imapwire import Wire
from movecheck import census, cli, faulty, judge, seed, wait_paused
from test_moves import _logged_in, ids

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER
from referral_proxy.journal import Step
from referral_proxy.relocation import BYE

pytestmark = pytest.mark.usefixtures("clean_mail")

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Archive/*", "backend": "b2"}]
MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}
BEFORE = {s.value for s in (Step.RESERVED, Step.PLANNED, Step.CREATING, Step.CREATED, Step.COPYING, Step.COPIED)}
MOVE_STEPS = [s.value for s in Step if not s.value.startswith(("move-", "renaming", "staging"))]
# Every step of a move, up to its 4th time: a point never reached stops nothing.
EVERY_STEP = [o for s in MOVE_STEPS for k in range(1, 5) for o in ("--pause-at", f"{s}:{k}")]



def views(old: str = "Work", new: str = "Shared/W") -> list[bytes]:
    """The commands whose answers must be the ones from before or the ones from after."""
    o, n = old.encode(), new.encode()
    parent = o.rpartition(b"/")[0] or b"Work"
    return [b'LIST "" "*"', b'LIST "" "%"', b'LIST "" "%s/%%"' % parent, b'LIST "" "%s/%%"' % o,
            b'LIST "" "Shared/*"', b'LSUB "" "*"', b'LSUB "" "%"', b'LIST (SUBSCRIBED) "" "*"',
            b'LIST "" "*" RETURN (SUBSCRIBED CHILDREN STATUS (MESSAGES))',
            b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "*" RETURN (CHILDREN)', b'LIST "" "%" RETURN (CHILDREN)',
            b'RLIST "" "*"', b'RLSUB "" "*"',
            b'STATUS "%s" (MESSAGES)' % o, b'STATUS "%s/c" (MESSAGES)' % o, b'STATUS "%s" (MESSAGES)' % n,
            b'STATUS "%s/c" (MESSAGES)' % n]


VIEWS = views()
_TIMING = re.compile(rb" \([0-9.]+ \+ [0-9.]+(?: \+ [0-9.]+)? secs\)\.?")
_MARKS = re.compile(rb"\\(?:Un)?[Mm]arked ?")


def _observer(proxy) -> tuple[Wire, Wire]:
    """Two sessions: RLIST/RLSUB on the second (they make a session referral-aware: its LIST would
    then ask its home backend only)."""
    return _logged_in(proxy), _logged_in(proxy)


def _view(ws: tuple[Wire, Wire], commands: list[bytes] = VIEWS) -> dict[bytes, list[bytes]]:
    """What each of *commands* answers now."""
    out = {}
    for i, command in enumerate(commands):
        tag = b"v%d" % i
        lines = ws[command.startswith(b"RL")].cmd(tag, command)
        done = _TIMING.sub(b"", lines[-1][len(tag):])  # Dovecot's "(0.001 + 0.000 secs)"
        if done.startswith(b" OK"):
            done = b" OK"
        # \\Marked (new mail since the last look, RFC 3501 7.2.2) is the backend's to change meanwhile
        # an untagged NO is a warning (RFC 3501 7.1.2): Dovecot's "* NO Mailbox was deleted under us" when
        # a mailbox it listed is gone before its STATUS (the proxy drops it while it sees the move on)
        out[command] = sorted(_MARKS.sub(b"", line).replace(b" )", b")") for line in lines[:-1]
                              if not line.startswith(b"* NO ")) + [done]
    return out


def _seed_work(fleet, n: int = 20, name: str = "Work") -> list[str]:
    """*name* (n messages) and *name*/c (3), both subscribed; and its parent, if not INBOX, with one."""
    work, child = ids("work", n), ids("workc", 3)
    parent = name.rpartition("/")[0]
    if parent and parent != "INBOX":
        seed(fleet["b1"], "carol", parent, ["parent@t"])
        work.append("parent@t")
    seed(fleet["b1"], "carol", name, work[:n])
    seed(fleet["b1"], "carol", name + "/c", child)
    with fleet["b1"].client("carol") as m:
        m.subscribe(name)
        m.subscribe(name + "/c")
    return work + child


def _differences(seen: dict, before: dict, after: dict, past: bool) -> list:
    want = after if past else before
    return [(c, seen[c], want[c]) for c in seen if seen[c] != want[c]]


def _first(steps: list[tuple[str, list]]) -> str:
    """The first step whose view differs: what was seen, and what was expected."""
    for step, diffs in steps:
        for command, seen, want in diffs:
            return f"at {step}, {command!r}:\n seen {seen}\n want {want}"
    return ""


def _stepwise(mover, observer, pause: Path, command: bytes, commands: list[bytes],
              first: Callable[[], None] = lambda: None) -> list[tuple[str, list]]:
    """Send *command* through *mover* (stopped at every journal step); at each, *observer*'s view
    (*first* called at the first stop, before looking). (step, differences from the expected side)."""
    before = _view(observer, commands)
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(mover.cmd(b"r", command)))
    thread.start()
    seen: list[tuple[str, dict]] = []
    while thread.is_alive():
        if (pause / "paused").exists():
            step = (pause / "paused").read_text()
            (pause / "paused").unlink()
            if not seen:
                first()
            seen.append((step, _view(observer, commands)))
            (pause / "resume").touch()
        thread.join(0.01)
    assert answer and answer[0][-1].startswith(b"r OK"), answer
    after = _view(observer, commands)
    assert before != after
    return [(step, _differences(view, before, after, step.split(":")[0] not in BEFORE)) for step, view in seen]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
@pytest.mark.parametrize("old", ["Work", "Proj/Work", "INBOX/Work"])
def test_a_rename_across_is_seen_whole_by_a_client_of_another_proxy_at_every_step(proxy_factory, fleet, tmp_path,
                                                                                    request, store, old):
    """RENAME *old* (with *old*/c, both subscribed; under a parent mailbox, or INBOX) to Shared/W on
    another backend, stopped at every step, seen by a client of a second proxy on the same map. On
    main LIST showed Shared/W from `created` on and *old* until it was drained (both), STATUS said
    INUSE. A session of the second proxy that had *old*/c selected is told BYE at the first step,
    while everyone still sees *old* (relocation.py), as Dovecot ends it once its mailbox is gone."""
    mail = _seed_work(fleet, name=old)
    dsn = f"sqlite:{tmp_path / 'shared.sqlite3'}" if store == "sqlite" else request.getfixturevalue("pg_dsn")
    shared = {**MASTERS, "map": {"store": dsn}}
    pause = tmp_path / "pause"
    pause.mkdir()
    moving = proxy_factory(shared, rules=RULES, command=faulty(*EVERY_STEP, "--pause-dir", str(pause)))
    other = proxy_factory(shared, rules=RULES)
    selected = _logged_in(other)
    assert selected.cmd(b"s", b'SELECT "%s/c"' % old.encode())[-1].startswith(b"s OK")

    def told_bye() -> None:
        line = selected.line()
        assert line.startswith(b"* BYE ") and BYE in line, line
        assert selected.closed(30)

    commands = views(old)
    steps = _stepwise(_logged_in(moving), _observer(other), pause, b'RENAME "%s" "Shared/W"' % old.encode(),
                      commands, told_bye)
    assert {s.split(":")[0] for s, _d in steps} >= {"created", "committed", "placed", "aside", "drained"}, " ".join(s for s, _d in steps)
    bad = [(s, c) for s, d in steps for c, _seen, _want in d]
    assert bad == [], _first(steps)
    counts, where = census(fleet, "carol")
    assert judge(counts, mail) == ([], [])


def test_an_admin_move_is_seen_whole_at_every_step(proxy_factory, fleet, tmp_path):
    """``referral-proxy move carol Work b2`` stopped at every step: one name, from one backend or the other,
    its subscription with it."""
    mail = _seed_work(fleet)
    before, seen, after = _admin_move_stepwise(proxy_factory, tmp_path, VIEWS)
    # the names and flags are the same; the STATUS counts too: every view the same, before, during and after
    assert before == after
    assert [(s, _differences(v, before, after, False)) for s, v in seen if _differences(v, before, after, False)] == []
    counts, where = census(fleet, "carol")
    assert judge(counts, mail) == ([], [])
    assert {where[i][0][0] for i in mail} == {"b2"}


def test_an_admin_move_keeps_listing_a_parent_whose_subscribed_child_is_gone(proxy_factory, fleet, tmp_path):
    """Probe d1 (stop 55): Work/gone subscribed, then renamed away (Dovecot keeps the subscription): LIST
    (SUBSCRIBED RECURSIVEMATCH) lists Work with CHILDINFO. During a move of Work the line was missing (past
    the commit point: the destination knows no subscribed child; the source's line, not the owner's, dropped)."""
    mail = _seed_work(fleet)
    with fleet["b1"].client("carol") as m:
        m.unsubscribe("Work")
        m.unsubscribe("Work/c")
        m.create("Work/gone")
        m.subscribe("Work/gone")
        m.rename("Work/gone", "Elsewhere")
    commands = [b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%"', b'LIST (SUBSCRIBED RECURSIVEMATCH) "" "%" RETURN (CHILDREN)']
    before, seen, after = _admin_move_stepwise(proxy_factory, tmp_path, commands)
    assert any(b'Work (CHILDINFO ("SUBSCRIBED"))' in line for line in before[commands[0]]), before
    assert before == after
    assert [(s, _differences(v, before, after, False)) for s, v in seen if _differences(v, before, after, False)] == []
    assert len(seen) > 5
    counts, _where = census(fleet, "carol")
    assert judge(counts, mail) == ([], [])


def _admin_move_stepwise(proxy_factory, tmp_path, commands: list[bytes]) -> tuple[dict, list, dict]:
    """``move carol Work b2`` stopped at every step: the views of *commands* before, at each step, after."""
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = proxy_factory(MASTERS, rules=RULES)
    observer = _observer(proxy)
    before = _view(observer, commands)
    outcome: list = []
    mover = threading.Thread(target=lambda: outcome.append(cli(
        "move", "--config", str(proxy.config_path), "carol", "Work", "b2",
        command=faulty(*EVERY_STEP, "--pause-dir", str(pause)))))
    mover.start()
    seen = []
    while mover.is_alive():
        if (pause / "paused").exists():
            step = (pause / "paused").read_text()
            (pause / "paused").unlink()
            seen.append((step, _view(observer, commands)))
            (pause / "resume").touch()
        mover.join(0.01)
    assert outcome[0].returncode == 0, outcome[0].stdout + outcome[0].stderr
    return before, seen, _view(observer, commands)


@pytest.mark.parametrize("through", ["the same proxy", "another proxy on PostgreSQL"])
def test_a_rename_across_of_many_messages_never_shows_both_names_to_a_looping_client(proxy_factory, fleet, request,
                                                                                      through):
    """Unstopped: a RENAME of 1200 messages (3 batches) through one proxy while a session of it (or of a
    second proxy on the same PostgreSQL map) LISTs and STATUSes in a loop: every answer is the one
    from before or the one from after, and once after, never before again."""
    mail = _seed_work(fleet, 1200)
    if through == "the same proxy":
        proxy = other = proxy_factory(MASTERS, rules=RULES)
    else:
        shared = {**MASTERS, "map": {"store": request.getfixturevalue("pg_dsn")}}
        proxy, other = proxy_factory(shared, rules=RULES), proxy_factory(shared, rules=RULES)
    mover, observer = _logged_in(proxy), _observer(other)
    before = _view(observer)
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(mover.cmd(b"r", b'RENAME Work "Shared/W"')))
    thread.start()
    seen: list[dict] = []
    while thread.is_alive():  # one command at a time, each in turn
        seen.append(_view(observer, [VIEWS[len(seen) % len(VIEWS)]]))
    thread.join()
    assert answer[0][-1].startswith(b"r OK"), answer
    after = _view(observer)
    assert len(seen) > len(VIEWS)
    for command in VIEWS:  # each answer is the one from before or the one from after; once after, never before
        answers = [v[command] for v in seen if command in v]
        assert [a for a in answers if a not in (before[command], after[command])] == [], command
        sides = [a == after[command] for a in answers]
        assert sides == sorted(sides), command
    counts, _where = census(fleet, "carol")
    assert judge(counts, mail) == ([], [])


def test_a_rename_of_inbox_across_shows_the_new_mailbox_from_the_commit_point(proxy_factory, fleet, tmp_path):
    """RENAME INBOX Shared/In (RFC 3501 6.3.5: INBOX's messages move, INBOX and its children stay),
    stopped at every step: Shared/In is listed from the commit point on, never before; INBOX and
    INBOX/Kid all along. (INBOX's STATUS counts its messages until they are drained: not asked.)"""
    mail = ids("inbox", 12)
    seed(fleet["b1"], "carol", "INBOX", mail, create=False)
    seed(fleet["b1"], "carol", "INBOX/Kid", ["kid@t"])
    shared = {**MASTERS, "map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}}
    pause = tmp_path / "pause"
    pause.mkdir()
    moving = proxy_factory(shared, rules=RULES, command=faulty(*EVERY_STEP, "--pause-dir", str(pause)))
    other = proxy_factory(shared, rules=RULES)
    commands = [c for c in views("INBOX", "Shared/In") if b"STATUS" not in c] + [b'STATUS "Shared/In" (MESSAGES)']
    steps = _stepwise(_logged_in(moving), _observer(other), pause, b'RENAME INBOX "Shared/In"', commands)
    assert {s.split(":")[0] for s, _d in steps} >= {"created", "committed", "placed", "drained"}, steps
    assert [(s, c) for s, d in steps for c, _seen, _want in d] == [], _first(steps)
    counts, where = census(fleet, "carol")
    assert judge(counts, mail + ["kid@t"]) == ([], [])
    assert {where[i][0] for i in mail} == {("b3", "Shared/In")}


def test_a_status_of_a_renames_new_name_waits_for_its_plan(proxy_factory, fleet, tmp_path):
    """STATUS of a RENAME across's new name while the move is at its check (step `reserved`: which names it
    carries not journaled yet), through a second proxy. Routed by the map then, it reached the destination
    the move made a moment later and said ``MESSAGES 0``, neither before nor after (CI, the looping test
    above through PostgreSQL). It waits for the plan, then answers as the move shows the name."""
    mail = _seed_work(fleet)
    shared = {**MASTERS, "map": {"store": f"sqlite:{tmp_path / 'shared.sqlite3'}"}}
    pause = tmp_path / "pause"
    pause.mkdir()
    moving = proxy_factory(shared, rules=RULES, command=faulty("--pause-at", "reserved:1", "--pause-dir", str(pause)))
    other = proxy_factory(shared, rules=RULES)
    mover, observer = _logged_in(moving), _logged_in(other)
    answer: list = []
    thread = threading.Thread(target=lambda: answer.append(mover.cmd(b"r", b'RENAME Work "Shared/W"')))
    thread.start()
    try:
        assert wait_paused(pause, "reserved").startswith("reserved")
        observer.cmd(b"n", b"NOOP")  # (the second proxy looks at the map: it sees the move begun)
        observer.send(b's STATUS "Shared/W" (MESSAGES)\r\n')
        observer.sock.settimeout(1.0)
        with pytest.raises(TimeoutError):  # no answer while the move's plan is not known
            observer.line()
    finally:
        observer.sock.settimeout(120)
        (pause / "resume").touch()
        thread.join(120)
    status = observer.until_tagged(b"s")
    assert answer and answer[0][-1].startswith(b"r OK"), answer
    assert status[-1].startswith(b"s NO") or status[0] == b"* STATUS Shared/W (MESSAGES 20)\r\n", status
    counts, _where = census(fleet, "carol")
    assert judge(counts, mail) == ([], [])
