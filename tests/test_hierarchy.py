"""A RENAME's whole hierarchy goes where the map says, or the RENAME is refused before anything changes.

RFC 3501 6.3.5: renaming a mailbox renames its inferior names. The map may put a child on
another backend than its parent (a rule such as ``Archive/* -> b2``, or ``map set``); a
backend renames only what it holds, so such a RENAME would rename part of the hierarchy
and say OK. It is refused (``NO [CANNOT]``) before anything changes, on one backend and
across backends (hierarchy.py); and a new name inside the old one's own subtree is
refused as Dovecot refuses it. Judged by a census of the backends by content
(movecheck.py) and by what a client of the proxy lists and reaches.
"""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, cli, faulty, judge, seed
from test_moves import MASTERS, RULES, _at_once, _exactly_once, _logged_in, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")

ELSEWHERE = b"NO [CANNOT] A mailbox inside lives on another server"
UNDER = b"NO Can't rename mailbox under its own child"


def _carol(fleet) -> dict[str, list[str]]:
    """The lead's case: Archive (b1) and Archive/X (b2, by the rule), Work and Work/Kid (b1)."""
    mail = {"Archive": ids("arch", 2), "Archive/X": ids("archx", 2), "Work": ids("work", 2),
            "Work/Kid": ids("kid", 2), "INBOX": ids("inbox", 2)}
    seed(fleet["b1"], "carol", "Archive", mail["Archive"])
    seed(fleet["b2"], "carol", "Archive/X", mail["Archive/X"])
    seed(fleet["b1"], "carol", "Work", mail["Work"])
    seed(fleet["b1"], "carol", "Work/Kid", mail["Work/Kid"])
    seed(fleet["b1"], "carol", "INBOX", mail["INBOX"])
    return mail


def _all(mail: dict[str, list[str]]) -> list[str]:
    return [i for v in mail.values() for i in v]


def _where(fleet, mail: dict[str, list[str]]) -> dict[str, set[tuple[str, str]]]:
    """mailbox of the seed -> {(backend, mailbox)} its messages are in now."""
    _counts, where = census(fleet, "carol")
    return {box: {where[i][0] for i in mids} for box, mids in mail.items()}


def _listed(w: Wire) -> dict[str, bytes]:
    """name -> flags, as the proxy's LIST "" "*" shows them."""
    out = {}
    for line in w.cmd(b"l", b'LIST "" "*"')[:-1]:
        flags, _, rest = line.partition(b")")
        name = rest.split(b'"/" ', 1)[1].strip().strip(b'"')
        out[name.decode()] = flags
    return out


UNCHANGED = {"Archive": {("b1", "Archive")}, "Archive/X": {("b2", "Archive/X")}, "Work": {("b1", "Work")},
             "Work/Kid": {("b1", "Work/Kid")}, "INBOX": {("b1", "INBOX")}}


@pytest.mark.parametrize("command", [b"RENAME Archive Foo", b"RENAME Archive Shared/Arch", b"RENAME Archive Shared"])
def test_a_rename_whose_child_lives_elsewhere_is_refused_and_changes_nothing(proxy_factory, fleet, command):
    """Foo: the same backend (b1); Shared/Arch: across (b1 -> b3); Shared: b1, but the child's new
    name Shared/X would be b3's, a third backend. Each used to answer OK, Archive/X left behind."""
    mail = _carol(fleet)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    reply = w.cmd(b"r", command)
    assert reply[-1].startswith(b"r " + ELSEWHERE), reply
    listed = _listed(w)
    assert b"\\Noselect" not in listed["Archive"] and "Archive/X" in listed, listed
    assert not {"Foo", "Shared/Arch", "Shared"} & set(listed), listed
    # The way out the answer names: move the child first, then the parent goes whole.
    assert w.cmd(b"c", b"RENAME Archive/X Kept")[-1].startswith(b"c OK")
    assert w.cmd(b"p", command)[-1].startswith(b"p OK")
    w.close()
    _exactly_once(fleet, proxy, "carol", _all(mail))
    where = _where(fleet, mail)
    new = command.split()[-1].decode()
    assert where["Archive"] == {("b3" if new == "Shared/Arch" else "b1", new)}
    assert where["Archive/X"] == {("b1", "Kept")}
    assert _no_entries(proxy)


