r"""``alpine`` (Debian alpine 2.26, on its own UW c-client) through the proxy, on tmux.

alpine is a full-screen program with no batch mode: each test runs it in a
private tmux server (``tmux -S <socket>``, a fixed 120x40 window, a throwaway
HOME and a minimal pinerc that skips the greeting screens), reads the screen
with ``capture-pane`` and types with ``send-keys``, waiting for expected text
with a deadline.  The questions alpine asks on the way (passwords, the TLS
certificate of a referred backend, "Create?") are answered as they come by
``Alpine.expect`` and recorded in ``Alpine.answered``.  A ``RecordingRelay`` in
front of the proxy records the wire.  It runs fine as root (remote folders only).

What alpine does on the wire: ``AUTHENTICATE PLAIN`` with SASL-IR (the password
typed at its prompt), ``ID``, ``SELECT``; saving a message to a folder is
``RLIST "" name`` (c-client uses RLIST/RLSUB whenever MAILBOX-REFERRALS is
announced, because alpine follows referrals), ``RLIST "" ""``, ``RLIST "" parent``,
``Create name`` (after asking "Create?") and ``COPY n name``.

Referrals it follows (c-client's ``imap_referral`` hook): SELECT, CREATE, COPY and
login (RFC 2221).  A referral url has no ``/notls``, so on the referred backend
(Dovecot, which offers STARTTLS) alpine upgrades to TLS and checks the
certificate against the IP address of the url: with the fleet's CA as
``SSL_CERT_FILE`` the one complaint left is "Server name does not match
certificate" (c-client compares DNS names only), answered "Yes".  The password is
asked once per backend (then cached).  Because alpine lists with RLIST, a default
(``referrals = "aware"``) session turns referral-aware at the first save.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from clients import RULES, RecordingRelay, mailboxes, message, needs, seed, sha, stored

_needs_alpine = needs("alpine", "alpine")
_needs_tmux = needs("tmux", "tmux")
pytestmark = pytest.mark.usefixtures("clean_mail")

ROWS, COLS = 40, 120
PASSWORD = "secret"

_PASSWORD_PROMPT = re.compile(
    r"(?P<retry>Retrying - )?HOST: \[?(?P<host>[^\]\s]+?)\]?:(?P<port>\d+)(?: \(INSECURE\))?"
    r"\s+USER: (?P<user>\S+)\s+ENTER PASSWORD:")
_CERT_TITLE = "SSL/TLS CERTIFICATE VALIDATION FAILURE"
# the end of a save: the busy cue's last state or the message after it (status
# messages are not held on the screen: status-message-delay=-1)
SAVED = r"\[Saving\s+DONE\]|\[Message \d+ copied to folder "


class Alpine:
    """One alpine process in a private tmux server (killed by ``close``)."""

    def __init__(self, tmp_path: Path, relay: RecordingRelay, user: str, *, inbox: str,
                 collection: str | None = None, args: list[str] = (), ca: Path | None = None) -> None:
        self.relay = relay
        self.user = user
        self.home = tmp_path / f"alpine-home-{user}"
        (self.home / "mail").mkdir(parents=True)  # else: "Creating subdirectory ..."
        major, minor = _alpine_version()
        lines = [
            f"personal-name={user.title()}",
            "user-domain=example.test",
            f"inbox-path={inbox}",
            # alpine stores its version as major+4 ("2.26" -> "6.26"); with the
            # current one the greeting screen is not shown
            f"last-version-used={major + 4}.{minor}",
            "feature-list=quit-without-confirm,disable-password-file-saving,"
            "expunge-without-confirm,save-will-not-delete",
            # no pause of seconds for status messages ("SECURITY PROBLEM: insecure
            # server advertised AUTH=PLAIN" would hold the password prompt 3 s)
            "status-message-delay=-1",
        ]
        if collection:
            lines.append(f"folder-collections={collection}")
        self.pinerc = self.home / ".pinerc"
        self.pinerc.write_text("\n".join(lines) + "\n")
        # a unix socket path must stay short: not under pytest's tmp_path
        self._sockdir = Path(tempfile.mkdtemp(prefix="rp-tmux-"))
        self.socket = self._sockdir / "s"
        conf = self._sockdir / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g status off\n")
        env = ["HOME=" + str(self.home), "TERM=screen", "LANG=C.UTF-8", "TZ=UTC",
               "PATH=" + os.environ.get("PATH", "/usr/bin:/bin")]
        if ca is not None:
            env.append(f"SSL_CERT_FILE={ca}")  # the fleet's CA: only the name check fails
        # its exit status, written by a shell around it (tmux's #{pane_dead_status}
        # is not always set once the terminal is closed)
        self.status_path = self._sockdir / "status"
        argv = ["sh", "-c", f'env -i "$@"; echo $? > {shlex.quote(str(self.status_path))}', "sh",
                *env, "alpine", "-p", str(self.pinerc), *args]
        self.answered: list[tuple[str, str]] = []  # (what, detail) of every answered question
        self._waiting: set[str] = set()  # questions answered, still on the screen
        self._tmux("-f", str(conf), "new-session", "-d", "-s", "alpine",
                   "-x", str(COLS), "-y", str(ROWS), *argv)

    # ------------------------------------------------------------ tmux

    def _tmux(self, *args: str) -> str:
        r = subprocess.run(["tmux", "-S", str(self.socket), *args], capture_output=True,
                           text=True, timeout=10)
        if r.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {r.stderr}")
        return r.stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "alpine")

    def keys(self, *keys: str, literal: bool = False) -> None:
        self._tmux("send-keys", "-t", "alpine", *(["-l"] if literal else []), *keys)

    def close(self) -> None:
        try:
            subprocess.run(["tmux", "-S", str(self.socket), "kill-server"], capture_output=True,
                           timeout=10)
        finally:
            shutil.rmtree(self._sockdir, ignore_errors=True)

    # --------------------------------------------------------- screens

    def _answer(self, screen: str) -> None:
        """Answer the question on *screen*, if any, once."""
        lines = screen.splitlines()
        bottom = "\n".join(lines[-4:])
        on_screen = set()
        m = _PASSWORD_PROMPT.search(bottom)
        if m:
            prompt = bottom[m.start():].split("\n", 1)[0]
            if not prompt.rstrip().endswith("ENTER PASSWORD:"):
                return  # our answer is being typed: "ENTER PASSWORD: ******"
            host = f"{m['host']}:{m['port']}"
            # typed ahead, a password would go to whatever alpine asks next: type
            # it, see the asterisks, then Enter; an empty prompt is a new one
            # (c-client asks again after a failed login, same text)
            self.keys(PASSWORD, literal=True)
            self._wait_screen(lambda s: "ENTER PASSWORD: " + "*" * len(PASSWORD) in s,
                              "the password typed")
            self.keys("Enter")
            self.answered.append(("password", ("retry " if m["retry"] else "") + host))
        elif _CERT_TITLE in lines[0] and "Y Yes, continue" in bottom:
            on_screen.add("cert")
            if "cert" not in self._waiting:
                text = [ln.strip() for ln in lines if ln.strip()]
                intro = "There was a failure validating the SSL/TLS certificate for the server"
                host = text[text.index(intro) + 1] if intro in text else "?"
                reason = next((ln for ln in text if ln.endswith("(details)")), "")
                self.keys("y")
                self.answered.append(("certificate", f"{host}: {reason}"))
                self._waiting.add("cert")
        elif "doesn't exist.  Create?" in bottom:
            on_screen.add("create")
            if "create" not in self._waiting:
                question = next(ln.strip() for ln in lines[-4:] if "Create?" in ln)
                self.keys("y")
                self.answered.append(("create", question))
                self._waiting.add("create")
        self._waiting &= on_screen

    def _wait_screen(self, predicate, what: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"alpine: no {what} after {timeout}s\n{screen}")
            time.sleep(0.02)

    def expect(self, pattern: str, timeout: float = 30.0) -> str:
        """Wait until *pattern* (a regex) is on the screen, answering alpine's
        questions meanwhile; the screen where it was found."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if rx.search(screen):
                return screen
            if self.status_path.exists():
                raise AssertionError(f"alpine exited while waiting for {pattern!r}\n{screen}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} on the screen after {timeout}s; answered "
                                     f"{self.answered}\n--- screen ---\n{screen}\n--- wire ---\n"
                                     f"{self.relay.transcript()[-3000:]}")
            self._answer(screen)
            time.sleep(0.03)

    def quit(self, timeout: float = 30.0) -> str:
        """``q`` (quit-without-confirm): waits until alpine has exited; its last screen."""
        self.keys("q")
        deadline = time.monotonic() + timeout
        while not self.status_path.exists() or not self.status_path.read_text().endswith("\n"):
            if time.monotonic() > deadline:
                raise AssertionError(f"alpine did not quit\n{self.screen()}")
            time.sleep(0.03)
        status = self.status_path.read_text().strip()
        screen = self.screen()
        assert status == "0", f"alpine exit status {status!r}\n{screen.strip()}"
        return screen

    # ---------------------------------------------------------- commands

    def jump(self, n: int) -> None:
        """In the index: make message *n* the current one."""
        self.keys("j")
        self.expect("Message number to jump to")
        self.keys(str(n), "Enter")
        self._wait_screen(lambda s: f"Message {n} of " in s and "Message number to jump to" not in s,
                          f"message {n} current")

    def save(self, folder: str) -> None:
        """In the index: save (= copy, save-will-not-delete) the current message."""
        self.keys("s")
        self.expect(r"SAVE Msg #\d+ to folder")
        self.keys(folder, literal=True)
        self.keys("Enter")


