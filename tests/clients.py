r"""Helpers to drive real, third-party IMAP clients from Debian through the proxy
(tests/test_clients_*.py) and to check what they did on the backends themselves.

What is here
============

* ``require_program(program, package)`` -- the path of *program*; skips the test
  when it is missing, FAILS under CI (env ``CI`` set), like the cyradm tests.
  ``needs(program, package)`` -- the same as a module-level autouse fixture.
* ``RULES`` -- the map of these tests: alice's home on b1, bob's on b2, every
  user's ``Shared/*`` on b3.
* ``message(i, size)`` -- a distinct RFC 5322 message (CRLF), ``sha(data)``.
* ``stored(backend, user, mailbox)`` -- ``[Stored(uid, flags, when, sha256, body)]``
  of every message, fetched straight from a Dovecot backend (``\Recent`` dropped);
  ``mailboxes(backend, user)`` -- the names a backend has; ``seed(...)`` --
  messages appended directly on a backend.
* ``Mbox`` -- writes a Berkeley mbox the way c-client reads it, and knows what
  c-client will append from it (bodies, flags, internal dates).
* ``write_maildir`` / ``read_maildir`` -- Maildir++ folders with flags in file names.
* ``Unprivileged`` -- a home directory and ``run(argv, input=...)`` as the user
  ``nobody`` when we are root (UW c-client refuses local mailboxes as root).
* ``run(argv, ...)`` -- a subprocess (clean environment, TZ=UTC, no terminal) with
  a timeout, its output kept for assertion messages (``Result``); ``start`` /
  ``finish`` -- the same for several at once; ``run_in_pty(argv, ...)`` -- on a
  pseudo-terminal (mutt is a curses program and will not start without one).
* ``appenduids(server_bytes)`` / ``uid_count(uid_set)`` -- the APPENDUID codes a
  client received (e.g. ``RecordingRelay`` bytes, ``mailutil -v`` output).
* ``RecordingRelay`` (from tests/cyradm.py) -- a logging TCP relay to see a
  client's exact commands.
"""

from __future__ import annotations

import datetime
import hashlib
import itertools
import os
import pty
import pwd
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cyradm import RecordingRelay

__all__ = [
    "RULES", "RecordingRelay", "Mbox", "MboxMessage", "Result", "Stored", "Unprivileged",
    "appenduids", "finish", "internaldate", "mailboxes", "maildir_flags", "message", "needs",
    "read_maildir", "require_program", "run", "run_in_pty", "seed", "sha", "start", "stored",
    "uid_count", "without_header", "write_maildir",
]

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"user": "bob", "mailbox": "*", "backend": "b2"}]


# ------------------------------------------------------------- availability


def require_program(program: str, package: str) -> str:
    path = shutil.which(program)
    if path is None:
        reason = f"{program} not found (Debian package {package})"
        if os.environ.get("CI"):
            pytest.fail(f"{program} needed in CI: {reason}")
        pytest.skip(reason)
    return path


def needs(program: str, package: str):
    """A module-scoped autouse fixture: skip the module without *program*
    (fail under CI)."""
    @pytest.fixture(scope="module", autouse=True)
    def _needs_program():
        return require_program(program, package)
    return _needs_program


# ------------------------------------------------------------------ messages


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def message(i: int, size: int = 400, *, subject: str | None = None, sender: str | None = None) -> bytes:
    """Message *i*: distinct headers and body, about *size* bytes, CRLF line ends,
    no line starting with "From " (safe in an mbox without escaping)."""
    subject = subject if subject is not None else f"message {i}"
    sender = sender if sender is not None else f"sender{i}@example.test"
    head = (f"From: {sender}\r\nTo: alice@example.test\r\nSubject: {subject}\r\n"
            f"Message-ID: <m{i}.{size}@example.test>\r\n"
            f"Date: Mon, 5 Jan 2026 10:{i // 60 % 60:02d}:{i % 60:02d} +0000\r\n\r\n").encode()
    line = f"line {{}} of message {i}: the quick brown fox jumps over the lazy dog\r\n"
    body = []
    n = 0
    while len(head) + sum(map(len, body)) < size:
        body.append(line.format(n).encode())
        n += 1
    return head + b"".join(body or [b"\r\n"])


@dataclass
class Stored:
    uid: int
    flags: frozenset[str]
    when: int  # INTERNALDATE, seconds since the epoch
    sha256: str
    body: bytes = field(repr=False)


