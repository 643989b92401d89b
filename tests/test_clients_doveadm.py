r"""``doveadm backup`` / ``doveadm sync`` (Dovecot's dsync, Debian dovecot-core), the
tool administrators migrate mail with, reading and writing through the proxy with
``imapc:`` as the remote side.

doveadm runs as root with a dovecot.conf of its own and a private base_dir: a
throwaway Dovecot on 127.0.0.9 (its auth service answers the user lookup every
doveadm mail command makes), its Maildir as the local ``mail_location``, and
``imapc_*`` settings that point at the proxy (``imapc_user = %u``). Every message is
checked where it landed: on the backends (for a push) or in the local Maildir (for
a pull, read back with ``doveadm fetch``), by content, flags and internal date.

What dsync sends through imapc (``imapc_rawlog_dir``): ``LOGIN "user" "pass"``
without a CAPABILITY command (it takes the greeting's and the login's [CAPABILITY]),
``LIST "" ""`` then ``LIST "" "*"`` (the proxy's merged listing), ``STATUS "box"
(UIDNEXT UIDVALIDITY)`` of every mailbox, ``LSUB "" "*"``, then per mailbox
``EXAMINE`` + ``UID FETCH 1:* (FLAGS)`` + ``UID FETCH <uids> (INTERNALDATE SAVEDATE
BODY.PEEK[])``. ``doveadm import`` into imapc: ``CREATE`` each mailbox (also
``CREATE "INBOX"``, refused), an ``EXAMINE "INBOX"`` between mailboxes, and one
``APPEND "box" (flags) "date" {n}`` per message with a synchronizing literal (no
MULTIAPPEND, no LITERAL+), flags written as ``( $Label1)`` with a leading space,
dates converted to +0000.
"""

from __future__ import annotations

import imaplib
import json
import re
import shutil
import time
from pathlib import Path

import pytest
from clients import RULES, needs, run, sha, stored

from referral_proxy.fleet import MAIL_USER, Dovecot, make_root

_needs = needs("doveadm", "dovecot-core")
pytestmark = pytest.mark.usefixtures("clean_mail")

#: alice's mail: on her home b1 and, for Shared/*, on b3.
MAIL = {
    "INBOX": [("\\Seen", "01-Jan-2021 10:00:00 +0000"), ("\\Flagged $Work", "02-Feb-2021 11:30:00 +0100"),
              ("", "03-Mar-2021 12:00:00 -0500")],
    "Work": [("\\Answered \\Seen", "04-Apr-2022 08:00:00 +0000"), ("$Label1", "05-May-2022 09:00:00 +0000")],
    "Shared/Projects": [("\\Seen", "06-Jun-2023 10:00:00 +0000"), ("\\Draft", "07-Jul-2023 10:00:00 +0000"),
                        ("\\Flagged \\Seen", "08-Aug-2023 10:00:00 +0000")],
    "Shared/Projects/2026": [("", "09-Sep-2024 10:00:00 +0000")],
}


def _home(user: str, mailbox: str) -> str:
    """The backend that holds *mailbox* of *user* under RULES."""
    if mailbox.startswith("Shared/"):
        return "b3"
    return "b2" if user == "bob" else "b1"


def _body(mailbox: str, i: int) -> bytes:
    return (f"From: Ann <ann@example.net>\r\nTo: alice@example.org\r\nSubject: {mailbox} {i}\r\n"
            f"Message-Id: <{sha(mailbox.encode())[:12]}.{i}@example.net>\r\n\r\n"
            f"body {i} of {mailbox}\r\n" + "line\r\n" * (i * 7)).encode()


def _seed_alice(fleet) -> None:
    for mailbox, messages in MAIL.items():
        with fleet[_home("alice", mailbox)].client("alice") as m:
            if mailbox != "INBOX":
                assert m.create(f'"{mailbox}"')[0] == "OK"
            for i, (flags, date) in enumerate(messages):
                typ, data = m.append(f'"{mailbox}"', f"({flags})", f'"{date}"', _body(mailbox, i))
                assert typ == "OK", data


