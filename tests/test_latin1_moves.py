"""A user whose login name is not UTF-8 (``j\\xe9r``, Latin-1 bytes) through every operation that
touches the journal, the map store and the master-user logins (attack9b made such a login work;
nothing tried what comes after it).

Four real Dovecots of their own (127.0.0.40-43, ``auth_username_chars`` emptied; b4 does not
announce MULTIAPPEND, so an APPEND of two messages there is staged), the map store in SQLite and in
PostgreSQL. Through the proxy: a RENAME across servers, a cross-server COPY and MOVE, a staged
MULTIAPPEND, a second login (keepalive); from the command line (the name as a shell passes its bytes,
surrogateescaped in sys.argv): ``move``, ``map set``/``show``, ``recover`` of a RENAME whose proxy was
SIGKILLed mid-copy. Judged by a census of every backend by content (Message-Id), logged in as the
user's bytes through the master user; ``j\\xe8r`` has mailboxes of the same names and must see only
his own.
"""

from __future__ import annotations

import collections
import imaplib
import json
import os
import re
import subprocess
import sys
import time

import pytest
from imapwire import Wire
from movecheck import REPO, _ids_in, _names, body, faulty, multiappend, quote
from ownfleet import own_dovecots
from test_ops_dovecot import scrape, value

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER, Dovecot, free_port

E, G = b"j\xe9r", b"j\xe8r"  # two users: e-acute and e-grave in Latin-1


def _raw(data: bytes) -> str:
    """Bytes as Python carries them in a str (sys.argv, the fleet's passwd file): surrogateescape."""
    return data.decode("utf-8", "surrogateescape")


USERS = {_raw(E): "secret", _raw(G): "secret"}
NO_MULTIAPPEND = ("protocol imap {\n  imap_capability = IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ UIDPLUS UNSELECT "
                  "NAMESPACE CHILDREN MOVE\n}\n")
RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Archive/*", "backend": "b2"},
         {"mailbox": "Staged/*", "backend": "b4"}]


@pytest.fixture
def latin1_fleet():
    names = ("b1", "b2", "b3", "b4")
    extra = {name: "auth_username_chars =\n" + (NO_MULTIAPPEND if name == "b4" else "") for name in names}
    with own_dovecots("latin1", 40, names, USERS, extra) as backends:
        yield backends


def _master(d: Dovecot, user: bytes) -> imaplib.IMAP4:
    """*user* on *d* through the master user, the name's bytes as they are (imaplib would ASCII-encode a str)."""
    conn = imaplib.IMAP4(d.host, d.port, timeout=120)
    conn.authenticate("PLAIN", lambda _challenge: b"\0".join((user, MASTER_USER.encode(), MASTER_PASSWORD.encode())))
    return conn


def _seed(d: Dovecot, user: bytes, mailbox: str, ids: list[str]) -> None:
    conn = _master(d, user)
    if mailbox != "INBOX":
        assert conn.create(quote(mailbox))[0] == "OK"
    if ids:
        multiappend(conn, [b"s APPEND " + quote(mailbox).encode()]
                    + [b" {%d+}\r\n" % len(body(i)) + body(i) for i in ids])
    conn.logout()


def _where(conn: imaplib.IMAP4, backend: str, where: dict) -> None:
    for name in _names(conn):
        for mid in _ids_in(conn, name):
            where[mid].append((backend, name))


def census(fleet: dict[str, Dovecot], user: bytes) -> dict[str, list[tuple[str, str]]]:
    """Every message of *user* on every backend: Message-Id -> sorted [(backend, mailbox)]."""
    where: dict = collections.defaultdict(list)
    for name, d in fleet.items():
        conn = _master(d, user)
        _where(conn, name, where)
        conn.logout()
    return {mid: sorted(places) for mid, places in where.items()}


def through_proxy(proxy, user: bytes) -> collections.Counter:
    """What *user* reaches through the proxy (its LIST, then each mailbox): Message-Id -> count."""
    conn = imaplib.IMAP4(proxy.host, proxy.port, timeout=120)
    conn.authenticate("PLAIN", lambda _challenge: b"\0" + user + b"\0secret")
    where: dict = collections.defaultdict(list)
    _where(conn, "proxy", where)
    conn.logout()
    return collections.Counter({mid: len(places) for mid, places in where.items()})


def _login(proxy, user: bytes) -> Wire:
    w = Wire(proxy.host, proxy.port, timeout=120)
    w.send(b"L LOGIN {%d}\r\n" % len(user))
    assert w.line().startswith(b"+")
    w.send(user + b" secret\r\n")
    assert w.until_tagged(b"L")[-1].startswith(b"L OK")
    return w


def _ok(w: Wire, tag: bytes, command: bytes) -> list[bytes]:
    reply = w.cmd(tag, command)
    assert reply[-1].startswith(tag + b" OK"), (command, reply)
    return reply


def _uid(w: Wire, mid: str) -> bytes:
    found = [line for line in _ok(w, b"u", b'UID SEARCH HEADER Message-Id "%s"' % mid.encode())
             if line.startswith(b"* SEARCH ")]
    assert len(found) == 1 and len(found[0].split()) == 3, found
    return found[0].split()[2]


def cli(*args: str | bytes, env: dict[str, str] | None = None):
    """``referral-proxy ARGS`` as an administrator's UTF-8 terminal runs it (stdout strict UTF-8: the
    test machine's C.UTF-8 locale would make it surrogateescape and hide what a user's shell shows)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run([sys.executable, "-m", "referral_proxy", *args], capture_output=True, cwd=REPO,
                          env=env, timeout=180)


def parked(port: int) -> None:
    """Until the proxy has a backend connection parked (its UNSELECT answered), polled."""
    deadline = time.monotonic() + 60
    while value(scrape(port), "referral_proxy_backend_parked") < 1:
        assert time.monotonic() < deadline, "nothing parked"
        time.sleep(0.02)


def _ids(prefix: str, n: int) -> list[str]:
    return [f"{prefix}-{i}@t" for i in range(n)]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_a_latin1_user_through_every_journaled_operation(proxy_factory, latin1_fleet, tmp_path, request, store):
    fleet = latin1_fleet
    work, keep, crash, placed = _ids("work", 5), _ids("keep", 3), _ids("crash", 20), _ids("placed", 2)
    _seed(fleet["b1"], E, "Work", work)
    _seed(fleet["b1"], E, "Keep", keep)
    _seed(fleet["b1"], E, "Crash", crash)
    mv, late = _ids("mv", 2), [body(i) for i in _ids("late", 2)]
    _seed(fleet["b1"], E, "Mv", mv)
    _seed(fleet["b2"], E, "Placed", placed)
    g_inbox, g_work = _ids("g-inbox", 2), _ids("g-work", 3)  # the other user, the same names
    _seed(fleet["b1"], G, "INBOX", g_inbox)
    _seed(fleet["b1"], G, "Work", g_work)
    _seed(fleet["b1"], G, "Crash", [])

    dsn = request.getfixturevalue("pg_dsn") if store == "postgresql" else f"sqlite:{tmp_path / 'map.sqlite3'}"
    metrics_port = free_port()
    config = {"backends": {name: {"endpoint": d.endpoint, "url": d.url, "tls": "none", "master_user": MASTER_USER,
                                  "master_password": MASTER_PASSWORD} for name, d in fleet.items()},
              "map": {"store": dsn}, "metrics": {"listen": f"tcp:{metrics_port}:interface=127.0.0.1"}}
    if store == "postgresql":
        config["log"] = {"format": "json"}  # the other store with the other log format
    proxy = proxy_factory(config, rules=RULES, backend_keepalive=60)

    w = _login(proxy, E)
    _ok(w, b"r", b"RENAME Work Shared/Work")  # across: b1 -> b3
    _ok(w, b"c", b"CREATE Archive/Copies")
    _ok(w, b"s", b"SELECT Shared/Work")
    _ok(w, b"k", b"UID COPY %s,%s Archive/Copies" % (_uid(w, work[0]), _uid(w, work[1])))  # b3 -> b2
    _ok(w, b"m", b"UID MOVE %s INBOX" % _uid(w, work[2]))  # b3 -> b1
    _ok(w, b"n", b"CREATE Staged/In")
    staged = [body(i) for i in _ids("staged", 2)]  # b4 announces no MULTIAPPEND: staged
    _ok(w, b"a", b"APPEND Staged/In {%d+}\r\n%s {%d+}\r\n%s" % (len(staged[0]), staged[0], len(staged[1]), staged[1]))
    _ok(w, b"z", b"LOGOUT")
    w.close()
    w = _login(proxy, E)  # a session that taints nothing (RENAME, COPY, MOVE did): its connection is parked
    _ok(w, b"n", b"NOOP")
    _ok(w, b"z", b"LOGOUT")
    w.close()
    parked(metrics_port)
    w = _login(proxy, E)  # and reused
    _ok(w, b"n", b"NOOP")
    w.close()
    assert value(scrape(metrics_port), "referral_proxy_backend_reused_total") == 1

    config_path = str(proxy.config_path)
    moved = cli("move", "--config", config_path, _raw(E), "Keep", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert moved.stdout.startswith(b"moved j\xe9r Keep from b1 to b2"), moved.stdout
    placed_now = cli("map", "--config", config_path, "set", _raw(E), "Placed", "b2")
    assert placed_now.returncode == 0, placed_now.stdout + placed_now.stderr
    w = _login(proxy, E)
    assert b"* 2 EXISTS\r\n" in _ok(w, b"s", b"EXAMINE Placed")
    w.close()

    proxy.stop()  # the recoverer is `recover` (a running proxy would take over the killed ones' entries)
    # three proxies SIGKILLed mid-operation, one after the other (each may recover the one before, as `recover`
    # does): a RENAME across, a cross-server MOVE, a staged APPEND
    killed = [proxy]
    for step, commands in (("copied:1", [b"RENAME Crash Shared/Crash"]),
                           ("move-appended:1", [b"CREATE Archive/Mv", b"SELECT Mv", b"UID MOVE 1:* Archive/Mv"]),
                           ("staging:1", [b"APPEND Staged/In {%d+}\r\n%s {%d+}\r\n%s" % (
                               len(late[0]), late[0], len(late[1]), late[1])])):
        k = proxy_factory({**config, "metrics": None}, rules=RULES, command=faulty("--kill-at", step))
        w = _login(k, E)
        for command in commands[:-1]:
            _ok(w, b"p", command)
        w.send(b"r " + commands[-1] + b"\r\n")
        assert w.closed(120), "the proxy was not killed at " + step
        k.process.wait(30)
        killed.append(k)
    shown = cli("map", "--config", config_path, "show", _raw(E))
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert b"user j\xe9r:" in shown.stdout and b"Placed -> b2" in shown.stdout and b"Keep -> b2" in shown.stdout, shown.stdout
    other = cli("map", "--config", config_path, "show", _raw(G))
    assert other.returncode == 0 and b"moves in progress: none" in other.stdout, other.stdout + other.stderr
    recovered = cli("recover", "--config", config_path)
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    after = cli("map", "--config", config_path, "show", _raw(E))
    assert b"moves in progress: none" in after.stdout, after.stdout + after.stderr + recovered.stdout
    proxy = proxy_factory(config, rules=RULES)

    # the other user's whole home to b2 (his mailboxes of the same names as the first one's); then mail
    # delivered to his old INBOX on b1, carried by `recover`
    home = cli("move", "--config", config_path, _raw(G), "*", "b2")
    assert home.returncode == 0, home.stdout + home.stderr
    assert b"j\xe8r's home is now b2" in home.stdout, home.stdout
    _seed(fleet["b1"], G, "INBOX", ["g-late@t"])
    carried = cli("recover", "--config", config_path)
    assert carried.returncode == 0, carried.stdout + carried.stderr
    assert b"j\xe8r: carried 1 message(s)" in carried.stdout, carried.stdout

    expected = {**{i: [("b3", "Shared/Work")] for i in work[3:]},
                **{i: sorted([("b3", "Shared/Work"), ("b2", "Archive/Copies")]) for i in work[:2]},
                work[2]: [("b1", "INBOX")],
                **{i: [("b4", "Staged/In")] for i in _ids("staged", 2)},
                **{i: [("b2", "Keep")] for i in keep},
                **{i: [("b2", "Placed")] for i in placed},
                **{i: [("b1", "Crash")] for i in crash},
                **{i: [("b2", "Archive/Mv")] for i in mv}}
    found = census(fleet, E)
    late_ids = _ids("late", 2)  # the staged APPEND killed mid-way: in its target whole, or not at all
    assert [found.get(i) for i in late_ids] in ([None, None], [[("b4", "Staged/In")]] * 2), found
    expected.update({i: found[i] for i in late_ids if i in found})
    assert found == expected
    assert census(fleet, G) == {**{i: [("b2", "INBOX")] for i in g_inbox + ["g-late@t"]},
                                **{i: [("b2", "Work")] for i in g_work}}
    assert through_proxy(proxy, E) == collections.Counter({i: len(p) for i, p in expected.items()})
    assert through_proxy(proxy, G) == collections.Counter(g_inbox + g_work + ["g-late@t"])
    samples = scrape(metrics_port)
    assert value(samples, "referral_proxy_map_store_up") == 1
    for p in (proxy, *killed):  # the first proxy, the killed ones, the one after
        assert "Traceback" not in p.stderr_text() and "Unhandled" not in p.stderr_text(), p.stderr_text()[-3000:]
    # the logs tell the two users apart (their bytes that are not UTF-8 as \udcXX)
    if store == "postgresql":
        logins = [e.get("user") for e in map(json.loads, proxy.stderr_text().splitlines()) if e.get("event") == "login"]
        assert _raw(E) in logins and _raw(G) in logins, logins
    else:
        logins = re.findall(r'\] login session=\d+ user="([^"]*)"', proxy.stderr_text())
        assert "j\\udce9r" in logins and "j\\udce8r" in logins, logins


@pytest.fixture(scope="module")
def latin1_locale(tmp_path_factory):
    """The environment of a shell in an ISO-8859-1 locale (built with localedef: none is installed here)."""
    where = tmp_path_factory.mktemp("locale")
    made = subprocess.run(["localedef", "-i", "en_US", "-f", "ISO-8859-1", str(where / "en_US.ISO-8859-1")],
                          capture_output=True)
    env = {"LOCPATH": str(where), "LC_ALL": "en_US.ISO-8859-1", "PYTHONIOENCODING": "iso8859-1"}
    check = subprocess.run([sys.executable, "-c", "import sys; print(sys.getfilesystemencoding())"], env={**os.environ, **env},
                           capture_output=True, text=True)
    if check.stdout.strip() != "iso8859-1":
        pytest.skip(f"no ISO-8859-1 locale could be made: {made.stderr[-300:]!r}")
    return env


def test_a_latin1_shell_names_the_user_by_the_bytes_it_passes(proxy_factory, latin1_fleet, tmp_path, latin1_locale):
    """A shell in an ISO-8859-1 locale passes ``j\\xe9r`` as those bytes, as ``doveadm`` takes them; Python
    decodes sys.argv by the locale ("j\u00e9r"), and the name was encoded back as UTF-8: ``map set`` placed
    ``j\\xc3\\xa9r``, a user nobody is (j\\xe9r's mailbox stayed where it was), and ``move`` logged in as him."""
    fleet = latin1_fleet
    keep = _ids("keep", 3)
    _seed(fleet["b1"], E, "Keep", keep)
    _seed(fleet["b2"], E, "Placed", _ids("placed", 2))
    config = {"backends": {name: {"endpoint": d.endpoint, "url": d.url, "tls": "none", "master_user": MASTER_USER,
                                  "master_password": MASTER_PASSWORD} for name, d in fleet.items()},
              "map": {"store": f"sqlite:{tmp_path / 'map.sqlite3'}"}}
    proxy = proxy_factory(config, rules=RULES)
    config_path = str(proxy.config_path)
    placed = cli("map", "--config", config_path, "set", E, "Placed", "b2", env=latin1_locale)
    assert placed.returncode == 0, placed.stdout + placed.stderr
    assert placed.stdout == b"j\xe9r Placed -> b2\n"
    moved = cli("move", "--config", config_path, E, "Keep", "b2", env=latin1_locale)
    assert moved.returncode == 0, moved.stdout + moved.stderr
    assert moved.stdout.startswith(b"moved j\xe9r Keep from b1 to b2"), moved.stdout
    shown = cli("map", "--config", config_path, "show", _raw(E))  # a UTF-8 shell: the same bytes, surrogateescaped
    assert b"Placed -> b2" in shown.stdout and b"Keep -> b2" in shown.stdout, shown.stdout + shown.stderr
    assert census(fleet, E) == {**{i: [("b2", "Keep")] for i in keep}, **{i: [("b2", "Placed")] for i in _ids("placed", 2)}}
    w = _login(proxy, E)
    assert b"* 2 EXISTS\r\n" in _ok(w, b"p", b"EXAMINE Placed")
    assert b"* 3 EXISTS\r\n" in _ok(w, b"k", b"EXAMINE Keep")
    w.close()