_version: tuple[int, int] | None = None


def _alpine_version() -> tuple[int, int]:
    global _version
    if _version is None:
        out = subprocess.run(["alpine", "-v"], capture_output=True, text=True, timeout=10).stdout
        m = re.search(r"Alpine (\d+)\.(\d+)", out)
        assert m, out
        _version = int(m[1]), int(m[2])
    return _version


def spec(port: int, mailbox: str = "", user: str = "alice") -> str:
    """A c-client name for the proxy (through the relay on 127.0.0.1)."""
    return f"{{127.0.0.1:{port}/user={user}/norsh/notls}}{mailbox}"


@pytest.fixture
def run_alpine(tmp_path, fleet):
    """``run_alpine(relay, user, inbox=..., ...) -> Alpine``, closed at teardown."""
    started: list[Alpine] = []

    def start(relay, user="alice", **kw):
        kw.setdefault("ca", fleet.tls.ca_cert)
        a = Alpine(tmp_path, relay, user, **kw)
        started.append(a)
        return a

    yield start
    for a in started:
        a.close()


class LogWatch:
    """Logins a Dovecot backend logs from now on.  The proxy talks to the
    backends without TLS (``tls = "none"``), so a TLS login is alpine itself."""

    def __init__(self, backend) -> None:
        self.backend = backend
        self.offset = backend.log_path.stat().st_size if backend.log_path.exists() else 0

    def tls_logins(self, user: str, expected: int, timeout: float = 30.0) -> int:
        rx = re.compile(rf"Login: user=<{user}>, method=\S+, rip=\S+, lip={re.escape(self.backend.host)}, "
                        rf"mpid=\d+, TLS")
        deadline = time.monotonic() + timeout
        while True:
            with open(self.backend.log_path, "rb") as f:
                f.seek(self.offset)
                n = len(rx.findall(f.read().decode(errors="replace")))
            if n >= expected or time.monotonic() > deadline:
                return n
            time.sleep(0.05)


