"""A destination backend that refuses part way: its quota reached in the MIDDLE of a cross-server
UID COPY / UID MOVE, a RENAME across (several MULTIAPPEND batches), the administrator's ``move``,
a staged MULTIAPPEND and a plain APPEND.

Three real Dovecots of their own (ownfleet.py: 127.0.0.50 the source, .51 and .52 destinations,
.52 without MULTIAPPEND so that a MULTIAPPEND is staged); a destination's user has a message-count
quota or ``quota_max_mail_size`` (userdb fields, read at each login: raised by rewriting the passwd
file, Dovecot.set_user_fields). Also: a proxy SIGKILLed right after the refusal, then ``recover``;
and a destination filling up past a RENAME's commit point (held names until the quota rises).
Judged by a census of both backends by content (Message-Id): every message exactly once, the
source intact when the operation is refused, the client told ``NO [OVERQUOTA]``, nothing left in
the journal, no name held (a later RENAME works), no private mailbox left; then, with the quota
raised, the same command works.
"""

from __future__ import annotations

import collections

import pytest
from imapwire import Wire, wait_for
from movecheck import body, census, cli, deliver, faulty, journal_empty, seed, wait_paused
from ownfleet import own_dovecots, own_proxy

LOW, HIGH = "userdb_quota_rule=*:messages=%d", "userdb_quota_rule=*:messages=100000"


@pytest.fixture
def qfleet():
    with own_dovecots("quota", 50) as backends:
        yield backends


def _proxy(proxy_factory, qfleet, **kw):
    return own_proxy(proxy_factory, qfleet, **kw)


def _census(qfleet):
    counts, where = census(None, "alice", qfleet.values())
    return counts, where


def _login(proxy) -> Wire:
    w = Wire(proxy.host, proxy.port, timeout=300)
    w.login("alice", "secret")
    return w


def _names(qfleet):
    out = {}
    for n, d in qfleet.items():
        with d.client("alice") as m:
            typ, data = m.list('""', "*")
            out[n] = sorted(x.rsplit(b'"/" ', 1)[1].decode() for x in data if x)
    return out


def _private_left(qfleet) -> list:
    return [(n, x) for n, names in _names(qfleet).items() for x in names if "referral-proxy" in x]


def test_uid_copy_and_move_into_a_full_destination(proxy_factory, qfleet):
    ids = [f"m{i}@q" for i in range(30)]
    seed(qfleet["b1"], "alice", "Work", ids)
    with qfleet["b2"].client("alice") as m:
        m.create("Q/In")
    qfleet["b2"].set_user_fields("alice", LOW % 20)
    proxy = _proxy(proxy_factory, qfleet)
    for verb in (b"COPY", b"MOVE"):
        w = _login(proxy)
        w.cmd(b"s", b"SELECT Work")
        reply = w.cmd(b"c", b"UID " + verb + b" 1:* Q/In")
        assert reply[-1].startswith(b"c NO [OVERQUOTA]"), reply
        counts, where = _census(qfleet)
        assert all(counts[i] == 1 and where[i] == [("quotab1", "Work")] for i in ids), where
        assert journal_empty(proxy)
        w.close()
    qfleet["b2"].set_user_fields("alice", HIGH)
    w = _login(proxy)
    w.cmd(b"s", b"SELECT Work")
    reply = w.cmd(b"c", b"UID MOVE 1:* Q/In")
    assert reply[-1].startswith(b"c OK"), reply
    counts, where = _census(qfleet)
    assert all(counts[i] == 1 and where[i] == [("quotab2", "Q/In")] for i in ids), where
    assert journal_empty(proxy)


def test_rename_across_into_a_full_destination(proxy_factory, qfleet):
    ids = [f"r{i}@q" for i in range(1200)]
    seed(qfleet["b1"], "alice", "Big", ids, size=200)
    qfleet["b2"].set_user_fields("alice", LOW % 700)
    proxy = _proxy(proxy_factory, qfleet)
    w = _login(proxy)
    reply = w.cmd(b"r", b"RENAME Big Q/Big")
    assert reply[-1].startswith(b"r NO [OVERQUOTA]"), reply
    counts, where = _census(qfleet)
    assert all(counts[i] == 1 and where[i] == [("quotab1", "Big")] for i in ids), collections.Counter(
        tuple(v) for v in where.values())
    assert journal_empty(proxy)
    assert _private_left(qfleet) == []
    assert "Q/Big" not in str(_names(qfleet)["b2"])
    qfleet["b2"].set_user_fields("alice", HIGH)
    reply = w.cmd(b"r", b"RENAME Big Q/Big")
    assert reply[-1].startswith(b"r OK"), reply
    counts, where = _census(qfleet)
    assert all(counts[i] == 1 and where[i] == [("quotab2", "Q/Big")] for i in ids)
    assert journal_empty(proxy)
    assert _private_left(qfleet) == []


