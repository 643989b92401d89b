r"""Drive ``cyradm`` (Debian ``cyrus-admin``), a real RFC 2193 referral-following
IMAP client, and record what it says on the wire.

What is here
============

* ``cyradm_available() -> str | None`` -- None when cyradm can be used, else why not.
* ``run_cyradm(host, port, user, password, commands, timeout=60, *, mechanism="PLAIN")
  -> CyradmResult(returncode, stdout, stderr)`` -- one cyradm process, the
  commands fed on its standard input, one per line.  ``result.outputs`` is the
  standard output of each command, ``result.errors`` the non-empty stderr lines,
  ``parse_lm(text)`` turns the output of ``lm`` into ``{name: attributes}``.
  ``quote(name)`` escapes a mailbox name for cyradm's shell-like parser.
* ``RecordingRelay(target_host, target_port, rewrite=None, *, rewrite_client=None)``
  -- a logging TCP relay (threads) to put between cyradm and a backend:
  ``.host``/``.port`` to connect to, ``.client_to_server`` / ``.server_to_client``
  (all bytes of every connection), ``.connections`` (each with its own bytes and
  ``.commands()``), ``.transcript()`` (``C: ``/``S: `` lines in order), ``.stop()``.
  ``rewrite(line, command) -> bytes | None`` may replace any server->client line
  (``command`` = the client's command line that a tagged line completes, else
  None); ``rewrite_client(line) -> bytes | None`` any client->server command line.
  Literal bodies are passed through untouched in both directions.
* ``ReferralRewriter(refer, capabilities=("MAILBOX-REFERRALS",))`` -- a pair of
  hooks (``.rewrite``, ``.rewrite_client``) that make a plain Dovecot look like an
  RFC 2193 server: the capabilities are added to every CAPABILITY it forwards,
  RLIST/RLSUB are sent on as LIST/LSUB, and a command for which
  ``refer(command_line)`` returns a response text (``b'NO [REFERRAL imap://...]
  Remote mailbox'``) never reaches the backend (it is replaced there by NOOP) and
  gets that answer instead.

What cyradm does (cyrus-admin 3.6.1, Debian bookworm), as recorded with the relay
=================================================================================

Invocation: ``cyradm --norc --user U -w PASSWORD --port P --auth PLAIN --notls HOST``
(``-w``/``--password`` exists but is not in ``--help``; without it cyradm asks on
/dev/tty).  No TTY needed: it reads commands from stdin and ends at EOF.  Before
reading each line it prints the prompt ``HOST> `` (no newline) on stdout, and once
more at EOF.  Its line editor is Term::ReadLine: with Term::ReadLine::Gnu (Debian
``libterm-readline-gnu-perl``, a Recommends that many desktops have) each command
line is echoed after its prompt (``HOST> lm\nINBOX ...``); with the Stub
(``PERL_RL=Stub``, or the module absent) it is not.  ``CyradmResult.outputs``
strips the echo when ``readline_implementation()`` says Gnu.
SASL is libsasl2 on the client side, no config file needed; the PLAIN mechanism
is libplain.so from libsasl2-modules.

Wire against Dovecot (``C:`` cyradm, ``S:`` server; tags are numbers from 1, on
every connection)::

    C: 1 CAPABILITY                  sent at once, WITHOUT waiting for the greeting
    S: * OK [CAPABILITY ...] Dovecot (Debian) ready.
    S: * CAPABILITY IMAP4rev1 SASL-IR LOGIN-REFERRALS ... AUTH=PLAIN AUTH=LOGIN
    S: 1 OK ...                      Admin->new: MAILBOX-REFERRALS, LIST-EXTENDED,
                                     SPECIAL-USE, METADATA... are read HERE ONLY
                                     (pre-login); never re-read after login
    C: 2 CAPABILITY                  authenticate: AUTH=, STARTTLS, LOGINDISABLED
    C: 3 AUTHENTICATE PLAIN          no SASL-IR even though it is announced
    S: +
    C: AGFsaWNlAHNlY3JldA==          base64("\0alice\0secret"), empty authzid
    S: 3 OK Logged in
    C: 4 RLIST "" ""                 ONLY if MAILBOX-REFERRALS was announced
    C: 5 LIST "" "*"                 lm          ("lm PAT REF": LIST REF "PAT")
    C: 6 LSUB "*" "*"                lm --subscribed (reference = pattern: a bug)
    C: 7 CREATE Foo                  cm Foo
    C: 8 DELETE Foo                  dm Foo: no SETACL first (that is for Cyrus
                                     admins); a name with * or % = LIST, then
                                     DELETE each (prints "Deleting mailbox X...OK.")
    (EOF on stdin: the socket is closed, no LOGOUT)

With MAILBOX-REFERRALS announced before login: ``RLIST "" ""`` right after the
tagged OK of the authentication; ``lm`` -> ``RLIST "" "*"``, ``lm --subscribed``
-> ``RLSUB "*" "*"``; if LIST-EXTENDED is ALSO announced before login, ``lm`` ->
``LIST (REMOTE) "" "*" RETURN (SUBSCRIBED)`` (``... RETURN (SUBSCRIBED
SPECIAL-USE)`` with SPECIAL-USE; ``lm --specialuse`` -> ``LIST (REMOTE SPECIAL-USE)
...``).  Dovecot announces LIST-EXTENDED only after login, so cyradm never uses
it there.  If ``RLIST "" ""`` is refused (Dovecot: ``4 BAD Error in IMAP command
RLIST: Unknown command``), Admin::authenticate fails: stderr ``cyradm: cannot
authenticate to server with PLAIN as alice``, exit status 255, no command run.
So a server announcing MAILBOX-REFERRALS MUST accept ``RLIST "" ""`` (and
``LIST (REMOTE) ...`` if it announces LIST-EXTENDED before login).

Strings: atoms when possible, "quoted" with blanks or ``%*(){``, and a
non-synchronizing literal ``{n+}`` (LITERAL+ assumed, announced or not) with
``"``, ``\``, CR/LF, 8-bit bytes or >= 1024 bytes -- the password of the LOGIN
fallback too.  Without a usable SASL PLAIN module (no libsasl2-modules, or
SASL_PATH elsewhere) cyradm silently falls back to ``LOGIN user password``;
``--auth LOGIN`` sends LOGIN directly.  Without ``--auth`` libsasl2 picks among
the server's AUTH= (PLAIN against Dovecot; CRAM-MD5/SCRAM... if offered).

Referrals, only when MAILBOX-REFERRALS was announced, and only in the tagged
answer (regexp ``^\[REFERRAL\s+([^\]\s]+)\]``: exactly ONE url -- a referral with
several urls (replicas) is NOT followed, it is printed as the error).  Followed
for CREATE (cm), DELETE (dm), SUBSCRIBE/UNSUBSCRIBE, SETACL (sam), DELETEACL
(dam), SETQUOTA, GETQUOTA (lq), GETQUOTAROOT (lqm), RECONSTRUCT, mboxcfg,
SETMETADATA, and RENAME with a PAIR of urls; NOT for LIST/RLIST, LSUB, GETACL
(lam), GETMETADATA; SELECT/STATUS/APPEND/COPY are never sent.  Following = a new
TCP connection to the url's host[:port] (143 when absent; ``([^:]+):(\d+)``, so
no IPv6), ``1 CAPABILITY``, ``2 CAPABILITY``, the SAME authentication as the first
connection (user, password, --auth mechanism, --notls: the user and ;AUTH= of the
url are ignored), ``4 CREATE <url mailbox>`` (DELETE, SUBSCRIBE... likewise; SETACL
and mboxcfg reuse the original name), then close (no LOGOUT).  The url's mailbox
is percent-decoded UTF-8 turned into modified UTF-7 (``/R%C3%A9sum%C3%A9`` ->
``CREATE R&AOk-sum&AOk-``; a raw ``&`` becomes ``&-``; ``%2F`` -> ``/``; no user
needed: ``imap://host:port/box`` works).  The referred server's referrals are
followed the same way with no loop detection: a referral pointing back at
itself makes cyradm open connections forever (~300/s).  An unreachable url:
stderr ``cyradm: cannot connect to HOST`` and the shell goes on.  The
answer shown is the referred server's, but Admin::createmailbox does not copy
its error: a failed referred CREATE prints ``createmailbox: `` + the PREVIOUS
error (stale).  RENAME: ``[REFERRAL old-url new-url]`` with both urls on the same
host:port -> ``RENAME old old new`` there (a bug: the new name goes in the
partition slot; Dovecot: ``NO [ALREADYEXISTS] Can't rename mailbox to itself``);
on two servers -> nothing sent, reported as SUCCESS (the error "Inter-server
referral.  Not implemented." only shows up as the stale text of a later failure).

Exit status: 0 at EOF whatever the commands did (``exit N`` gives N); 255 when it
cannot authenticate (die), 111 (ECONNREFUSED) when it cannot connect.  A failed
command prints ``createmailbox: <server text>`` (``deletemailbox:``,
``renamemailbox:``; ``lm``: the bare text) on stderr and the shell goes on.

Other gotchas: a line whose first word is not a built-in is run by /bin/sh, and
if that exec fails the forked child goes on as a SECOND shell reading the same
(buffered) stdin on the same IMAP connection, so every later command runs
twice (run_cyradm refuses non-built-ins).  ``; < > & $ \ " '`` are
metacharacters of cyradm's parser and ``$VAR``/``\`` work even inside quotes
(``&`` is in modified UTF-7 names): use ``quote()``.  ``lm`` prints names in
columns sized by $COLUMNS (run_cyradm sets COLUMNS=1: one per line) and shows
attributes only when the server sent some (``RETURN (SUBSCRIBED)`` gets ``()``).
~/.cyradmrc.pl and /etc/cyradmrc.pl are run unless --norc.  Installing
cyrus-admin pulls in cyrus-common (and an MTA, exim4) but starts no daemon here.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from referral_proxy.imap.framing import announced_literal

__all__ = [
    "CYRADM",
    "CyradmResult",
    "CyradmTimeout",
    "RecordingRelay",
    "RelayConnection",
    "ReferralRewriter",
    "cyradm_available",
    "parse_lm",
    "quote",
    "readline_implementation",
    "run_cyradm",
    "sasl_plain_available",
]

CYRADM = "cyradm"

#: cyradm's built-in commands (Cyrus::IMAP::Shell %builtins, 3.6); anything else
#: would be handed to /bin/sh.
BUILTINS = frozenset("""
    exit quit help ? lam listacl listaclmailbox lm listmailbox server servername
    connect authenticate auth login listquota lq listquotaroot lqr lqm disconnect
    disc chdir cd createmailbox create cm deleteaclmailbox deleteacl dam
    deletemailbox delete dm getmetadata getmd info mboxcfg mboxconfig reconstruct
    renamemailbox rename renm setaclmailbox setacl sam setinfo setmetadata setmd
    setquota sq version ver xfermailbox xfer subscribe sub unsubscribe unsub
