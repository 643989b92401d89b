"""Two proxies on one PostgreSQL map, each RENAMEing mailboxes of the same user on the same backend at
once (disjoint names), while sessions at both STATUS the other's mailboxes: every proxy holds its own
sessions there for the other's RENAME (renamehold.hold_for_another), but never the connection its own
RENAME goes on, so neither waits for the other until the hold's bound (REMOTE_HOLD, logged). Every
RENAME answered OK, every STATUS answered, no hold ended by its bound, and the backend holds exactly
the new names. The same with the two workers of one master on a SQLite map (workerholds.py)."""

from __future__ import annotations

import threading

import pytest
from imapwire import Wire, wait_for
from test_workers import holder as worker_of
from test_workers import workers_of

USER = "alice"
ROUNDS = 20
RULES = [{"user": USER, "mailbox": "*", "backend": "b1"}]


def _session(proxy, worker: int | None = None, pids: list[int] | None = None) -> Wire:
    """A session through *proxy* (with *worker*: on that one of its workers *pids*)."""
    for _ in range(200):
        w = Wire(proxy.host, proxy.port, timeout=60)  # a hold for ever would end the test here
        w.login(USER)
        if worker is None or worker_of(pids, w) == pids[worker]:
            return w
        w.close()
    raise AssertionError(f"no connection landed on worker {worker} of {pids}")


class _Worker:
    """One worker of a master, as the place a side's sessions go."""

    def __init__(self, proxy, index: int, pids: list[int]) -> None:
        self.proxy, self.index, self.pids = proxy, index, pids

    def session(self) -> Wire:
        return _session(self.proxy, self.index, self.pids)


@pytest.mark.parametrize("where", ["proxies", "workers", "sqlite-proxies"])
def test_two_proxies_renaming_at_once_both_go_on(proxy_factory, fleet, clean_mail, request, tmp_path, where):
    """*where*: two proxies on one PostgreSQL map, or the two workers of one master on a SQLite map
    (the master relays each one's hold to the other: workerholds.py), or two separate proxies on one
    SQLite map file (each asks the other over its socket: peerholds.py)."""
    backend = fleet["b1"]
    if where in ("proxies", "sqlite-proxies"):
        dsn = request.getfixturevalue("pg_dsn") if where == "proxies" else f"sqlite:{tmp_path / 'shared.sqlite3'}"
        proxies = [proxy_factory({"map": {"store": dsn}}, rules=RULES) for _ in range(2)]
        places = proxies
    else:
        proxies = [proxy_factory(rules=RULES, workers=2)]
        pids = [p.pid for p in wait_for(lambda: len(workers_of(proxies[0].pid)) == 2 and workers_of(proxies[0].pid),
                                        "2 workers")]
        places = [_Worker(proxies[0], i, pids) for i in range(2)]
    ctl = Wire(backend.host, backend.port, timeout=60)
    ctl.login(USER, backend.password(USER))
    for side in "AB":
        for i in range(ROUNDS):
            assert ctl.cmd(b"c", b"CREATE %s%d" % (side.encode(), i))[-1].startswith(b"c OK")
    answers: dict[str, list[bytes]] = {"A": [], "B": [], "statusA": [], "statusB": []}
    errors: list[str] = []
    done = threading.Event()

    def renamer(side: str, proxy) -> None:
        try:
            w = proxy.session() if isinstance(proxy, _Worker) else _session(proxy)
            for i in range(ROUNDS):
                answers[side].append(w.cmd(b"r", b"RENAME %s%d %sx%d" % (side.encode(), i, side.encode(), i))[-1])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{side}: {e!r}")

    def looker(side: str, proxy) -> None:  # STATUS of the mailboxes the other proxy renames
        try:
            w = proxy.session() if isinstance(proxy, _Worker) else _session(proxy)
            i = 0
            while not done.is_set():
                answers["status" + side].append(w.cmd(b"s", b"STATUS %s%d (MESSAGES)" % (side.encode(), i % ROUNDS))[-1])
                i += 1
        except Exception as e:  # noqa: BLE001
            errors.append(f"status {side}: {e!r}")

    renamers = [threading.Thread(target=renamer, args=("A", places[0])),
                threading.Thread(target=renamer, args=("B", places[1]))]
    lookers = [threading.Thread(target=looker, args=("B", places[0])),
               threading.Thread(target=looker, args=("A", places[1]))]
    for t in lookers + renamers:
        t.start()
    for t in renamers:
        t.join(300)
    done.set()
    for t in lookers:
        t.join(120)
    assert not errors, errors
    for side in "AB":
        assert len(answers[side]) == ROUNDS and all(a.startswith(b"r OK") for a in answers[side]), answers[side]
        assert answers["status" + side] and all(a.startswith((b"s OK", b"s NO")) for a in answers["status" + side])
    for proxy in proxies:  # a hold let go only by its bound: the two RENAMEs held each other
        assert "not over after" not in proxy.stderr_text()
        assert "did not all hold" not in proxy.stderr_text()  # (workers: the master's go came in time)
    listed = b"".join(ctl.cmd(b"l", b'LIST "" "*"'))
    for side in "AB":
        for i in range(ROUNDS):
            assert b" %sx%d\r\n" % (side.encode(), i) in listed and b" %s%d\r\n" % (side.encode(), i) not in listed, listed