def stored(backend, user: str, mailbox: str) -> list[Stored]:
    """Every message of *mailbox* as the backend itself has it, in UID order.
    Fails if the mailbox does not exist there."""
    with backend.client(user) as m:
        typ, data = m.select(_quote(mailbox), readonly=True)
        assert typ == "OK", f"{backend.name}: SELECT {mailbox} as {user}: {typ} {data}"
        if data == [b"0"]:
            return []
        typ, data = m.uid("FETCH", "1:*", "(UID FLAGS INTERNALDATE BODY.PEEK[])")
        assert typ == "OK", data
    out = []
    for item in data:
        if isinstance(item, tuple):
            meta, body = item
            uid = int(re.search(rb"UID (\d+)", meta).group(1))
            flags = re.search(rb"FLAGS \(([^)]*)\)", meta).group(1).decode().split()
            date = re.search(rb'INTERNALDATE "([^"]+)"', meta).group(1).decode()
            out.append(Stored(uid, frozenset(f for f in flags if f != "\\Recent"),
                              internaldate(date), sha(body), body))
    return sorted(out, key=lambda s: s.uid)


def internaldate(text: str) -> int:
    """An IMAP date-time ("05-Jan-2026 10:00:00 +0000", " 5-Jan-...") as epoch seconds."""
    return int(datetime.datetime.strptime(text.strip(), "%d-%b-%Y %H:%M:%S %z").timestamp())


def mailboxes(backend, user: str) -> set[str]:
    """The mailbox names *backend* has for *user* (selectable or not)."""
    with backend.client(user) as m:
        typ, data = m.list('""', "*")
    assert typ == "OK", data
    names = set()
    for line in data:
        if not line:
            continue
        if isinstance(line, tuple):  # a name sent as a literal
            names.add(line[1].decode())
            continue
        name = line.rsplit(b' "/" ', 1)[1]
        names.add(name.strip(b'"').decode())
    return names


def seed(backend, user: str, mailbox: str, messages: Iterable[bytes | tuple[bytes, str]],
         *, create: bool = True) -> None:
    """Append *messages* (bytes, or (bytes, "\\Flag ...")) straight to a backend."""
    with backend.client(user) as m:
        if create and mailbox.upper() != "INBOX":
            typ, data = m.create(_quote(mailbox))
            assert typ == "OK", data
        for item in messages:
            body, flags = (item, None) if isinstance(item, bytes) else item
            typ, data = m.append(_quote(mailbox), f"({flags})" if flags else None, None, body)
            assert typ == "OK", data


def _quote(name: str) -> str:
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def appenduids(server_bytes: bytes) -> list[bytes]:
    """The uid-sets of every APPENDUID response code in *server_bytes*."""
    return re.findall(rb"\[APPENDUID \d+ ([0-9:,]+)\]", server_bytes)


def uid_count(uid_set: bytes) -> int:
    n = 0
    for part in uid_set.split(b","):
        lo, _, hi = part.partition(b":")
        n += abs(int(hi or lo) - int(lo)) + 1
    return n


# ---------------------------------------------------------------------- mbox


_MBOX_FLAGS = {"R": "\\Seen", "A": "\\Answered", "F": "\\Flagged", "D": "\\Deleted", "T": "\\Draft"}


@dataclass
class MboxMessage:
    body: bytes  # CRLF, as the IMAP server will store it
    flags: frozenset[str]
    when: int  # INTERNALDATE (epoch seconds), from the "From " line (UTC)


class Mbox:
    """A Berkeley mbox as UW c-client reads it: "From sender date" separators,
    LF line ends, flags in "Status:" (R) and "X-Status:" (A F D T) headers, which
    c-client turns into IMAP flags and strips from the text it appends."""

    def __init__(self) -> None:
        self.messages: list[MboxMessage] = []
        self._chunks: list[bytes] = []

    def add(self, body: bytes, flags: str = "", *, when: int = 1767607200) -> None:
        """*body* with CRLF line ends; *flags* letters among R A F D T."""
        t = time.gmtime(when)
        # ctime(3) format, as c-client expects it: "Mon Jan  5 10:00:00 2026"
        from_line = f"{time.strftime('%a %b', t)} {t.tm_mday:2d} {time.strftime('%H:%M:%S %Y', t)}"
        head, _, text = body.partition(b"\r\n\r\n")
        status = "".join(c for c in flags if c == "R") + "O"
        xstatus = "".join(c for c in flags if c in "AFDT")
        extra = f"Status: {status}\r\n".encode()
        if xstatus:
            extra += f"X-Status: {xstatus}\r\n".encode()
        raw = head + b"\r\n" + extra + b"\r\n" + text
        assert not re.search(rb"(^|\n)From ", raw), "an mbox message may not have a line starting with 'From '"
        self._chunks.append(b"From sender@example.test " + from_line.encode() + b"\n"
                            + raw.replace(b"\r\n", b"\n") + b"\n")
        self.messages.append(MboxMessage(body, frozenset(_MBOX_FLAGS[c] for c in flags),
                                         when))

    def write(self, path: Path) -> Path:
        path.write_bytes(b"".join(self._chunks))
        return path


