"""``mutt`` (Debian mutt 2.2) driven by ``-e 'push ...'`` through the proxy.

mutt is a curses program: it will not start without a terminal, so it runs on a
pseudo-terminal (``run_in_pty``), its whole session typed in advance with
``push`` and ending with ``<quit>``; ``$quit``/``$delete``/``$confirmcreate``
etc. are set so that it never asks anything.

What mutt does on the wire: ``AUTHENTICATE PLAIN <initial response>`` (SASL-IR,
authzid = the user), ``ENABLE UTF8=ACCEPT`` pipelined with ``LIST "" ""``,
``SELECT``, ``FETCH 1:n (UID FLAGS INTERNALDATE RFC822.SIZE
BODY.PEEK[HEADER.FIELDS (...)])``; saving or copying to another mailbox is
``STATUS "dst" (UIDVALIDITY)``, ``UID COPY n "dst"`` and, after ``NO [TRYCREATE]``,
``CREATE "dst"`` and the UID COPY again; a save marks the message ``\\Deleted``
(``UID STORE``) and ``CLOSE`` expunges it at the end.
"""

from __future__ import annotations

import pytest
from clients import RULES, RecordingRelay, mailboxes, message, needs, run_in_pty, seed, sha, stored

_needs = needs("mutt", "mutt")
pytestmark = pytest.mark.usefixtures("clean_mail")


def _mutt(tmp_path, host, port, folder: str, keys: str):
    rc = tmp_path / "muttrc"
    rc.write_text(f"""\
set imap_user = alice
set imap_pass = secret
set ssl_starttls = no
set ssl_force_tls = no
set folder = imap://{host}:{port}/
set spoolfile = +INBOX
set record = ""
set postponed = ""
set header_cache = ""
set message_cachedir = ""
set imap_check_subscribed = no
set mail_check_stats = no
set confirmappend = no
set confirmcreate = no
set delete = yes
set move = no
set quit = yes
set mark_old = no
set wait_key = no
set pipe_decode = no
set beep = no
set sleep_time = 0
set timeout = 1
""")
    assert "'" not in keys
    return run_in_pty(["mutt", "-n", "-F", str(rc), "-f", f"={folder}", "-e", f"push '{keys}'"],
                      env={"HOME": str(tmp_path)}, cwd=tmp_path, timeout=60)


def test_mutt_reads_and_saves_a_message_on_a_remote_backend(proxy_factory, fleet, tmp_path):
    """In Shared/Box (b3): the 2nd message piped to a file (read through the proxy),
    then saved (= copied + deleted) to Shared/Kept, a new mailbox on b3."""
    msgs = [message(i, 1200) for i in range(3)]
    seed(fleet["b3"], "alice", "Shared/Box", [msgs[0], (msgs[1], "\\Flagged"), msgs[2]])
    proxy = proxy_factory(rules=RULES)
    out = tmp_path / "piped.eml"
    relay = RecordingRelay(proxy.host, proxy.port)
    try:
        r = _mutt(tmp_path, relay.host, relay.port, "Shared/Box",
                  f"<next-undeleted><pipe-message>cat > {out}<enter>"
                  "<save-message>=Shared/Kept<enter><quit>")
        relay.wait_closed()
    finally:
        relay.stop()
    assert r.returncode == 0, r
    assert sha(out.read_bytes().replace(b"\n", b"\r\n")) == sha(msgs[1]), r
    kept = stored(fleet["b3"], "alice", "Shared/Kept")
    assert [(s.sha256, s.flags) for s in kept] == [(sha(msgs[1]), {"\\Flagged"})]  # piping is no reading
    assert [s.sha256 for s in stored(fleet["b3"], "alice", "Shared/Box")] == [sha(msgs[0]), sha(msgs[2])]
    assert not {"Shared/Box", "Shared/Kept"} & mailboxes(fleet["b1"], "alice")
    verbs = [c.split(b" ", 1)[1] for c in relay.commands()]
    assert any(v.startswith(b'UID COPY ') and v.endswith(b'"Shared/Kept"') for v in verbs), verbs


def test_mutt_copies_tagged_messages_across_backends(proxy_factory, fleet, tmp_path):
    """Every message of INBOX (b1) tagged and copied to =Shared/Copies (b3, not there
    yet): one UID COPY across servers, after mutt's CREATE on TRYCREATE."""
    msgs = [message(i, 600 + 400 * i) for i in range(4)]
    seed(fleet["b1"], "alice", "INBOX", [(m, "\\Seen") if i % 2 else m for i, m in enumerate(msgs)])
    before = stored(fleet["b1"], "alice", "INBOX")
    proxy = proxy_factory(rules=RULES)
    relay = RecordingRelay(proxy.host, proxy.port)
    try:
        r = _mutt(tmp_path, relay.host, relay.port, "INBOX",
                  "<tag-pattern>~A<enter><tag-prefix><copy-message>=Shared/Copies<enter><quit>")
        relay.wait_closed()
    finally:
        relay.stop()
    assert r.returncode == 0, r
    transcript = relay.transcript()
    copies = stored(fleet["b3"], "alice", "Shared/Copies")
    assert [(s.sha256, s.flags, s.when) for s in copies] == [(s.sha256, s.flags, s.when) for s in before], transcript
    assert [(s.sha256, s.flags) for s in stored(fleet["b1"], "alice", "INBOX")] == [
        (s.sha256, s.flags) for s in before]
    assert "Shared/Copies" not in mailboxes(fleet["b1"], "alice")