def test_nothing_is_created_or_moved_when_a_cross_server_rename_is_refused(proxy_factory, fleet):
    mail = _carol(fleet)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    assert w.cmd(b"r", b"RENAME Archive Shared/Arch")[-1].startswith(b"r " + ELSEWHERE)
    assert w.cmd(b"s", b"RENAME Work Work2")[-1].startswith(b"s OK")  # all on b1: renamed whole, as before
    w.close()
    with fleet["b3"].client("carol") as m:
        assert [n for n in m.list()[1] or [] if n and b"Arch" in n] == []
    _exactly_once(fleet, proxy, "carol", _all(mail))
    assert _where(fleet, mail) == {**UNCHANGED, "Work": {("b1", "Work2")}, "Work/Kid": {("b1", "Work2/Kid")}}
    assert _no_entries(proxy)


@pytest.mark.parametrize("old, new", [("Archive", "Archive/Old"), ("Archive", "Archive/X/Y"), ("Work", "Work/Sub"),
                                      ("Work", "Work/Kid/Y"), ("INBOX", "INBOX/Old"), ("inbox", "INBOX/old"),
                                      ("Archive", "Archive/Archive")])
def test_a_rename_under_its_own_subtree_is_refused_as_dovecot_refuses_it(proxy_factory, fleet, old, new):
    mail = _carol(fleet)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    direct = Wire(fleet["b1"].host, fleet["b1"].port)
    direct.login("carol")
    command = b"RENAME %s %s" % (old.encode(), new.encode())
    reply, theirs = w.cmd(b"r", command)[-1], direct.cmd(b"r", command)[-1]
    direct.close()
    assert reply.startswith(b"r " + UNDER) and theirs.split()[1] == b"NO", (reply, theirs)
    if old != "inbox":  # (Dovecot says "Renaming INBOX isn't supported" to a lower-case inbox)
        assert theirs.startswith(b"r " + UNDER), theirs
    assert w.cmd(b"n", b"RENAME Work Workx")[-1].startswith(b"n OK")  # a prefix is not a parent
    w.close()
    _exactly_once(fleet, proxy, "carol", _all(mail))
    assert _where(fleet, mail) == {**UNCHANGED, "Work": {("b1", "Workx")}, "Work/Kid": {("b1", "Workx/Kid")}}
    assert _no_entries(proxy)


def test_a_child_placed_by_map_set_refuses_the_rename(proxy_factory, fleet):
    proj, remote, local = ids("proj", 3), ids("remote", 2), ids("local", 2)
    seed(fleet["b1"], "carol", "Proj", proj)
    seed(fleet["b1"], "carol", "Proj/Local", local)
    seed(fleet["b3"], "carol", "Proj/Remote", remote)
    proxy = proxy_factory(MASTERS, rules=RULES)
    config = str(proxy.config_path)
    assert cli("map", "--config", config, "set", "carol", "Proj/Remote", "b3").returncode == 0
    w = _logged_in(proxy)
    for command in (b"RENAME Proj Proj2", b"RENAME Proj Shared/P", b"RENAME Proj Archive/P"):
        assert w.cmd(b"r", command)[-1].startswith(b"r " + ELSEWHERE), command
    w.close()
    _exactly_once(fleet, proxy, "carol", proj + remote + local)
    _counts, where = census(fleet, "carol")
    assert {where[i][0] for i in proj} == {("b1", "Proj")} and {where[i][0] for i in local} == {("b1", "Proj/Local")}
    assert {where[i][0] for i in remote} == {("b3", "Proj/Remote")}
    assert "Proj/Remote -> b3" in cli("map", "--config", config, "show", "carol").stdout
    assert _no_entries(proxy)