def _replies(relay: RecordingRelay, verb: bytes) -> list[tuple[bytes, bytes]]:
    """(command, tagged reply) of every *verb* command the proxy got."""
    out = []
    for c in relay.connections:
        for line in c.server_to_client.split(b"\r\n"):
            tag = line.split(b" ", 1)[0]
            cmd = c.command_for(tag) if tag not in (b"", b"*", b"+") else None
            if cmd and cmd.split(b" ")[1].upper() == verb:
                out.append((cmd.split(b" ", 1)[1], line.split(b" ", 1)[1]))
    return out


def _referral(backend, user: str, mailbox: str) -> bytes:
    return f"NO [REFERRAL imap://{user};AUTH=*@{backend.host}:{backend.port}/{mailbox}]".encode()


# ---------------------------------------------------------------- referrals


def test_alpine_follows_a_select_referral(proxy_factory, fleet, run_alpine):
    """referrals="always": opening {proxy}Shared/Projects gets the SELECT
    referral; alpine logs out of the proxy, opens the folder on b3 itself
    (STARTTLS) and shows its messages; a flag set there lands on b3."""
    msgs = [message(i, 700, subject=f"Projects note {i}") for i in range(3)]
    seed(fleet["b3"], "alice", "Shared/Projects", msgs)
    proxy = proxy_factory(rules=RULES, referrals="always")
    b3 = LogWatch(fleet["b3"])
    with RecordingRelay(proxy.host, proxy.port) as relay:
        alpine = run_alpine(relay, inbox=spec(relay.port, "INBOX"),
                            args=["-i", "-f", spec(relay.port, "Shared/Projects")])
        screen = alpine.expect(r"(?s)Message 3 of 3.*Projects note 2")
        assert all(f"Projects note {i}" in screen for i in range(3)), screen
        alpine.jump(2)
        alpine.keys("*")  # Flag ...?
        alpine.expect(r"Flag New, Deleted")
        alpine.keys("*")  # [Important]
        alpine.expect(r'(?m)Flagged message 2 "Important"|^\*\s+N?\s+2\s')  # status or index mark
        alpine.quit()
        assert relay.wait_closed()
    assert [(s.sha256, s.flags) for s in stored(fleet["b3"], "alice", "Shared/Projects")] == [
        (sha(msgs[0]), set()), (sha(msgs[1]), {"\\Flagged"}), (sha(msgs[2]), set())]
    assert _replies(relay, b"SELECT") == [
        (b"SELECT Shared/Projects", _referral(fleet["b3"], "alice", "Shared/Projects") + b" Remote mailbox")]
    verbs = [c.split(b" ")[1].upper() for c in relay.commands()]
    assert verbs == [b"AUTHENTICATE", b"ID", b"SELECT", b"LOGOUT"], relay.transcript()
    host3 = f"127.0.0.4:{fleet['b3'].port}"
    assert alpine.answered == [
        ("password", f"localhost:{relay.port}"),
        ("certificate", "127.0.0.4: Server name does not match certificate (details)"),
        ("password", host3)], alpine.answered
    assert b3.tls_logins("alice", 1) == 1