def _expected(mailbox: str) -> list[tuple[frozenset[str], int, str]]:
    """(flags, internal date, sha256) of alice's seeded messages of *mailbox*, sorted."""
    return sorted(_expected_unsorted(mailbox))


def _expected_local(mailbox: str) -> list[tuple[frozenset[str], int, str]]:
    """As _expected, the bodies with LF line ends (a Maildir stores them so; IMAP gives CRLF)."""
    return sorted((f, t, sha(_body(mailbox, i).replace(b"\r\n", b"\n")))
                  for i, (f, t, _) in enumerate(_expected_unsorted(mailbox)))


def _expected_unsorted(mailbox: str) -> list[tuple[frozenset[str], int, str]]:
    return [(frozenset(flags.split()), int(time.mktime(imaplib.Internaldate2tuple(
        f'INTERNALDATE "{date}"'.encode()))), sha(_body(mailbox, i)))
        for i, (flags, date) in enumerate(MAIL[mailbox])]


def _on_backend(fleet, user: str, mailbox: str) -> list[tuple[frozenset[str], int, str]]:
    return sorted((s.flags, s.when, s.sha256) for s in stored(fleet[_home(user, mailbox)], user, mailbox))


class Dsync:
    """doveadm with a private Dovecot of its own (config, base_dir, Maildir store on
    127.0.0.9, which also answers doveadm's user lookups); ``imapc:`` is the proxy."""

    def __init__(self, root: Path, proxy_host: str, proxy_port: int) -> None:
        self.rawlog = root / "rawlog"
        self.rawlog.mkdir(parents=True)
        shutil.chown(self.rawlog, MAIL_USER, MAIL_USER)
        self.dovecot = Dovecot("dsync", "127.0.0.9", root / "dovecot", extra_config=f"""
# the remote side of doveadm backup/sync/import: the proxy
imapc_host = {proxy_host}
imapc_port = {proxy_port}
imapc_user = %u
imapc_password = secret
imapc_features = rfc822.size fetch-headers
imapc_rawlog_dir = {self.rawlog}
mail_prefetch_count = 20
""")
        self.dovecot.start()
        self.mail = self.dovecot.mail_dir
        self.root = root

    def doveadm(self, *args: str, timeout: float = 120):
        result = run(["doveadm", "-c", str(self.dovecot.conf_path), *args], timeout=timeout)
        return result

    def local(self, user: str) -> dict[str, list[tuple[frozenset[str], int, str]]]:
        """{mailbox: sorted (flags, internal date, sha256)} of *user*'s local Maildir, read by doveadm."""
        result = self.doveadm("-f", "json", "fetch", "-u", user, "mailbox flags date.received.unixtime text", "ALL")
        assert result.returncode == 0, str(result)
        out: dict[str, list] = {}
        for row in json.loads(result.stdout or b"[]"):
            flags = frozenset(f for f in row["flags"].split() if f != "\\Recent")
            text = row["text"].encode("utf-8", "surrogateescape").replace(b"\r\n", b"\n")
            out.setdefault(row["mailbox"], []).append((flags, int(row["date.received.unixtime"]), sha(text)))
        return {k: sorted(v) for k, v in out.items()}

    def rawlog_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.rawlog.rglob("*")) if p.is_file())

    def stop(self) -> None:
        self.dovecot.stop()


@pytest.fixture
def dsync_for(request):
    made: list[Dsync] = []

    def make(proxy) -> Dsync:
        d = Dsync(make_root("rp-dsync-") / "dsync", proxy.host, proxy.port)
        made.append(d)
        return d

    yield make
    for d in made:
        d.stop()
        shutil.rmtree(d.root.parent, ignore_errors=True)


def test_backup_pulls_a_user_spread_over_two_backends(proxy_factory, fleet, dsync_for):
    _seed_alice(fleet)
    proxy = proxy_factory(rules=RULES)
    dsync = dsync_for(proxy)
    result = dsync.doveadm("backup", "-R", "-u", "alice", "imapc:")
    assert result.returncode == 0, f"{result}\n{dsync.rawlog_text()[-4000:]}"
    local = dsync.local("alice")
    for mailbox in MAIL:
        assert local.get(mailbox) == _expected_local(mailbox), (mailbox, local.get(mailbox))
    assert set(local) == set(MAIL)
    # nothing changed on the backends
    for mailbox in MAIL:
        assert _on_backend(fleet, "alice", mailbox) == _expected(mailbox)
    sent = dsync.rawlog_text()
    assert re.search(r"LIST .*\"\*\"", sent), sent[-3000:]