def test_admin_move_into_a_full_destination(proxy_factory, qfleet):
    ids = [f"a{i}@q" for i in range(1200)]
    inbox = [f"i{i}@q" for i in range(40)]
    seed(qfleet["b1"], "alice", "Arch", ids, size=200)
    seed(qfleet["b1"], "alice", "INBOX", inbox, size=200)
    qfleet["b2"].set_user_fields("alice", LOW % 700)
    proxy = _proxy(proxy_factory, qfleet)
    config = str(proxy.config_path)
    for what in ("Arch", "*"):
        moved = cli("move", "--config", config, "alice", what, "b2")
        assert moved.returncode != 0 and "OVERQUOTA" in moved.stdout + moved.stderr
        counts, where = _census(qfleet)
        assert all(counts[i] == 1 and where[i] == [("quotab1", "Arch")] for i in ids)
        assert all(counts[i] == 1 and where[i] == [("quotab1", "INBOX")] for i in inbox)
        assert journal_empty(proxy)
        assert _private_left(qfleet) == []
        assert _names(qfleet)["b2"] == ["INBOX"], _names(qfleet)
    qfleet["b2"].set_user_fields("alice", HIGH)
    moved = cli("move", "--config", config, "alice", "*", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    counts, where = _census(qfleet)
    assert all(counts[i] == 1 and where[i] == [("quotab2", "Arch")] for i in ids)
    assert all(counts[i] == 1 and where[i] == [("quotab2", "INBOX")] for i in inbox)
    assert journal_empty(proxy)


def _append(w: Wire, tag: bytes, box: bytes, ids: list[str]) -> list[bytes]:
    parts = [tag + b" APPEND " + box]
    for mid in ids:
        data = body(mid, 300)
        parts.append(b' (\\Seen) {%d+}\r\n' % len(data) + data)
    w.send(b"".join(parts) + b"\r\n")
    return w.until_tagged(tag)


def test_multiappend_and_append_into_a_full_destination(proxy_factory, qfleet):
    for d in ("b2", "b3"):
        with qfleet[d].client("alice") as m:
            m.create("Q/In" if d == "b2" else "S/In")
            qfleet[d].set_user_fields("alice", LOW % 10)
    seed(qfleet["b2"], "alice", "INBOX", [f"pre{i}@b2" for i in range(5)])
    seed(qfleet["b3"], "alice", "INBOX", [f"pre{i}@b3" for i in range(5)])
    proxy = _proxy(proxy_factory, qfleet)
    w = _login(proxy)
    tries = {b"Q/In": [f"q{i}@ma" for i in range(8)], b"S/In": [f"s{i}@ma" for i in range(8)]}
    for box, ids in tries.items():
        reply = _append(w, b"a", box, ids)
        assert reply[-1].startswith(b"a NO [OVERQUOTA]"), reply
    reply = _append(w, b"b", b"S/In", ["one@a"])  # room for one: a plain APPEND works
    assert reply[-1].startswith(b"b OK"), reply
    counts, where = _census(qfleet)
    assert not any(counts[i] for ids in tries.values() for i in ids), where
    assert counts["one@a"] == 1
    assert _private_left(qfleet) == []
    assert journal_empty(proxy)
    for d in ("b2", "b3"):
        qfleet[d].set_user_fields("alice", HIGH)
    w.close()
    w = _login(proxy)
    for box, ids in tries.items():
        reply = _append(w, b"c", box, ids)
        assert reply[-1].startswith(b"c OK"), reply
    counts, where = _census(qfleet)
    assert all(counts[i] == 1 for ids in tries.values() for i in ids), where
    assert _private_left(qfleet) == []


def test_one_message_over_the_size_limit_in_the_middle(proxy_factory, qfleet):
    """quota_max_mail_size: the destination refuses one message of a batch alone."""
    small = [f"s{i}@q" for i in range(20)]
    seed(qfleet["b1"], "alice", "Work", small[:10])
    with qfleet["b1"].client("alice") as m:
        assert m.append("Work", None, None, body("huge@q", 60_000))[0] == "OK"
    seed(qfleet["b1"], "alice", "Work", small[10:], create=False)
    ids = small + ["huge@q"]
    with qfleet["b2"].client("alice") as m:
        m.create("Q/In")
    qfleet["b2"].set_user_fields("alice", "userdb_quota_max_mail_size=20K")
    proxy = _proxy(proxy_factory, qfleet)
    w = _login(proxy)
    w.cmd(b"s", b"SELECT Work")
    for verb in (b"COPY", b"MOVE"):
        reply = w.cmd(b"c", b"UID " + verb + b" 1:* Q/In")
        assert reply[-1].startswith(b"c NO"), reply
    w.cmd(b"u", b"UNSELECT")
    reply = w.cmd(b"r", b"RENAME Work Q/Work")
    assert reply[-1].startswith(b"r NO"), reply
    moved = cli("move", "--config", str(proxy.config_path), "alice", "Work", "b2")
    assert moved.returncode != 0
    counts, where = _census(qfleet)
    assert all(counts[i] == 1 and where[i] == [("quotab1", "Work")] for i in ids), where
    assert journal_empty(proxy)
    assert _private_left(qfleet) == []
    assert _names(qfleet)["b2"] == ["INBOX", "Q", "Q/In"], _names(qfleet)
    reply = w.cmd(b"r", b"RENAME Work Work2")  # no name left held
    assert reply[-1].startswith(b"r OK"), reply


@pytest.mark.parametrize("what", ["rename", "move", "staged"])
def test_a_proxy_killed_right_after_the_refusal(proxy_factory, qfleet, what):
    ids = [f"k{i}@q" for i in range(1200 if what == "rename" else 30)]
    seed(qfleet["b1"], "alice", "Work", ids, size=200)
    for d, box in (("b2", "Q/In"), ("b3", "S/In")):
        with qfleet[d].client("alice") as m:
            m.create(box)
        qfleet[d].set_user_fields("alice", LOW % (700 if what == "rename" else 10))
    proxy = _proxy(proxy_factory, qfleet)
    w = _login(proxy)
    if what == "rename":
        reply = w.cmd(b"r", b"RENAME Work Q/Work")
    elif what == "move":
        w.cmd(b"s", b"SELECT Work")
        reply = w.cmd(b"r", b"UID MOVE 1:* Q/In")
    else:
        ids = [f"st{i}@q" for i in range(20)]
        reply = _append(w, b"r", b"S/In", ids)
    proxy.kill()
    assert reply[-1].startswith(b"r NO [OVERQUOTA]"), reply
    rec = cli("recover", "--config", str(proxy.config_path))
    assert rec.returncode == 0, rec.stdout + rec.stderr
    counts, where = _census(qfleet)
    if what == "staged":
        assert not any(counts[i] for i in ids), where
    else:
        assert all(counts[i] == 1 and where[i] == [("quotab1", "Work")] for i in ids)
    assert journal_empty(proxy)
    assert _private_left(qfleet) == []


def test_the_destination_fills_up_past_the_commit_point(proxy_factory, qfleet, tmp_path):
    """Mail that reached the source during a RENAME across, refused by the destination after the commit
    point (its quota filled meanwhile): never lost; the move stays pending, its names held (INUSE, the
    moved mailbox out of the user's reach) until the quota is raised; then ``recover`` finishes it."""
    ids = [f"c{i}@q" for i in range(30)]
    late = [f"late{i}@q" for i in range(5)]
    seed(qfleet["b1"], "alice", "Work", ids, size=200)
    qfleet["b2"].set_user_fields("alice", LOW % 40)
    pause = tmp_path / "pause"
    pause.mkdir()
    proxy = _proxy(proxy_factory, qfleet, command=faulty("--pause-at", "committed:1", "--pause-dir", str(pause)))
    w = _login(proxy)
    w.send(b"r RENAME Work Q/Work\r\n")
    wait_paused(pause, "committed")
    for mid in late:
        assert deliver(qfleet["b1"], "alice", "Work", mid) == "Work"
    seed(qfleet["b2"], "alice", "INBOX", [f"fill{i}@q" for i in range(10)], size=100)  # 30 + 10: full
    (pause / "resume").touch()
    reply = w.until_tagged(b"r")
    assert reply[-1].startswith(b"r OK"), reply  # committed: the first pass is in Q/Work
    counts, where = _census(qfleet)
    assert all(counts[i] >= 1 for i in ids + late), where  # nothing lost (the old one still being emptied)
    # Past the commit point the move cannot be undone: until the destination takes the late mail, the
    # move stays pending and its names held (INUSE), the entry left for recovery
    probe = _login(proxy)
    assert probe.cmd(b"e", b"EXAMINE Q/Work")[-1].startswith(b"e NO [INUSE]")  # what the user sees meanwhile
    probe.close()
    qfleet["b2"].set_user_fields("alice", HIGH)
    rec = cli("recover", "--config", str(proxy.config_path))
    assert rec.returncode == 0, rec.stdout + rec.stderr
    if "left in the journal" in rec.stdout:  # the proxy's own sweep (every 30 s) had it: it finishes it (CI, 4
        wait_for(lambda: journal_empty(proxy), f"the proxy's sweep finishing the move ({rec.stdout})", 80)  # at once)
    counts, where = _census(qfleet)
    assert all(counts[i] == 1 and where[i] == [("quotab2", "Q/Work")] for i in ids + late), (where, rec.stdout)
    assert journal_empty(proxy)
    assert _private_left(qfleet) == []