def test_alpine_follows_create_and_copy_referrals(proxy_factory, fleet, run_alpine):
    """referrals="always": INBOX (b1) opened through the proxy, message 2 saved
    to the new folder Shared/Kept (b3): CREATE and COPY are referred; alpine
    creates the folder on b3 itself, then reads the message through the proxy
    (BODY.PEEK[HEADER], [TEXT]) and APPENDs it on b3 itself."""
    msgs = [message(10 + i, 900) for i in range(2)]
    seed(fleet["b1"], "alice", "INBOX", msgs)
    proxy = proxy_factory(rules=RULES, referrals="always")
    b3 = LogWatch(fleet["b3"])
    with RecordingRelay(proxy.host, proxy.port) as relay:
        alpine = run_alpine(relay, inbox=spec(relay.port, "INBOX"), collection=spec(relay.port, "[]"),
                            args=["-i"])
        alpine.expect(r"message 11")
        alpine.jump(2)
        alpine.save("Shared/Kept")
        alpine.expect(SAVED)
        alpine.quit()
        assert relay.wait_closed()
    kept = stored(fleet["b3"], "alice", "Shared/Kept")
    assert [s.sha256 for s in kept] == [sha(msgs[1])], relay.transcript()
    assert b"Subject: message 11\r\n" in kept[0].body
    inbox = stored(fleet["b1"], "alice", "INBOX")
    assert [s.sha256 for s in inbox] == [sha(m) for m in msgs]
    assert kept[0].when == inbox[1].when  # APPEND with the INTERNALDATE it fetched
    assert "Shared/Kept" not in mailboxes(fleet["b1"], "alice")
    referral = _referral(fleet["b3"], "alice", "Shared/Kept") + b" Remote mailbox"
    assert _replies(relay, b"CREATE") == [(b"Create Shared/Kept", referral)]
    assert _replies(relay, b"COPY") == [(b"COPY 2 Shared/Kept", referral)]
    sent = [c.split(b" ", 1)[1] for c in relay.commands()]
    after = sent[sent.index(b"COPY 2 Shared/Kept") + 1:]
    assert after[:2] == [b"FETCH 2 BODY.PEEK[HEADER]", b"FETCH 2 BODY.PEEK[TEXT]"], sent
    assert set(after[2:]) <= {b"NOOP", b"LOGOUT"}, sent
    assert b'RLIST "" Shared/Kept' in sent and not any(c.startswith(b"APPEND") for c in sent)
    # one password (and one certificate question) for b3: the CREATE connection;
    # the APPEND connection after it reuses them
    assert alpine.answered == [
        ("password", f"localhost:{relay.port}"),
        ("create", 'Folder "Shared/Kept" doesn\'t exist.  Create?'),
        ("certificate", "127.0.0.4: Server name does not match certificate (details)"),
        ("password", f"127.0.0.4:{fleet['b3'].port}")], alpine.answered
    assert b3.tls_logins("alice", 2) == 2