# ------------------------------------------------------------------- Maildir


_maildir_names = itertools.count()
_MAILDIR_FLAGS = {"D": "\\Draft", "F": "\\Flagged", "R": "\\Answered", "S": "\\Seen", "T": "\\Deleted"}


def maildir_flags(letters: str) -> frozenset[str]:
    return frozenset(_MAILDIR_FLAGS[c] for c in letters if c in _MAILDIR_FLAGS)


def write_maildir(root: Path, folder: str, messages: Sequence[tuple[bytes, str]],
                  *, sep: str = "/", old: bool = True) -> Path:
    """A Maildir folder *root*/*folder* (subfolders as directories when *sep* is
    "/", Maildir++ ".a.b" when it is ".") holding *messages* = (body, flag letters);
    bodies are written with LF line ends, as Maildir clients keep them.  With
    *old*, the directories' times are set 10 s back (mbsync otherwise sleeps
    a second: it refuses to trust a directory modified within the last second)."""
    d = root / folder if sep == "/" else root / ("." + folder.replace("/", "."))
    for sub in ("cur", "new", "tmp"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    for _i, (body, flags) in enumerate(messages):
        n = next(_maildir_names)  # unique names, also when a folder is written twice
        name = f"{1700000000 + n}.M{n}P{os.getpid()}.test:2,{''.join(sorted(flags))}"
        (d / "cur" / name).write_bytes(body.replace(b"\r\n", b"\n"))
    if old:
        past = time.time() - 10
        for sub in ("cur", "new", "tmp", ""):
            os.utime(d / sub if sub else d, (past, past))
    return d


def read_maildir(folder: Path) -> list[tuple[bytes, frozenset[str]]]:
    """(body with CRLF line ends, flags) of every message in a Maildir folder."""
    out = []
    for sub in ("new", "cur"):
        p = folder / sub
        if not p.is_dir():
            continue
        for f in sorted(p.iterdir()):
            flags = f.name.rsplit(":2,", 1)[1] if ":2," in f.name else ""
            data = f.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            out.append((data, maildir_flags(flags)))
    return out


def without_header(body: bytes, name: bytes) -> bytes:
    """*body* without every header field called *name* (e.g. mbsync's X-TUID)."""
    head, sep, text = body.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    kept = [line for line in lines if not line.lower().startswith(name.lower() + b":")]
    return b"\r\n".join(kept) + sep + text


# ----------------------------------------------------------------- processes


@dataclass
class Result:
    argv: list[str]
    returncode: int
    stdout: bytes
    stderr: bytes
    seconds: float

    @property
    def output(self) -> str:
        return (self.stdout + self.stderr).decode("utf-8", "replace")

    def __str__(self) -> str:
        return (f"$ {' '.join(self.argv)}\n-> status {self.returncode} in {self.seconds:.2f}s\n"
                f"--- stdout ---\n{self.stdout.decode('utf-8', 'replace')[-4000:]}\n"
                f"--- stderr ---\n{self.stderr.decode('utf-8', 'replace')[-4000:]}")


def _clean_env(env: Mapping[str, str] | None) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k in ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "SASL_PATH")}
    base.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
    base["TZ"] = "UTC"
    if env:
        base.update(env)
    return base


def run(argv: Sequence[str], *, input: bytes | None = None, env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike | None = None, timeout: float = 60.0) -> Result:
    """Run *argv* with a clean environment (TZ=UTC, no PYTHONPATH) and no terminal."""
    t0 = time.monotonic()
    proc = subprocess.run(list(argv), input=input if input is not None else b"",
                          capture_output=True, env=_clean_env(env), cwd=cwd, timeout=timeout)
    return Result(list(argv), proc.returncode, proc.stdout, proc.stderr, time.monotonic() - t0)


