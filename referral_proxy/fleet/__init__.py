"""Run real, throwaway Dovecot instances on loopback addresses.

Used by the integration tests (``tests/conftest.py``), the benchmarks and the project's
``referral-proxy demo`` command.  Each :class:`Dovecot` writes a complete,
self-contained configuration under its own root directory (it never reads
``/etc/dovecot``), with its own ``base_dir``, ``state_dir``, log file, users
and maildirs, and runs ``dovecot -F -c <conf>`` as a child process.

Requirements: the ``dovecot`` binary (Debian package ``dovecot-imapd``), running
as root (the master binds ports and switches users), and the system users
``dovecot`` and ``dovenull`` that the package creates.  Dovecot's login
processes refuse to run as root, so logins run as ``dovenull``, the auth
process as ``dovecot``, and mail is owned by ``dovecot``: every directory on the
way to an instance root must therefore be world-traversable.  pytest's own
temporary directories are 0700; use :func:`make_root` (a 0755 directory made
with :func:`tempfile.mkdtemp`) for the instance roots instead.

Linux routes all of 127.0.0.0/8 to the loopback interface, so instances can
listen on 127.0.0.2, 127.0.0.3, ... with no network setup.
"""

from __future__ import annotations

import atexit
import imaplib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from .certs import TLSMaterial, make_tls_material
from .conf import INTERNAL_USER, LOGIN_USER, MAIL_USER, config_text
from .passwd import write_passwd
from .procs import cmdline, pdeathsig, process_group

__all__ = [
    "DEFAULT_USERS",
    "MASTER_USER",
    "MASTER_PASSWORD",
    "TLSMaterial",
    "make_tls_material",
    "make_root",
    "free_port",
    "dovecot_available",
    "DovecotError",
    "Dovecot",
    "Fleet",
]

#: Test users and their passwords.  dave's password has spaces, double quotes
#: and a backslash, to exercise quoting of LOGIN arguments.
DEFAULT_USERS: dict[str, str] = {
    "alice": "secret",
    "bob": "secret",
    "carol": "secret",
    "dave": 'p@ss "w0rd" \\x',
    "quota": "secret",
}

#: Per-user Dovecot userdb fields: "quota" has a 20 KB storage quota, to see
#: backends refuse an APPEND before its literal (RFC 3502's example).
USER_FIELDS: dict[str, str] = {"quota": "userdb_quota_rule=*:storage=20K"}

#: A Dovecot master user: SASL PLAIN with authzid=<user>, authcid=MASTER_USER
#: and MASTER_PASSWORD logs in as <user>.  (``LOGIN "<user>*proxy-master"
#: master-secret`` works too: the separator is ``*``.)
MASTER_USER = "proxy-master"
MASTER_PASSWORD = "master-secret"

DOVECOT_BINARY = "dovecot"

# Unix socket paths are limited to 108 bytes; Dovecot's longest names under
# base_dir are ~30 bytes ("login/imap-urlauth", "auth-master", "stats-writer"...).
_MAX_BASE_DIR_LEN = 70


class DovecotError(RuntimeError):
    """A Dovecot instance could not be started or used."""