def test_import_pushes_a_maildir_into_new_mailboxes_where_the_map_says(proxy_factory, fleet, dsync_for):
    """alice's mail, pulled into a local Maildir, pushed back with ``doveadm import``
    (``mail_location = imapc:``: the user's store is the proxy): under ``Restored/`` in
    her own account (all on her home b1: no rule names Restored/*), and as they are
    into bob's empty account (his home b2, his Shared/* on b3)."""
    _seed_alice(fleet)
    proxy = proxy_factory(rules=RULES)
    dsync = dsync_for(proxy)
    assert dsync.doveadm("backup", "-R", "-u", "alice", "imapc:").returncode == 0
    source = f"maildir:{dsync.mail}/alice"
    result = dsync.doveadm("-o", "mail_location=imapc:", "import", "-s", "-u", "alice", source, "Restored", "ALL")
    assert result.returncode == 0, f"{result}\n{dsync.rawlog_text()[-4000:]}"
    for mailbox in MAIL:
        restored = sorted((s.flags, s.when, s.sha256) for s in stored(fleet["b1"], "alice", f"Restored/{mailbox}"))
        assert restored == _expected(mailbox), mailbox
        assert _on_backend(fleet, "alice", mailbox) == _expected(mailbox)  # the originals untouched
    result = dsync.doveadm("-o", "mail_location=imapc:", "import", "-u", "bob", source, "", "ALL")
    assert result.returncode == 0, f"{result}\n{dsync.rawlog_text()[-4000:]}"
    for mailbox in MAIL:
        assert _on_backend(fleet, "bob", mailbox) == _expected(mailbox), mailbox
    with fleet["b2"].client("bob") as m:  # nothing of Shared/* stored on bob's home
        names = {line.rsplit(b" ", 1)[1].strip(b'"') for line in m.list('""', "*")[1] if line}
    assert not any(n.startswith(b"Shared/") for n in names), names


def test_two_way_sync_carries_changes_both_ways(proxy_factory, fleet, dsync_for):
    """A second ``doveadm sync`` fails against direct Dovecot too when a mailbox's parent
    does not exist (``Backend didn't update mailbox Shared GUID``: dsync cannot set a
    mailbox GUID over IMAP): here the parent ``Shared`` is a real mailbox (on b1)."""
    _seed_alice(fleet)
    with fleet["b1"].client("alice") as m:
        assert m.create("Shared")[0] == "OK"
    proxy = proxy_factory(rules=RULES)
    dsync = dsync_for(proxy)
    assert dsync.doveadm("sync", "-u", "alice", "imapc:").returncode == 0
    assert dsync.local("alice")["Shared/Projects"] == _expected_local("Shared/Projects")
    # a message delivered on b3, a flag set locally
    new = b"From: x@example.com\r\nSubject: late\r\n\r\nlate mail\r\n"
    with fleet["b3"].client("alice") as m:
        assert m.append('"Shared/Projects"', "(\\Seen)", '"10-Oct-2024 10:00:00 +0000"', new)[0] == "OK"
    result = dsync.doveadm("flags", "add", "-u", "alice", "\\Answered", "mailbox", "Work", "ALL")
    assert result.returncode == 0, str(result)
    result = dsync.doveadm("sync", "-u", "alice", "imapc:")
    assert result.returncode == 0, f"{result}\n{dsync.rawlog_text()[-4000:]}"
    assert sha(new.replace(b"\r\n", b"\n")) in {h for _, _, h in dsync.local("alice")["Shared/Projects"]}
    work = _on_backend(fleet, "alice", "Work")
    assert all("\\Answered" in flags for flags, _, _ in work), work
    assert len(work) == len(MAIL["Work"])