def test_alpine_login_referral(proxy_factory, fleet, run_alpine):
    """RFC 2221: bob's home b2 refers its users at login with a tagged ``OK
    [REFERRAL ...]`` (the proxy would serve him too).  c-client follows it at
    once: it logs out of the proxy, logs in to b2 itself and opens INBOX there.
    (With the former ``NO [REFERRAL ...]`` it asked for the password three times.)"""
    msgs = [message(20 + i, 600, subject=f"Bob memo {i}") for i in range(2)]
    seed(fleet["b2"], "bob", "INBOX", msgs)
    proxy = proxy_factory({"proxy": {"login_referrals": True}, "backends": {"b2": {"login_referral": True}}},
                          rules=RULES)
    b2 = LogWatch(fleet["b2"])
    with RecordingRelay(proxy.host, proxy.port) as relay:
        alpine = run_alpine(relay, "bob", inbox=spec(relay.port, "INBOX", "bob"), args=["-i"])
        screen = alpine.expect(r"Bob memo 1")
        assert "Bob memo 0" in screen
        alpine.keys("*")
        alpine.expect(r"Flag New, Deleted")
        alpine.keys("*")
        alpine.expect(r'(?m)Flagged message \d "Important"|^\*\s+N?\s+\d\s')
        alpine.quit()
        assert relay.wait_closed()
    flagged = [s.sha256 for s in stored(fleet["b2"], "bob", "INBOX") if "\\Flagged" in s.flags]
    assert len(flagged) == 1 and flagged[0] in {sha(m) for m in msgs}
    referral = f"OK [REFERRAL imap://bob;AUTH=*@127.0.0.3:{fleet['b2'].port}/]".encode()
    replies = _replies(relay, b"AUTHENTICATE")
    assert len(replies) == 1 and all(r.startswith(referral) for _, r in replies), relay.transcript()
    assert [c.split(b" ")[1] for c in relay.commands()] == [b"AUTHENTICATE", b"LOGOUT"]
    assert alpine.answered == [
        ("password", f"localhost:{relay.port}"),
        ("certificate", "127.0.0.3: Server name does not match certificate (details)"),
        ("password", f"127.0.0.3:{fleet['b2'].port}")], alpine.answered
    assert b2.tls_logins("bob", 1) == 1


# ------------------------------------------------------- proxied sessions