# ------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on *host* right now (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def make_root(prefix: str = "rp-dovecot-") -> Path:
    """A new world-traversable (0755) temporary directory for instance roots."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


def dovecot_available() -> str | None:
    """None if Dovecot instances can run here, else the reason why not."""
    if shutil.which(DOVECOT_BINARY) is None:
        return "the dovecot binary is not installed (Debian package dovecot-imapd)"
    if os.geteuid() != 0:
        return "running real Dovecot instances needs root"
    for user in (MAIL_USER, LOGIN_USER, INTERNAL_USER):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"system user {user!r} is missing (it comes with the dovecot-core package)"
    return None


def _check_traversable(path: Path) -> None:
    """Raise if some directory from / to *path* is not world-traversable."""
    path = path.resolve()
    for d in [path, *path.parents]:
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            raise DovecotError(
                f"{d} is not world-traversable (mode {stat.filemode(mode)}); Dovecot's "
                f"unprivileged processes (users {MAIL_USER}/{LOGIN_USER}) could not reach "
                f"{path}. Put instance roots under a 0755 directory, e.g. "
                f"referral_proxy.fleet.make_root().")


def _check_conf_path(path: Path) -> None:
    if any(c in str(path) for c in ' \t\n"\'#{}$%\\<'):
        raise DovecotError(f"{path}: Dovecot instance paths must not contain spaces or "
                           f"any of \"'#{{}}$%\\<")


_live: set[Dovecot] = set()  # started and not stopped: stopped at exit


@atexit.register
def _stop_all() -> None:
    for d in list(_live):
        try:
            d.stop(timeout=5.0)
        except Exception:
            pass


# ------------------------------------------------------------------- Dovecot


class Dovecot:
    """One Dovecot instance listening on *host* (a loopback address).

    ``port`` is plain IMAP (with STARTTLS when *tls* is given); ``imaps_port``
    implicit TLS (None without *tls*).  Ports are chosen at construction and
    kept across stop()/kill()/start(), so endpoints stay valid after a restart.

    *die_with_parent*: the master gets SIGTERM if the thread that started it
    dies (PR_SET_PDEATHSIG), so an aborted test run leaves no Dovecot behind;
    pass False when starting from a short-lived thread.  *extra_config* is
    appended to the generated dovecot.conf.  *user_fields*: each user's userdb extra
    fields (``userdb_quota_rule=*:messages=5``; default USER_FIELDS), changed on a
    running instance by :meth:`set_user_fields` (read at each login).
    """

    def __init__(self, name: str, host: str, root: Path, *,
                 users: Mapping[str, str] = DEFAULT_USERS,
                 tls: TLSMaterial | None = None,
                 port: int | None = None, imaps_port: int | None = None,
                 die_with_parent: bool = True,
                 extra_config: str = "",
                 user_fields: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.host = host
        self.root = Path(root).absolute()
        self.users = dict(users)
        self.user_fields = dict(USER_FIELDS if user_fields is None else user_fields)
        self.tls = tls
        self.port = port if port is not None else free_port(host)
        self.imaps_port: int | None = None
        if tls is not None:
            self.imaps_port = imaps_port if imaps_port is not None else free_port(host)
            while self.imaps_port == self.port:
                self.imaps_port = free_port(host)
        self.die_with_parent = die_with_parent
        self.extra_config = extra_config
        self.process: subprocess.Popen | None = None
        self._lock = threading.Lock()

        self.conf_path = self.root / "dovecot.conf"
        self.log_path = self.root / "dovecot.log"
        self.stderr_path = self.root / "dovecot.stderr"
        self.mail_dir = self.root / "mail"
        self.home_dir = self.root / "home"
        self.state_dir = self.root / "state"
        self.passwd_path = self.root / "passwd"
        self.master_passwd_path = self.root / "master-passwd"
        base = self.root / "run"
        if len(str(base)) > _MAX_BASE_DIR_LEN:
            base = Path(tempfile.mkdtemp(prefix=f"rp-dc-{name}-"))
        self.base_dir = base

    # -- addresses

    @property
    def endpoint(self) -> str:
        """Twisted client endpoint string for the plain/STARTTLS port."""
        return f"tcp:host={self.host}:port={self.port}"

    @property
    def url(self) -> str:
        return f"imap://{self.host}:{self.port}"

    @property
    def imaps_endpoint(self) -> str | None:
        return None if self.imaps_port is None else f"tcp:host={self.host}:port={self.imaps_port}"

    @property
    def imaps_url(self) -> str | None:
        return None if self.imaps_port is None else f"imaps://{self.host}:{self.imaps_port}"

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Dovecot {self.name} {self.host}:{self.port} {state}>"

    # -- configuration

    def _prepare(self) -> None:
        _check_conf_path(self.root)
        _check_conf_path(self.base_dir)
        if self.tls is not None:
            _check_conf_path(self.tls.cert)
            _check_conf_path(self.tls.key)
        _check_traversable(self.root.parent)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o755)
        pw = pwd.getpwnam(MAIL_USER)
        for d in (self.mail_dir, self.home_dir):
            d.mkdir(exist_ok=True)
            os.chown(d, pw.pw_uid, pw.pw_gid)
            os.chmod(d, 0o755)
        self.state_dir.mkdir(exist_ok=True)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base_dir, 0o755)
        # passwd files are read by the auth process, which runs as `dovecot`
        write_passwd(self.passwd_path, self.users, self.user_fields)
        write_passwd(self.master_passwd_path, {MASTER_USER: MASTER_PASSWORD}, {})
        self.conf_path.write_text(config_text(self))

    def set_user_fields(self, user: str, fields: str) -> None:
        """*user*'s userdb extra fields from the next login on: passwd-file is read again when it
        changed, looked at once a second at most, so this returns when the next second began."""
        before = self.passwd_path.stat()
        self.user_fields[user] = fields
        write_passwd(self.passwd_path, self.users, self.user_fields)
        after = self.passwd_path.stat()
        if after.st_size == before.st_size and int(after.st_mtime) <= int(before.st_mtime):
            os.utime(self.passwd_path, (int(before.st_mtime) + 1, int(before.st_mtime) + 1))
        time.sleep(1.0 - time.time() % 1.0 + 0.05)

    # -- life cycle

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.running else None

    def start(self, timeout: float = 60.0) -> None:
        """Write the configuration, start Dovecot and wait for its greeting."""
        with self._lock:
            if self.running:
                return
            self._prepare()
            stderr = open(self.stderr_path, "ab")
            log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._stderr_offset = stderr.tell()
            try:
                self.process = subprocess.Popen(
                    [DOVECOT_BINARY, "-F", "-c", str(self.conf_path)],
                    stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr,
                    cwd=self.root, start_new_session=True,
                    preexec_fn=pdeathsig if self.die_with_parent else None,
                )
            finally:
                stderr.close()
            _live.add(self)
        try:
            self._wait_ready(timeout, log_offset)
        except BaseException:
            self.stop(timeout=5.0)
            raise

    def _wait_ready(self, timeout: float, log_offset: int) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        ports = [self.port] + ([self.imaps_port] if self.imaps_port else [])
        for port in ports:
            while True:
                if not self.running:
                    raise DovecotError(
                        f"Dovecot {self.name} exited with status {self.process.returncode} "
                        f"during start-up\n{self._diagnostics(log_offset)}")
                try:
                    if port == self.port:
                        self._greeting(port)
                    else:
                        with socket.create_connection((self.host, port), timeout=2.0):
                            pass
                    break
                except (OSError, DovecotError) as e:
                    last_error = e
                if time.monotonic() > deadline:
                    raise DovecotError(
                        f"Dovecot {self.name} did not accept IMAP connections on "
                        f"{self.host}:{port} within {timeout}s (last error: {last_error!r})\n"
                        f"{self._diagnostics(log_offset)}")
                time.sleep(0.05)

    def _greeting(self, port: int) -> None:
        with socket.create_connection((self.host, port), timeout=2.0) as s:
            s.settimeout(2.0)
            data = b""
            while b"\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            if not data.startswith(b"* OK"):
                raise DovecotError(f"unexpected greeting {data!r}")
            try:
                s.sendall(b"z LOGOUT\r\n")
            except OSError:
                pass

    def _diagnostics(self, log_offset: int = 0) -> str:
        parts = []
        try:
            with open(self.stderr_path, "rb") as f:
                f.seek(getattr(self, "_stderr_offset", 0))
                err = f.read().decode(errors="replace")[-4000:]
            if err.strip():
                parts.append(f"--- {self.stderr_path} (tail) ---\n{err}")
        except OSError:
            pass
        try:
            with open(self.log_path, "rb") as f:
                f.seek(log_offset)
                log = f.read().decode(errors="replace")[-6000:]
            parts.append(f"--- {self.log_path} (tail) ---\n{log}")
        except OSError:
            parts.append(f"--- no log at {self.log_path} ---")
        return "\n".join(parts)

    def _group(self) -> list[tuple[int, str, str]]:
        """(pid, comm, state) of the live processes of this instance: the master
        and every child it forked (they all stay in the master's process group)."""
        if self.process is None:
            return []
        return process_group(self.process.pid)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop Dovecot (SIGTERM, then SIGKILL after *timeout*) and wait until
        every one of its processes is gone. Idempotent."""
        with self._lock:
            proc = self.process
            if proc is None:
                return
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
            self._kill_group(proc, grace=5.0)
            _live.discard(self)

    def kill(self) -> None:
        """SIGKILL the master and all its children at once (fault injection);
        returns when they are gone (their ports are free again)."""
        with self._lock:
            proc = self.process
            if proc is None:
                return
            self._kill_group(proc, grace=0.0)
            _live.discard(self)

    @staticmethod
    def _kill_group(proc: subprocess.Popen, grace: float) -> None:
        """Wait up to *grace* seconds for the process group to be empty, then
        SIGKILL whatever is left and wait for that.  Orphaned zombies count as
        gone: they hold no sockets, and when they are reaped depends on the
        machine's init process."""
        pgid = proc.pid
        deadline = time.monotonic() + grace
        while process_group(pgid) and time.monotonic() < deadline:
            time.sleep(0.02)
        deadline = time.monotonic() + 10.0
        while True:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                try:
                    proc.wait(0.05)
                except subprocess.TimeoutExpired:
                    pass
            left = process_group(pgid)
            if not left and proc.poll() is not None:
                return
            if time.monotonic() > deadline:
                raise DovecotError(f"Dovecot processes would not die: {left}")
            time.sleep(0.02)

    def __enter__(self) -> Dovecot:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- use

    def password(self, user: str) -> str:
        return self.users[user]

    def client(self, user: str, *, timeout: float | None = 30.0) -> imaplib.IMAP4:
        """A new imaplib connection to this instance, logged in as *user*."""
        return self._logged_in(timeout, lambda conn: conn.login(user, self.users[user]))

    def master_client(self, user: str, *, timeout: float | None = 30.0) -> imaplib.IMAP4:
        """A new imaplib connection logged in as *user* through the master user
        (SASL PLAIN, authzid=user, authcid=MASTER_USER)."""
        token = f"{user}\0{MASTER_USER}\0{MASTER_PASSWORD}".encode()
        return self._logged_in(timeout, lambda conn: conn.authenticate("PLAIN", lambda _challenge: token))

    def _logged_in(self, timeout: float | None, login: Callable[[imaplib.IMAP4], object]) -> imaplib.IMAP4:
        """A new imaplib connection on which *login* succeeded (closed if it did not)."""
        conn = imaplib.IMAP4(self.host, self.port, timeout=timeout)
        try:
            login(conn)
        except BaseException:
            try:
                conn.shutdown()
            except OSError:
                pass
            raise
        return conn

    def user_mail_dir(self, user: str) -> Path:
        return self.mail_dir / user

    def sessions(self, user: str | None = None) -> list[int]:
        """Pids of the imap session processes of *user* (of anyone if None)."""
        found = []
        for pid, comm, _state in self._group():
            if comm != "imap":
                continue
            # verbose_proctitle: "dovecot-<instance>/imap [user ip command]"
            title = cmdline(pid)
            if user is None or f"[{user} " in title:
                found.append(pid)
        return found

    def reset_mail(self, user: str | None = None, *, wait: float = 3.0) -> None:
        """Delete *user*'s mail (every user's if None): mailboxes, subscriptions,
        indexes.  Safe while Dovecot runs.  Sessions of that user that are still
        closing are waited for (up to *wait* seconds), then killed, so that no
        imap process writes into the maildir while it is deleted."""
        deadline = time.monotonic() + wait
        while self.running:
            left = self.sessions(user)
            if not left:
                break
            if time.monotonic() > deadline:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                kill_deadline = time.monotonic() + 5.0
                while self.sessions(user) and time.monotonic() < kill_deadline:
                    time.sleep(0.02)
                break
            time.sleep(0.02)
        users: Iterable[str] = [user] if user is not None else list(self.users)
        for u in users:
            for d in (self.mail_dir / u, self.home_dir / u):
                shutil.rmtree(d, ignore_errors=True)
        if user is None:
            # also the mail of users not in self.users (e.g. made by hand)
            for parent in (self.mail_dir, self.home_dir):
                if parent.is_dir():
                    for d in parent.iterdir():
                        shutil.rmtree(d, ignore_errors=True)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


# ------------------------------------------------------------------- Fleet


class Fleet:
    """Several Dovecot instances sharing one TLS material (one CA, one server
    certificate valid for every instance's IP address)."""

    DEFAULT_NAMES_HOSTS = (("b1", "127.0.0.2"), ("b2", "127.0.0.3"), ("b3", "127.0.0.4"))

    def __init__(self, backends: Mapping[str, Dovecot], tls: TLSMaterial, root: Path) -> None:
        self.backends: dict[str, Dovecot] = dict(backends)
        self.tls = tls
        self.root = Path(root)

    @classmethod
    def create(cls, root: Path, names_hosts: Sequence[tuple[str, str]] = DEFAULT_NAMES_HOSTS,
               **dovecot_kw) -> Fleet:
        """Make the instances (not started)."""
        root = Path(root).absolute()
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        _check_traversable(root)
        hosts = list(dict.fromkeys(h for _, h in names_hosts))
        tls = make_tls_material(root / "tls", hosts)
        backends = {name: Dovecot(name, host, root / name, tls=tls, **dovecot_kw)
                    for name, host in names_hosts}
        return cls(backends, tls, root)

    @classmethod
    def start_default(cls, root: Path, names_hosts: Sequence[tuple[str, str]] = DEFAULT_NAMES_HOSTS,
                      **dovecot_kw) -> Fleet:
        """Make and start the instances (b1 on 127.0.0.2, b2 on .3, b3 on .4 by default)."""
        fleet = cls.create(root, names_hosts, **dovecot_kw)
        try:
            fleet.start()
        except BaseException:
            fleet.stop()
            raise
        return fleet

    def start(self, timeout: float = 60.0) -> None:
        for d in self.backends.values():
            d.start(timeout=timeout)

    def stop(self) -> None:
        """Stop every instance, in parallel (a graceful Dovecot shutdown takes ~1 s)."""
        errors: list[BaseException] = []

        def stop_one(d: Dovecot) -> None:
            try:
                d.stop()
            except BaseException as e:  # stop the others anyway
                errors.append(e)

        threads = [threading.Thread(target=stop_one, args=(d,), name=f"stop-{d.name}")
                   for d in self.backends.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    def reset_mail(self, user: str | None = None) -> None:
        for d in self.backends.values():
            d.reset_mail(user)

    def __getitem__(self, name: str) -> Dovecot:
        return self.backends[name]

    def __iter__(self):
        return iter(self.backends.values())

    def __len__(self) -> int:
        return len(self.backends)

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