def test_a_stray_copy_the_map_hides_does_not_refuse_the_rename(proxy_factory, fleet):
    """Archive/Old on b3 is nobody's mailbox through the proxy (the rule sends Archive/* to b2): it
    stays where it is, hidden, and the RENAME of Archive goes on."""
    arch, stray = ids("arch", 2), ids("stray", 2)
    seed(fleet["b1"], "carol", "Archive", arch)
    seed(fleet["b3"], "carol", "Archive/Old", stray)
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = _logged_in(proxy)
    assert w.cmd(b"r", b"RENAME Archive Foo")[-1].startswith(b"r OK")
    w.close()
    _exactly_once(fleet, proxy, "carol", arch + stray, hidden=stray)
    _counts, where = census(fleet, "carol")
    assert {where[i][0] for i in arch} == {("b1", "Foo")} and {where[i][0] for i in stray} == {("b3", "Archive/Old")}


@pytest.mark.parametrize("run", range(3))
def test_parent_and_child_renamed_at_once_never_leave_half_a_hierarchy(proxy_factory, fleet, run):
    """Session 1 renames Archive across servers, session 2 its child on b2 to where it would go.
    Either they serialize (the child first: then the parent goes whole) or one is refused
    (INUSE, or the child still elsewhere); never a parent renamed without its child."""
    mail = _carol(fleet)
    proxy = proxy_factory(MASTERS, rules=RULES)
    a1, a2 = _at_once([_logged_in(proxy), _logged_in(proxy)],
                      [b"RENAME Archive Shared/Arch", b"RENAME Archive/X Shared/Arch/X"])
    assert a1.startswith(b"r0 OK") or a1.startswith(b"r0 NO [INUSE]") or a1.startswith(b"r0 " + ELSEWHERE), a1
    assert a2.startswith(b"r1 OK") or a2.startswith(b"r1 NO [INUSE]"), a2
    _exactly_once(fleet, proxy, "carol", _all(mail))
    where = _where(fleet, mail)
    assert where["Archive/X"] == ({("b3", "Shared/Arch/X")} if a2.startswith(b"r1 OK") else {("b2", "Archive/X")})
    assert where["Archive"] == ({("b3", "Shared/Arch")} if a1.startswith(b"r0 OK") else {("b1", "Archive")})
    assert not (a1.startswith(b"r0 OK") and not a2.startswith(b"r1 OK")), (a1, a2)  # half a hierarchy
    assert _no_entries(proxy)


@pytest.mark.parametrize("command, step", [(b"RENAME Work Shared/W", "reserved:1"),
                                           (b"RENAME Archive Foo", "reserved:1"),
                                           (b"RENAME Work Shared/W", "copied:2"),
                                           (b"RENAME Work Shared/W", "placed:1"),
                                           (b"RENAME Work Foo", "renaming:1")])
def test_a_proxy_killed_mid_rename_is_recovered_and_every_mailbox_reachable(proxy_factory, fleet, command, step):
    """Killed while it looked again, under its reservations, for children elsewhere (reserved: a
    RENAME its first look refuses never gets there, renamecheck.py), or mid-way through renaming a
    hierarchy that lives on one backend (Work and Work/Kid): `recover` leaves every mailbox whole,
    under its old name or its new one, the hierarchy together."""
    mail = _carol(fleet)
    proxy = proxy_factory(MASTERS, rules=RULES, command=faulty("--kill-at", step))
    w = _logged_in(proxy)
    w.send(b"r " + command + b"\r\n")
    assert w.closed(30), "the proxy was not killed at " + step
    proxy.process.wait(10)
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0 and "NOT recovered" not in recovered.stdout, recovered.stdout + recovered.stderr
    proxy.start()
    _exactly_once(fleet, proxy, "carol", _all(mail))
    where = _where(fleet, mail)
    assert {k: v for k, v in where.items() if k not in ("Work", "Work/Kid")} == {
        k: v for k, v in UNCHANGED.items() if k not in ("Work", "Work/Kid")}
    new = command.split()[-1].decode()
    assert (where["Work"], where["Work/Kid"]) in [({("b1", "Work")}, {("b1", "Work/Kid")}),
                                                  ({("b3" if "/" in new else "b1", new)},
                                                   {("b3" if "/" in new else "b1", new + "/Kid")})], where
    assert _no_entries(proxy)