""".split())

_SPECIAL = set(" \t&<>;'\"$\\|")


def quote(word: str) -> str:
    """*word* escaped for cyradm's command parser (a backslash before every
    blank and metacharacter: ``& < > ; ' " $ \\``; quotes would not stop ``$``
    and ``\\`` from being interpreted)."""
    return "".join("\\" + c if c in _SPECIAL else c for c in word)


def cyradm_available() -> str | None:
    """None when cyradm can be run here, else the reason why not."""
    path = shutil.which(CYRADM)
    if path is None:
        return "cyradm not found (Debian package cyrus-admin)"
    try:
        proc = subprocess.run([path, "--version"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"cyradm --version failed: {e}"
    if proc.returncode != 0 or b"Cyrus IMAP" not in proc.stdout:
        return (f"cyradm --version failed (status {proc.returncode}): "
                f"{(proc.stdout + proc.stderr).decode(errors='replace')[-500:]}")
    if not sasl_plain_available():
        return ("no SASL PLAIN module for cyradm (Debian package libsasl2-modules): "
                "it would fall back to LOGIN")
    return None


def sasl_plain_available() -> bool:
    """True when libsasl2 has its PLAIN client module (libsasl2-modules)."""
    dirs = [os.environ["SASL_PATH"]] if os.environ.get("SASL_PATH") else []
    dirs += glob.glob("/usr/lib/*/sasl2") + ["/usr/lib/sasl2"]
    return any(glob.glob(os.path.join(d, "libplain.so*")) for d in dirs)


class CyradmTimeout(AssertionError):
    pass


@dataclass
class CyradmResult:
    returncode: int
    stdout: str
    stderr: str
    argv: Sequence[str] = ()
    commands: Sequence[str] = ()
    #: cyradm's line editor: "Term::ReadLine::Gnu" echoes each command line after
    #: its prompt on stdout; "Term::ReadLine::Stub" does not.
    readline: str = "Term::ReadLine::Stub"

    @property
    def prompt(self) -> str | None:
        """The prompt cyradm printed (``"127.0.0.2> "``), None if it printed none."""
        m = re.match(r"(\S+> )", self.stdout)
        return m.group(1) if m else None

    @property
    def outputs(self) -> list[str]:
        """What each input line printed on stdout, in order (the text between
        two prompts), without the echo of the command that Term::ReadLine::Gnu
        prints after the prompt (so a mailbox named like the command is kept)."""
        p = self.prompt
        if p is None:
            return []
        chunks = self.stdout.split(p)[1:-1]
        if self.readline != "Term::ReadLine::Gnu":
            return chunks
        out = []
        for i, chunk in enumerate(chunks):
            echo = (self.commands[i] if i < len(self.commands) else "") + "\n"
            if not chunk.startswith(echo):
                raise AssertionError(f"cyradm with {self.readline} did not echo command {i} "
                                     f"({echo!r}) before its output {chunk[:200]!r}")
            out.append(chunk[len(echo):])
        return out

    @property
    def errors(self) -> list[str]:
        """The non-empty lines of stderr (cyradm reports failed commands there)."""
        return [line for line in self.stderr.splitlines() if line.strip()]

    def __str__(self) -> str:
        return (f"cyradm exited {self.returncode}\n--- stdout ---\n{self.stdout}"
                f"\n--- stderr ---\n{self.stderr}")


def run_cyradm(host: str, port: int, user: str, password: str, commands: Iterable[str],
               timeout: float = 60, *, mechanism: str | None = "PLAIN", notls: bool = True,
               extra_args: Sequence[str] = (), env: dict[str, str] | None = None) -> CyradmResult:
    """Run ``cyradm`` against host:port, logged in as *user*, with *commands*
    (one cyradm command each, e.g. ``"lm"``, ``f"cm {quote(name)}"``) on its stdin.

    Commands that are not cyradm built-ins raise ValueError (cyradm would run
    them with /bin/sh).  More than *timeout* seconds raises CyradmTimeout with
    what was printed so far."""
    commands = list(commands)
    for command in commands:
        if "\n" in command or "\r" in command:
            raise ValueError(f"one command per item, no line breaks: {command!r}")
        for part in re.split(r"(?<!\\);", command):
            words = part.split()
            if words and words[0] not in BUILTINS:
                raise ValueError(f"not a cyradm built-in command: {words[0]!r} in {command!r}")
    argv = [CYRADM, "--norc", "--user", user, "-w", password, "--port", str(port)]
    if mechanism:
        argv += ["--auth", mechanism]
    if notls:
        argv.append("--notls")
    argv += [*extra_args, host]
    with tempfile.TemporaryDirectory(prefix="cyradm-home-") as home:
        child_env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": home,            # no ~/.cyradmrc.pl, no readline history
            "USER": user,
            "LOGNAME": user,
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "COLUMNS": "1",          # lm: one mailbox per line
        }
        if os.environ.get("PERL_RL"):  # PERL_RL=Stub pytest ...: the other line editor
            child_env["PERL_RL"] = os.environ["PERL_RL"]
        if env:
            child_env.update(env)
        stdin = "".join(c + "\n" for c in commands)
        try:
            proc = subprocess.run(argv, input=stdin.encode(), capture_output=True,
                                  timeout=timeout, env=child_env, cwd=home)
        except subprocess.TimeoutExpired as e:
            out = (e.stdout or b"").decode(errors="replace")
            err = (e.stderr or b"").decode(errors="replace")
            raise CyradmTimeout(f"cyradm did not finish within {timeout}s: {argv[:3]}... "
                                f"{host}:{port}\n--- stdout ---\n{out}\n--- stderr ---\n{err}") from None
    return CyradmResult(proc.returncode, proc.stdout.decode(errors="replace"),
                        proc.stderr.decode(errors="replace"), argv, commands,
                        readline_implementation(child_env))


_readline_cache: dict[str | None, str] = {}


def readline_implementation(env: dict[str, str] | None = None) -> str:
    """The Term::ReadLine implementation cyradm gets in *env*: "Term::ReadLine::Gnu"
    (Debian libterm-readline-gnu-perl installed, and PERL_RL not set otherwise) or
    "Term::ReadLine::Stub" (``PERL_RL=Stub``, or the module absent)."""
    key = (env or {}).get("PERL_RL")
    if key not in _readline_cache:
        child_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TERM": "dumb"}
        if key is not None:
            child_env["PERL_RL"] = key
        proc = subprocess.run(["perl", "-MTerm::ReadLine", "-e", 'print Term::ReadLine->new("rp")->ReadLine'],
                              stdin=subprocess.DEVNULL, capture_output=True, env=child_env, timeout=30)
        _readline_cache[key] = proc.stdout.decode(errors="replace").strip() or "Term::ReadLine::Stub"
    return _readline_cache[key]


_LM_LINE = re.compile(r"^(?P<name>.*?)(?: \((?P<attrs>[^()]*)\))?(?: \((?P<ext>.*)\))?$")


def parse_lm(text: str) -> dict[str, str]:
    """``{mailbox: attributes}`` from what ``lm`` printed (run with COLUMNS=1, as
    run_cyradm does: one ``name (attrs)`` per line; attrs "" when there were none)."""
    found: dict[str, str] = {}
    for line in text.splitlines():
        line = line.rstrip()
        if not line:
            continue
        m = _LM_LINE.match(line)
        assert m is not None
        found[m.group("name")] = m.group("attrs") or ""
    return found


# ------------------------------------------------------------------ the relay


Rewrite = Callable[[bytes, "bytes | None"], "bytes | None"]
RewriteClient = Callable[[bytes], "bytes | None"]

_COMMAND = re.compile(rb"^([^\s(){%*\"\\\]+]+) ([A-Za-z][A-Za-z0-9-]*)")


class RelayConnection:
    """One client connection through the relay and its backend connection."""

    def __init__(self, relay: RecordingRelay, client: socket.socket, server: socket.socket,
                 number: int) -> None:
        self.relay = relay
        self.number = number
        self.client = client
        self.server = server
        self.events: list[tuple[float, str, bytes]] = []  # (time, "C"/"S", bytes)
        self._commands: dict[bytes, bytes] = {}  # tag -> first line as the client sent it
        self._command_lines: list[bytes] = []
        self._lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._pump, args=(client, server, "C"),
                             name=f"relay-{relay.port}-{number}-c2s", daemon=True),
            threading.Thread(target=self._pump, args=(server, client, "S"),
                             name=f"relay-{relay.port}-{number}-s2c", daemon=True),
        ]
        for t in self.threads:
            t.start()

    def _bytes(self, direction: str) -> bytes:
        with self._lock:
            return b"".join(data for _, d, data in self.events if d == direction)

    @property
    def client_to_server(self) -> bytes:
        """What the client sent (before rewrite_client)."""
        return self._bytes("C")

    @property
    def server_to_client(self) -> bytes:
        """What the client received (after rewrite)."""
        return self._bytes("S")

    def commands(self) -> list[bytes]:
        """The first line (CRLF stripped) of every command the client sent, in order."""
        with self._lock:
            return list(self._command_lines)

    def command_for(self, tag: bytes) -> bytes | None:
        with self._lock:
            return self._commands.get(tag)

    def _record(self, direction: str, data: bytes) -> None:
        if data:
            with self._lock:
                self.events.append((time.monotonic(), direction, data))

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        buf = b""
        literal_left = 0
        continuation = False  # the next client line continues a command (after a literal)
        try:
            while True:
                try:
                    chunk = src.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    if buf:
                        self._record(direction, buf)
                        dst.sendall(buf)
                    break
                buf += chunk
                out = []
                while buf:
                    if literal_left:
                        part, buf = buf[:literal_left], buf[literal_left:]
                        literal_left -= len(part)
                        self._record(direction, part)
                        out.append(part)
                        continue
                    nl = buf.find(b"\n")
                    if nl < 0:
                        break
                    line, buf = buf[:nl + 1], buf[nl + 1:]
                    literal = announced_literal(line)  # the codec's reading of {n} / {n+}
                    if direction == "C":  # recorded as the client sent it
                        self._record(direction, line)
                        new = self._client_line(line, continuation)
                        continuation = literal is not None
                    else:  # recorded as the client received it
                        new = self._server_line(line)
                        self._record(direction, new)
                    if literal is not None:
                        literal_left = literal.size
                    out.append(new)
                if out:
                    dst.sendall(b"".join(out))
        except OSError:
            pass
        finally:
            try:
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _client_line(self, line: bytes, continuation: bool) -> bytes:
        if continuation:
            return line
        m = _COMMAND.match(line)
        if m is None:  # e.g. a SASL response line
            return line
        with self._lock:
            self._commands[m.group(1)] = line.rstrip(b"\r\n")
            self._command_lines.append(line.rstrip(b"\r\n"))
        hook = self.relay.rewrite_client
        if hook is not None:
            new = hook(line)
            if new is not None:
                return new
        return line

    def _server_line(self, line: bytes) -> bytes:
        hook = self.relay.rewrite
        if hook is None:
            return line
        command = None
        tag = line.split(b" ", 1)[0]
        if tag not in (b"*", b"+"):
            command = self.command_for(tag)
        new = hook(line, command)
        if new is None:
            return line
        self.relay._record_rewrite(self, line, new)
        return new

    def close(self) -> None:
        for s in (self.client, self.server):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self.threads:
            t.join(5)


class RecordingRelay:
    """A TCP relay on 127.0.0.1 (a free port) to *target_host*:*target_port*
    that records both directions of every connection and may rewrite lines.

    ``rewrite(line, command) -> bytes | None``: called with every line the
    server sends (CRLF included; not with literal bodies); ``command`` is the
    client's command line (CRLF stripped) that a tagged line completes, None
    for ``*`` and ``+`` lines.  Return the bytes to send instead (any number of
    CRLF-terminated lines, or b"" to drop it), or None to forward it as is.
    ``rewrite_client(line) -> bytes | None``: the same for the first line of
    every client command (not for SASL responses, nor for the part of a command
    after a literal).  ``client_to_server`` is recorded before
    ``rewrite_client``, ``server_to_client`` after ``rewrite``."""

    def __init__(self, target_host: str, target_port: int, rewrite: Rewrite | None = None, *,
                 rewrite_client: RewriteClient | None = None, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.rewrite = rewrite
        self.rewrite_client = rewrite_client
        self.connections: list[RelayConnection] = []
        self.rewrites: list[tuple[int, bytes, bytes]] = []  # (connection number, old, new)
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._stopped = False
        self.listener = socket.create_server((listen_host, 0))
        self.listener.settimeout(0.2)  # the accept loop checks _stopped this often
        self.host, self.port = self.listener.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept_loop, name=f"relay-{self.port}",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"imap://{self.host}:{self.port}"

    def _accept_loop(self) -> None:
        while not self._stopped:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._stopped:
                client.close()
                return
            client.settimeout(None)
            try:
                server = socket.create_connection(self.target, timeout=10)
                server.settimeout(None)
            except OSError as e:
                self.errors.append(e)
                client.close()
                continue
            for s in (client, server):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                conn = RelayConnection(self, client, server, len(self.connections) + 1)
                self.connections.append(conn)

    def _record_rewrite(self, conn: RelayConnection, old: bytes, new: bytes) -> None:
        with self._lock:
            self.rewrites.append((conn.number, old, new))

    @property
    def client_to_server(self) -> bytes:
        """Every byte clients sent, connection after connection."""
        return b"".join(c.client_to_server for c in list(self.connections))

    @property
    def server_to_client(self) -> bytes:
        """Every byte clients received (after rewrite), connection after connection."""
        return b"".join(c.server_to_client for c in list(self.connections))

    def commands(self) -> list[bytes]:
        """Every client command line (first line, no CRLF), connection after connection."""
        return [cmd for c in list(self.connections) for cmd in c.commands()]

    def transcript(self) -> str:
        """Both directions in order, one ``#n C: `` / ``#n S: `` line per line
        (#n = connection number), for reports and docstrings."""
        events = sorted((t, c.number, d, data) for c in list(self.connections)
                        for t, d, data in c.events)
        out = []
        for _, number, direction, data in events:
            for line in data.splitlines():
                out.append(f"#{number} {direction}: {line.decode('utf-8', 'replace')}")
        return "\n".join(out)

    def wait_closed(self, timeout: float = 30.0) -> bool:
        """True once every connection so far has ended in both directions."""
        deadline = time.monotonic() + timeout
        for c in list(self.connections):
            for t in c.threads:
                t.join(max(0.0, deadline - time.monotonic()))
        return all(not t.is_alive() for c in self.connections for t in c.threads)

    def stop(self) -> None:
        """Stop listening and close every connection.  Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        for close in (lambda: self.listener.shutdown(socket.SHUT_RDWR), self.listener.close):
            try:
                close()  # shutdown() wakes a blocked accept() on Linux
            except OSError:
                pass
        self._thread.join(5)
        for c in list(self.connections):
            c.close()

    def __enter__(self) -> RecordingRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# --------------------------------------------- a plain backend as an RFC 2193 server


class ReferralRewriter:
    """Hooks for RecordingRelay that make a backend without MAILBOX-REFERRALS
    look like an RFC 2193 server, for clients that follow referrals::

        rw = ReferralRewriter(lambda line: b"NO [REFERRAL imap://...] Remote"
                              if line.split()[1:2] == [b"CREATE"] else None)
        relay = RecordingRelay(host, port, rw.rewrite, rewrite_client=rw.rewrite_client)

    * *capabilities* are appended to every ``* CAPABILITY`` line and every
      ``[CAPABILITY ...]`` response code the backend sends;
    * ``RLIST``/``RLSUB`` are sent on as ``LIST``/``LSUB`` (an RFC 2193 server
      answers them with ``* LIST``/``* LSUB`` too);
    * when ``refer(command_line)`` returns response text for a command (e.g.
      ``b"NO [REFERRAL imap://alice;AUTH=*@127.0.0.3:1143/Foo] Remote mailbox"``),
      the backend gets ``tag NOOP`` instead of it (so it changes nothing there)
      and the client gets ``tag <that text>`` as the command's answer (never
      for a command with a literal: cyradm sends ``{n+}`` for names with ``"``,
      a backslash or 8-bit bytes).  ``.referred`` lists the command lines
      answered so.
    """

    def __init__(self, refer: Callable[[bytes], bytes | None] = lambda line: None,
                 capabilities: Iterable[str | bytes] = ("MAILBOX-REFERRALS",)) -> None:
        self.refer = refer
        self.capabilities = [c.encode() if isinstance(c, str) else c for c in capabilities]
        self.referred: list[bytes] = []
        self._answers: dict[bytes, bytes] = {}
        self._lock = threading.Lock()

    def _add_caps(self, caps: bytes) -> bytes:
        have = {c.upper() for c in caps.split()}
        extra = [c for c in self.capabilities if c.upper() not in have]
        return b" ".join([caps, *extra]) if extra else caps

    def rewrite_client(self, line: bytes) -> bytes | None:
        stripped = line.rstrip(b"\r\n")
        parts = stripped.split(b" ", 2)
        if len(parts) < 2:
            return None
        tag, name = parts[0], parts[1].upper()
        # a command with a literal cannot be swapped for a NOOP: never referred
        answer = None if announced_literal(line) is not None else self.refer(stripped)
        if answer is not None:
            with self._lock:
                self._answers[tag] = answer
                self.referred.append(stripped)
            return tag + b" NOOP\r\n"
        if name in (b"RLIST", b"RLSUB"):
            return b" ".join([tag, name[1:], *parts[2:]]) + line[len(stripped):]
        return None

    def rewrite(self, line: bytes, command: bytes | None) -> bytes | None:
        tag = line.split(b" ", 1)[0]
        with self._lock:
            answer = self._answers.pop(tag, None) if command is not None else None
        if answer is not None:
            return tag + b" " + answer + b"\r\n"
        if not self.capabilities:
            return None
        body = line.rstrip(b"\r\n")
        m = re.match(rb"^\* CAPABILITY (.*)$", body, re.I)
        if m:
            return b"* CAPABILITY " + self._add_caps(m.group(1)) + b"\r\n"
        m = re.search(rb"\[CAPABILITY ([^\]]*)\]", body, re.I)
        if m:
            return (body[:m.start(1)] + self._add_caps(m.group(1)) + body[m.end(1):]
                    + b"\r\n")
        return None