def test_alpine_default_session_is_proxied_until_it_lists(proxy_factory, fleet, run_alpine):
    """referrals="aware" (the default): SELECT Shared/Projects is proxied to b3
    (alpine never listed yet).  Saving message 2 to the new Shared/Kept sends
    ``RLIST`` first: the session turns referral-aware, so the CREATE is
    referred (alpine creates it on b3 itself) while the COPY, from the selected
    b3 mailbox to a b3 one, is relayed (COPYUID)."""
    msgs = [message(i, 700, subject=f"Projects note {i}") for i in range(3)]
    seed(fleet["b3"], "alice", "Shared/Projects", msgs)
    proxy = proxy_factory(rules=RULES)
    b3 = LogWatch(fleet["b3"])
    with RecordingRelay(proxy.host, proxy.port) as relay:
        alpine = run_alpine(relay, inbox=spec(relay.port, "INBOX"), collection=spec(relay.port, "[]"),
                            args=["-i", "-f", spec(relay.port, "Shared/Projects")])
        screen = alpine.expect(r"Projects note 2")
        assert all(f"Projects note {i}" in screen for i in range(3)), screen
        assert [a[0] for a in alpine.answered] == ["password"]  # the proxy's only
        alpine.jump(2)
        alpine.save("Shared/Kept")
        alpine.expect(SAVED)
        alpine.quit()
        assert relay.wait_closed()
    assert [s.sha256 for s in stored(fleet["b3"], "alice", "Shared/Kept")] == [sha(msgs[1])]
    assert [s.sha256 for s in stored(fleet["b3"], "alice", "Shared/Projects")] == [sha(m) for m in msgs]
    assert not {"Shared/Kept", "Shared/Projects"} & mailboxes(fleet["b1"], "alice")
    assert [r.split(b" ")[0] for _, r in _replies(relay, b"SELECT")] == [b"OK"]
    sent = [c.split(b" ", 1)[1] for c in relay.commands()]
    assert sent.index(b"SELECT Shared/Projects") < sent.index(b'RLIST "" Shared/Kept'), sent
    assert _replies(relay, b"CREATE") == [
        (b"Create Shared/Kept", _referral(fleet["b3"], "alice", "Shared/Kept") + b" Remote mailbox")]
    [(_, copied)] = _replies(relay, b"COPY")
    assert copied.startswith(b"OK [COPYUID "), copied
    assert b3.tls_logins("alice", 1) == 1  # the CREATE


def test_alpine_transparent_session_copies_across_backends(proxy_factory, fleet, run_alpine):
    """referrals="never": the same save from INBOX (b1) to the new Shared/Kept
    (b3) is all proxied: RLIST answered like LIST, CREATE done on b3, and the
    COPY is the proxy's cross-server copy (COPYUID).  alpine connects to
    nothing but the proxy."""
    msgs = [message(10 + i, 900) for i in range(2)]
    seed(fleet["b1"], "alice", "INBOX", [msgs[0], (msgs[1], "\\Seen")])
    proxy = proxy_factory(rules=RULES, referrals="never")
    b3 = LogWatch(fleet["b3"])
    with RecordingRelay(proxy.host, proxy.port) as relay:
        alpine = run_alpine(relay, inbox=spec(relay.port, "INBOX"), collection=spec(relay.port, "[]"),
                            args=["-i"])
        alpine.expect(r"message 11")
        alpine.jump(2)
        alpine.save("Shared/Kept")
        alpine.expect(SAVED)
        alpine.quit()
        assert relay.wait_closed()
    assert [(s.sha256, s.flags) for s in stored(fleet["b3"], "alice", "Shared/Kept")] == [
        (sha(msgs[1]), {"\\Seen"})]
    assert "Shared/Kept" not in mailboxes(fleet["b1"], "alice")
    assert [r.split(b" ")[0] for _, r in _replies(relay, b"CREATE")] == [b"OK"]
    [(_, copied)] = _replies(relay, b"COPY")
    assert copied.startswith(b"OK [COPYUID "), copied
    assert b"[REFERRAL " not in relay.server_to_client
    # in "never" mode the proxy announces no MAILBOX-REFERRALS, so c-client lists with LIST
    sent = [c.split(b" ", 1)[1] for c in relay.commands()]
    assert b'LIST "" Shared/Kept' in sent and not any(c.startswith(b"RLIST") for c in sent)
    assert [a for a in alpine.answered if a[0] != "create"] == [("password", f"localhost:{relay.port}")]
    assert b3.tls_logins("alice", 0, timeout=0) == 0