@pytest.mark.parametrize("command", [b"RENAME Far Foo", b"RENAME Far Shared/F"])
def test_a_backend_that_cannot_be_asked_about_children_refuses_the_rename(proxy_factory, fleet, command):
    """Far/* lives on b4, which is down: whether Far has a child there is unknown, so nothing is
    renamed (a clear NO, not a guess). A mailbox no rule puts a child of on b4 is not held up by it."""
    from referral_proxy.fleet import free_port

    far, near = ids("far", 2), ids("near", 2)
    seed(fleet["b1"], "carol", "Far", far)
    seed(fleet["b1"], "carol", "Near", near)
    port = free_port("127.0.0.3")
    dead = {"endpoint": f"tcp:host=127.0.0.3:port={port}", "url": f"imap://127.0.0.3:{port}",
            "master_user": "x", "master_password": "y"}
    proxy = proxy_factory({**MASTERS, "backends": {**MASTERS["backends"], "b4": dead}},
                          rules=[{"mailbox": "Far/*", "backend": "b4"}, *RULES])
    w = _logged_in(proxy)
    reply = w.cmd(b"r", command)
    assert reply[-1].startswith(b"r NO [UNAVAILABLE] Server b4 could not be asked"), reply
    assert w.cmd(b"n", b"RENAME Near Near2")[-1].startswith(b"n OK")
    w.close()
    counts, where = census(fleet, "carol")  # (the proxy's merged LIST needs b4: NO [UNAVAILABLE])
    assert judge(counts, far + near) == ([], [])
    assert {where[i][0] for i in far} == {("b1", "Far")} and {where[i][0] for i in near} == {("b1", "Near2")}
    assert _no_entries(proxy)


@pytest.mark.parametrize("name", ['q"uo\\te', "a*b", "50% off", "Caf&AOk-"])
def test_odd_names_find_their_children_elsewhere_by_name(proxy_factory, fleet, name):
    """A name with a wildcard, a quote, a backslash or mUTF-7 is listed as a name on the other
    backend: its own child there refuses the RENAME; what the name would match as a pattern does not."""
    from movecheck import quote

    mail, child, alike = ids("odd", 2), ids("oddkid", 2), ids("alike", 2)
    seed(fleet["b1"], "carol", name, mail)
    seed(fleet["b3"], "carol", name + "/kid", child)
    other = name.replace("%", "x").replace("*", "yy") if "%" in name or "*" in name else name + "x"
    seed(fleet["b3"], "carol", other + "/kid", alike)
    proxy = proxy_factory(MASTERS, rules=RULES)
    config = str(proxy.config_path)
    for placed in (name + "/kid", other + "/kid", other, name + "/ghost"):  # ghost: b3 is asked to the end
        assert cli("map", "--config", config, "set", "carol", placed, "b3").returncode == 0
    w = _logged_in(proxy)
    reply = w.cmd(b"r", b"RENAME " + quote(name).encode() + b" " + quote("Moved " + name).encode())
    assert reply[-1].startswith(b"r " + ELSEWHERE), reply
    assert w.cmd(b"k", b"RENAME " + quote(name + "/kid").encode() + b" Kid")[-1].startswith(b"k OK")
    reply = w.cmd(b"s", b"RENAME " + quote(name).encode() + b" " + quote("Moved " + name).encode())
    assert reply[-1].startswith(b"s OK"), reply  # only the look-alike is left on b3: not a child
    w.close()
    _exactly_once(fleet, proxy, "carol", mail + child + alike)
    _counts, where = census(fleet, "carol")
    assert {where[i][0] for i in mail} == {("b1", "Moved " + name)}
    assert {where[i][0] for i in child} == {("b1", "Kid")}
    assert {where[i][0] for i in alike} == {("b3", other + "/kid")}