def start(argv: Sequence[str], *, input: bytes = b"", env: Mapping[str, str] | None = None,
          cwd: str | os.PathLike | None = None) -> subprocess.Popen:
    """Start *argv* in the background with *input* already written to its stdin
    (small: a password or two); collect it with ``finish``."""
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=_clean_env(env), cwd=cwd)
    if input:
        proc.stdin.write(input)
        proc.stdin.flush()
    return proc


def finish(proc: subprocess.Popen, argv: Sequence[str], *, timeout: float = 60.0,
           t0: float | None = None) -> Result:
    """Wait for a process made by ``start`` (its stdin is closed now)."""
    t0 = time.monotonic() if t0 is None else t0
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"timeout after {timeout}s: {' '.join(argv)}\n{out[-2000:]!r}\n{err[-2000:]!r}") from None
    return Result(list(argv), proc.returncode, out, err, time.monotonic() - t0)


def run_in_pty(argv: Sequence[str], *, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike | None = None, timeout: float = 60.0,
               rows: int = 40, cols: int = 120) -> Result:
    """Run *argv* on a new pseudo-terminal (TERM=vt100, *rows* x *cols*), reading
    everything it draws until it exits; ``stdout`` is the raw screen output."""
    import fcntl
    import struct
    import termios

    full_env = _clean_env({"TERM": "vt100", "LINES": str(rows), "COLUMNS": str(cols), **(env or {})})
    t0 = time.monotonic()
    pid, fd = pty.fork()
    if pid == 0:  # the child: never return into pytest
        try:
            if cwd is not None:
                os.chdir(cwd)
            os.execvpe(argv[0], list(argv), full_env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    out = bytearray()
    status = None
    deadline = t0 + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise AssertionError(f"timeout after {timeout}s: {' '.join(argv)}\n"
                                     f"--- screen ---\n{bytes(out[-3000:]).decode('utf-8', 'replace')}")
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the child closed the terminal
                    data = b""
                if data:
                    out += data
                    continue
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                # what is still buffered on the terminal
                while select.select([fd], [], [], 0.05)[0]:
                    try:
                        data = os.read(fd, 65536)
                    except OSError:
                        break
                    if not data:
                        break
                    out += data
                break
    finally:
        os.close(fd)
    code = os.waitstatus_to_exitcode(status) if status is not None else -1
    return Result(list(argv), code, bytes(out), b"", time.monotonic() - t0)


class Unprivileged:
    """Run programs as ``nobody`` (when we are root), with a private home.

    UW c-client (mailutil) refuses to open local mailboxes as root, and, as
    Debian builds it, accepts local mailbox names only relative to $HOME (an
    absolute path gets "no such mailbox"); so the mbox files are written into
    ``self.home`` and named relative to it."""

    def __init__(self, user: str = "nobody") -> None:
        self.home = Path(tempfile.mkdtemp(prefix="rp-clients-"))
        self.as_root = os.geteuid() == 0
        if self.as_root:
            pw = pwd.getpwnam(user)
            self.uid, self.gid = pw.pw_uid, pw.pw_gid
            os.chmod(self.home, 0o755)
        else:
            self.uid, self.gid = os.getuid(), os.getgid()

    def own(self) -> None:
        """Give everything under the home to the unprivileged user."""
        if self.as_root:
            for dirpath, _dirnames, filenames in os.walk(self.home):
                os.chown(dirpath, self.uid, self.gid)
                for n in filenames:
                    os.chown(os.path.join(dirpath, n), self.uid, self.gid)

    def argv(self, argv: Sequence[str]) -> list[str]:
        if not self.as_root:
            return list(argv)
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups", "--", *argv]

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"HOME": str(self.home), "USER": "nobody", "LOGNAME": "nobody", **(extra or {})}

    def run(self, argv: Sequence[str], *, input: bytes | None = None, timeout: float = 60.0,
            env: Mapping[str, str] | None = None) -> Result:
        self.own()
        return run(self.argv(argv), input=input, env=self.env(env), cwd=self.home, timeout=timeout)

    def start(self, argv: Sequence[str], *, input: bytes = b"",
              env: Mapping[str, str] | None = None) -> subprocess.Popen:
        self.own()
        return start(self.argv(argv), input=input, env=self.env(env), cwd=self.home)

    def cleanup(self) -> None:
        shutil.rmtree(self.home, ignore_errors=True)
