#!/usr/bin/env python3
"""A session-level fuzzer: mutated valid IMAP sessions against the real proxy in front of
real Dovecot.

Each stream is a valid session of one template (before login, LOGIN or AUTHENTICATE,
authenticated and selected commands, IDLE, APPEND and MULTIAPPEND with synchronizing and
LITERAL+ literals, literals in every position, COPY/MOVE/RENAME to another backend,
everything pipelined), a few mutations of its bytes (a byte flipped, bytes or a token
inserted, a range deleted or doubled) and a random split of the bytes into writes. After
it the client finishes whatever the stream left open (the rest of an announced literal,
a line too long for anything), sends a sentinel ``ZZZZ NOOP`` and waits: the sentinel
must be answered, or the session end with a clean ``* BYE``. A stream that gets neither
within the patience is a hang; a ``[SERVERBUG]`` answer or a traceback in the proxy's log
is a crash; a line that is no IMAP response is a forged one (client bytes with a CR or LF
echoed); the proxy's resident memory is read every so many streams. A census of the
backends (each Dovecot asked directly) finds mailboxes made where the map does not put
them (a command smuggled past the routing).

Every stream is a function of (seed, index): ``--seed S --only I`` replays one.

    python tests/sessionfuzz.py --seed 1 --streams 20000 --minutes 30 --workers 8
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

from referral_proxy.imap.command import ParseError  # noqa: E402
from referral_proxy.imap.framing import NEED_DATA, Framer, Line  # noqa: E402
from referral_proxy.imap.response import parse_response_start  # noqa: E402

USER, PASSWORD = "carol", "secret"
# The fuzzing proxy's client limits: small, so that any literal a stream leaves open can be
# finished by the client (FILLER) and any line outgrown.
LIMITS = {"max_line": 8192, "max_literal": 4096, "max_command": 65536, "max_literals": 64, "max_message": 16384,
          "max_append_messages": 8, "login_penalty": 0, "max_connections_per_user": 10_000,
          "max_unauthenticated_per_ip": 10_000, "max_connections_per_ip": 10_000, "login_timeout": 30}
RULES = [{"user": USER, "mailbox": "Far*", "backend": "b2"}]
FILLER = b"x" * (LIMITS["max_message"] + 16) + b"\r\n"  # more than any literal the proxy accepts or a line
DRAIN_BUDGET = 1 << 20  # a literal left open by more than this is not finished (the stream is not judged)
SENTINEL = b"ZZZZ"

MESSAGE = (b"From: fuzz@example.test\r\nTo: carol@example.test\r\nSubject: fuzz %d\r\n"
           b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n\r\nbody %d\r\n")


# -- valid sessions ------------------------------------------------------------------------


class Script:
    """Builds one valid session's bytes: commands with tags, literals sync or LITERAL+."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.parts: list[bytes] = []
        self.n = 0

    def tag(self) -> bytes:
        self.n += 1
        return b"t%d" % self.n

    def lit(self, data: bytes) -> bytes:
        """*data* as a literal (sync or non-sync) that ends its fragment."""
        return b"{%d%s}\r\n" % (len(data), b"+" if self.rng.random() < 0.6 else b"") + data

    def astring(self, data: bytes) -> bytes:
        r = self.rng.random()
        if r < 0.4:
            return data
        if r < 0.75:
            return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        return self.lit(data)

    def cmd(self, text: bytes) -> None:
        self.parts.append(self.tag() + b" " + text + b"\r\n")

    def raw(self, data: bytes) -> None:
        self.parts.append(data)

    def login(self) -> None:
        r = self.rng.random()
        if r < 0.6:
            self.cmd(b"LOGIN " + self.astring(USER.encode()) + b" " + self.astring(PASSWORD.encode()))
        elif r < 0.8:
            import base64
            blob = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode())
            self.cmd(b"AUTHENTICATE PLAIN " + blob)
        else:
            import base64
            self.cmd(b"AUTHENTICATE PLAIN")
            self.raw(base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()) + b"\r\n")

    def message(self) -> bytes:
        i = self.rng.randrange(1000)
        return MESSAGE % (i, i)

    def bytes(self) -> bytes:
        return b"".join(self.parts)

    def mark(self) -> None:
        """Mutations mostly fall after this point (a session must log in to reach the rest)."""
        self.protect = sum(len(p) for p in self.parts)

    protect = 0


def _pre_login(s: Script) -> None:
    rng = s.rng
    for _ in range(rng.randrange(1, 5)):
        rng.choice([
            lambda: s.cmd(b"CAPABILITY"),
            lambda: s.cmd(b"NOOP"),
            lambda: s.cmd(b'ID ("name" ' + s.astring(b"fuzz client") + b' "version" "1")'),
            lambda: s.cmd(b"ID NIL"),
            lambda: s.cmd(b"STARTTLS"),
            lambda: s.cmd(b"LOGIN " + s.astring(b"nobody") + b" " + s.astring(b"wrong")),
            lambda: s.cmd(b"SELECT INBOX"),
        ])()


def _authenticated(s: Script) -> None:
    rng = s.rng
    box = rng.choice([b"Fz", b"Fz/a", b"Far", b"Far/b", b"INBOX", b"Fz b", b"Caf&AOk-"])
    for _ in range(rng.randrange(1, 6)):
        rng.choice([
            lambda: s.cmd(b"LIST " + s.astring(b"") + b" " + s.astring(rng.choice([b"*", b"%", b"Fz*", b"F%"]))),
            lambda: s.cmd(b'LSUB "" "*"'),
            lambda: s.cmd(b'RLIST "" "Fa*"'),
            lambda: s.cmd(b'LIST (SUBSCRIBED) "" "*" RETURN (CHILDREN STATUS (MESSAGES))'),
            lambda: s.cmd(b"CREATE " + s.astring(box)),
            lambda: s.cmd(b"SUBSCRIBE " + s.astring(box)),
            lambda: s.cmd(b"STATUS " + s.astring(box) + b" (MESSAGES UIDNEXT UNSEEN)"),
            lambda: s.cmd(b"NAMESPACE"),
            lambda: s.cmd(b"ENABLE CONDSTORE"),
            lambda: s.cmd(b"GETQUOTAROOT " + s.astring(b"INBOX")),
            lambda: s.cmd(b"MYRIGHTS " + s.astring(box)),
            lambda: s.cmd(b"GETMETADATA " + s.astring(box) + b" /private/comment"),
            lambda: _append(s, box),
            lambda: _append(s, box),
            lambda: s.cmd(b"ID NIL"),
            lambda: s.cmd(b"NOOP"),
        ])()


def _append(s: Script, box: bytes) -> None:
    rng = s.rng
    out = b"APPEND " + s.astring(box)
    for _ in range(1 if rng.random() < 0.6 else rng.randrange(2, 4)):
        if rng.random() < 0.5:
            out += b" (" + b" ".join(rng.sample([b"\\Seen", b"\\Flagged", b"$Fuzz", b"\\Draft"], 2)) + b")"
        if rng.random() < 0.3:
            out += b' "07-Feb-1994 21:52:25 -0800"'
        out += b" " + s.lit(s.message())
    s.cmd(out)


def _selected(s: Script) -> None:
    rng = s.rng
    box = rng.choice([b"INBOX", b"Fz", b"Far"])
    s.cmd(rng.choice([b"SELECT ", b"EXAMINE "]) + s.astring(box) + (b" (CONDSTORE)" if rng.random() < 0.2 else b""))
    for _ in range(rng.randrange(1, 7)):
        rng.choice([
            lambda: s.cmd(b"FETCH 1:3 (FLAGS UID RFC822.SIZE)"),
            lambda: s.cmd(b"UID FETCH 1:* (FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])"),
            lambda: s.cmd(b"FETCH 1 BODY.PEEK[]"),
            lambda: s.cmd(b"STORE 1 +FLAGS (\\Seen $Fuzz)"),
            lambda: s.cmd(b"UID STORE 1:* -FLAGS.SILENT ($Fuzz)"),
            lambda: s.cmd(b"SEARCH CHARSET UTF-8 SUBJECT " + s.astring(b"fuzz")),
            lambda: s.cmd(b"UID SEARCH RETURN (MIN MAX COUNT) ALL"),
            lambda: s.cmd(b"SEARCH OR SEEN (FLAGGED) BODY " + s.lit(b"body\r\n")),
            lambda: s.cmd(b"SORT (DATE) UTF-8 ALL"),
            lambda: s.cmd(b"COPY 1 " + s.astring(rng.choice([b"Fz", b"Far", b"Fz/a"]))),
            lambda: s.cmd(b"UID MOVE 1 " + s.astring(rng.choice([b"Fz", b"Far"]))),
            lambda: s.cmd(b"CHECK"),
            lambda: _idle(s),
            lambda: _idle(s),
            lambda: s.cmd(b"EXPUNGE"),
            lambda: _append(s, box),
        ])()
    s.cmd(rng.choice([b"UNSELECT", b"CLOSE", b"NOOP"]))


def _idle(s: Script) -> None:
    s.cmd(b"IDLE")
    s.raw(b"DONE\r\n")


def _rename(s: Script) -> None:
    rng = s.rng
    a, b = rng.sample([b"Fz/x", b"Fz/y", b"Far/x", b"Far/z"], 2)
    s.cmd(b"CREATE " + s.astring(a))
    s.cmd(b"RENAME " + s.astring(a) + b" " + s.astring(b))
    s.cmd(b"DELETE " + s.astring(b))


def build(rng: random.Random) -> tuple[bytes, int]:
    """One valid session (whose end may be LOGOUT, or nothing), and where its login ends."""
    s = Script(rng)
    shape = rng.random()
    _pre_login(s) if rng.random() < 0.5 else None
    if shape < 0.1:
        _pre_login(s)  # never logs in
    else:
        s.login()
        s.mark()
        for _ in range(rng.randrange(1, 4)):
            r = rng.random()
            if r < 0.4:
                _authenticated(s)
            elif r < 0.9:
                _selected(s)
            else:
                _rename(s)
    if rng.random() < 0.3:
        s.cmd(b"LOGOUT")
    return s.bytes(), s.protect


# -- mutations -----------------------------------------------------------------------------------

INTERESTING = [b"{", b"}", b'"', b"\\", b"\r", b"\n", b"(", b")", b" ", b"+", b"*", b"%", b"\0", b"\xff", b"~",
               b"0", b"1", b"9", b"[", b"]", b"\x7f", b"\xe9"]
TOKENS = [b"{5}\r\n", b"{0+}\r\n", b"{3+}\r\nabc", b"~{4+}\r\n\0\0\0\0", b"\r\n", b'"', b"DONE\r\n", b"x IDLE\r\n",
          b"y APPEND INBOX {5+}\r\nhello\r\n", b"z NOOP\r\n", b" {1}\r\n", b"w CREATE {4+}\r\nFz/q\r\n", b"((((",
          b"))", b"\r\nq LOGOUT\r\n", b"u AUTHENTICATE PLAIN\r\n", b"v SELECT INBOX\r\n", b"\\Seen", b"NIL",
          b"s UID FETCH 1:* BODY[]\r\n", b"{18446744073709551615}\r\n", b"{4096+}\r\n", b"%", b"*",
          # issue 10's smuggling attempts: a census after the run finds what got past the routing
          b"n NOOP {4+}\r\n\r\nS1 CREATE Far/Ghost\r\n", b'c CREATE "F\\ar/Ghost"\r\n',
          b"c CREATE {28}\r\nEvil\r\nX9 CREATE Far/Injected\r\n", b'c CREATE ""\r\n', b"d DONE\r\n"]


def mutate(data: bytes, rng: random.Random, protect: int = 0) -> bytes:
    """1 to 4 mutations, most of them after *protect* (the login) when there is one."""
    b = bytearray(data)
    for _ in range(rng.randrange(1, 5)):
        op = rng.random()
        low = protect if protect < len(b) and rng.random() < 0.85 else 0
        pos = rng.randrange(low, len(b) + 1)
        if op < 0.3 and b:
            pos = min(pos, len(b) - 1)
            b[pos] = rng.choice(INTERESTING)[0] if rng.random() < 0.7 else rng.randrange(256)
        elif op < 0.55:
            b[pos:pos] = rng.choice(TOKENS) if rng.random() < 0.7 else rng.choice(INTERESTING)
        elif op < 0.8 and b:
            del b[pos:pos + rng.randrange(1, 17)]
        elif b:
            k = rng.randrange(1, 33)
            b[pos:pos] = b[max(0, pos - k):pos]
    return bytes(b)


def split(data: bytes, rng: random.Random) -> list[bytes]:
    """Writes as a client makes them: all at once, a few pieces, or byte runs."""
    r = rng.random()
    if r < 0.4 or len(data) < 2:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randrange(1, 12))))
    return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)])]


def open_literal(data: bytes) -> int:
    """Bytes of a literal *data* leaves unfinished, as a server that takes every literal reads it
    (one that refuses a synchronizing literal expects none of them: the filler covers both)."""
    framer = Framer(1 << 30, auto_accept=True)
    framer.receive_data(data)
    while framer.next_event() is not NEED_DATA:
        pass
    return framer.literal_remaining


# -- running streams ------------------------------------------------------------------------------


@dataclass
class Outcome:
    index: int
    verdict: str  # answered | bye | hang | unclean-close | serverbug | backend-serverbug | malformed | skipped
    detail: str = ""


@dataclass
class Stats:
    streams: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)
    failures: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, outcome: Outcome) -> None:
        with self.lock:
            self.streams += 1
            self.verdicts[outcome.verdict] = self.verdicts.get(outcome.verdict, 0) + 1
            if outcome.verdict in ("hang", "unclean-close", "serverbug", "malformed"):
                self.failures.append(outcome)


def stream_bytes(seed: int, index: int) -> tuple[bytes, list[bytes]]:
    rng = random.Random(f"{seed}:{index}")
    data = _mutated(rng)
    return data, split(data, rng)


def _mutated(rng: random.Random) -> bytes:
    data, protect = build(rng)
    return mutate(data, rng, protect)


def run_stream(host: str, port: int, seed: int, index: int, patience: float = 20.0) -> Outcome:
    data, writes = stream_bytes(seed, index)
    with socket.create_connection((host, port), timeout=patience) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client = "%s:%d" % sock.getsockname()[:2]  # as the proxy's log names it
        received = bytearray()
        done = threading.Event()

        def reader() -> None:
            try:
                while not done.is_set():
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received.extend(chunk)
                    if _answered(bytes(received[-4096:])):
                        break
            except OSError:
                pass
            done.set()

        t = threading.Thread(target=reader, daemon=True)
        t.start()
        try:
            for w in writes:
                sock.sendall(w)
            left = open_literal(data)
            if left > DRAIN_BUDGET:
                done.set()
                return Outcome(index, "skipped", f"a literal of {left} bytes left open")
            sock.sendall(b"x" * left + FILLER + SENTINEL + b" NOOP\r\n")
        except OSError:
            pass  # the proxy closed: judged by what it said
        t.join(patience)
        hung = t.is_alive()
        done.set()
    text = bytes(received)
    if any(own in text for own in (b"[SERVERBUG] Internal proxy error", b"[SERVERBUG] The staged")):  # the proxy's
        return Outcome(index, "serverbug", f"client={client} " + _excerpt(text, b"[SERVERBUG]"))
    if b"[SERVERBUG]" in text:  # Dovecot's, relayed (seen: DELETE Far/x while 7 other streams of carol
        # CREATE, RENAME and DELETE it: "Internal error occurred"): what a direct client gets; bounded by the test
        return Outcome(index, "backend-serverbug", f"client={client} " + _excerpt(text, b"[SERVERBUG]"))
    bad = malformed(text)
    if bad is not None:
        return Outcome(index, "malformed", f"client={client} {bad!r}")
    if _answered(text):
        return Outcome(index, "answered")
    if hung:  # still open, the sentinel unanswered (a BYE that does not close is no BYE)
        return Outcome(index, "hang", f"client={client} " + _tail(text))
    if b"\r\n* BYE " in b"\r\n" + text:
        return Outcome(index, "bye")
    return Outcome(index, "unclean-close", f"client={client} " + _tail(text))


def malformed(text: bytes) -> bytes | None:
    """The first response line the client got that is no IMAP response (a tagged line whose
    second word is no status, a tag with characters a tag cannot hold, a bare line): what a
    client's bytes echoed with a CR or LF into the proxy's text would forge. None if all are."""
    framer = Framer(1 << 30, auto_accept=True)
    framer.receive_data(text)
    first = True  # the next Line is the first fragment of a response
    while (ev := framer.next_event()) is not NEED_DATA:
        if isinstance(ev, Line):
            if first:
                try:
                    parse_response_start(ev.data)
                except ParseError:
                    return ev.data[:200]
            first = ev.literal is None
    return None


def _answered(text: bytes) -> bool:
    return (b"\r\n" + SENTINEL + b" OK") in text or (b"\r\n" + SENTINEL + b" BAD") in text \
        or (b"\r\n" + SENTINEL + b" NO") in text


def _excerpt(text: bytes, needle: bytes) -> str:
    i = text.find(needle)
    return text[max(0, i - 200):i + 200].decode("latin-1")


def _tail(text: bytes) -> str:
    return text[-300:].decode("latin-1")


def census(fleet) -> dict[str, set[bytes]]:
    """The fuzzing user's mailboxes on each backend, asked of each Dovecot directly."""
    out = {}
    for name, d in fleet.backends.items():
        m = d.client(USER)
        try:
            typ, data = m.list('""', "*")
            assert typ == "OK", data
            out[name] = {_list_name(line) for line in data if line}
        finally:
            m.logout()
    return out


def _list_name(line) -> bytes:
    if isinstance(line, tuple):  # a literal name: (b'(\\HasNoChildren) "/" {5}', b'a"b c')
        return line[1]
    name = line.split(b") ", 1)[1].split(b" ", 1)[1]
    return name[1:-1].replace(b'\\"', b'"').replace(b"\\\\", b"\\") if name.startswith(b'"') else name


def misplaced(before: dict[str, set[bytes]], after: dict[str, set[bytes]]) -> list[str]:
    """Mailboxes made where the map does not put them: the map gives Far* to b2, the rest to
    b1 (so a new one on b3, a Far* one on b1 or another one on b2 got past the routing)."""
    out = []
    for backend, names in after.items():
        for name in sorted(names - before.get(backend, set())):
            far = name.startswith(b"Far")
            if backend == "b3" or (backend == "b1" and far) or (backend == "b2" and not far):
                out.append(f"{backend}: {name!r}")
    return out


def proxy_problems(log_text: str) -> list[str]:
    """Lines of the proxy's log that mean a crash."""
    bad = ("Traceback", "Unhandled", "[SERVERBUG]", "command failed", "login crashed", "CRITICAL")
    return [line for line in log_text.splitlines() if any(b in line for b in bad)]


def run(host: str, port: int, seed: int, streams: int, workers: int, minutes: float | None = None,
        rss: Callable[[], int] | None = None, log_text: Callable[[], str] | None = None,
        progress: Callable[[Stats], None] | None = None, first: int = 0) -> tuple[Stats, list[int], list[str]]:
    """*streams* streams (or until *minutes*) with *workers* clients at once: the stats, the
    proxy's RSS every 100 streams and the crash lines of its log."""
    stats = Stats()
    deadline = time.monotonic() + minutes * 60 if minutes else None
    counter = iter(range(first, first + streams))
    lock = threading.Lock()
    memory: list[int] = []

    def worker() -> None:
        while True:
            with lock:
                if deadline is not None and time.monotonic() > deadline:
                    return
                index = next(counter, None)
            if index is None:
                return
            try:
                outcome = run_stream(host, port, seed, index)
            except OSError as e:
                outcome = Outcome(index, "unclean-close", f"connect: {e}")
            stats.add(outcome)
            if rss is not None and stats.streams % 100 == 0:
                memory.append(rss())
            if progress is not None and stats.streams % 500 == 0:
                progress(stats)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if rss is not None:
        memory.append(rss())
    return stats, memory, proxy_problems(log_text()) if log_text is not None else []


# -- as a script: its own fleet and proxy ---------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--streams", type=int, default=10_000)
    ap.add_argument("--minutes", type=float, default=None, help="stop after this long even if streams are left")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--first", type=int, default=0, help="index of the first stream")
    ap.add_argument("--only", type=int, default=None, help="replay the stream of this index and print it")
    ap.add_argument("--keep", action="store_true", help="keep the directory (the proxy's and Dovecot's logs)")
    args = ap.parse_args()
    if args.only is not None:
        data, writes = stream_bytes(args.seed, args.only)
        print(repr(data))
        print(f"{len(writes)} writes; literal left open: {open_literal(data)}")
    import shutil
    import tempfile

    from referral_proxy.fleet import Fleet, dovecot_available, free_port, make_root

    reason = dovecot_available()
    if reason is not None:
        print(f"sessionfuzz: needs Dovecot: {reason}", file=sys.stderr)
        return 2
    root = make_root("rp-fuzz-")
    fleet = Fleet.start_default(root / "fleet")
    proxy = None
    try:
        workdir = Path(tempfile.mkdtemp(prefix="proxy-", dir=root))
        proxy = start_proxy(fleet, workdir, free_port("127.0.0.1"))
        if args.only is not None:
            print(run_stream(proxy.host, proxy.port, args.seed, args.only))
            return 0
        from procmem import rss as proc_rss

        def show(stats: Stats) -> None:
            print(f"... {stats.streams} streams: {stats.verdicts}", file=sys.stderr, flush=True)

        before = census(fleet)
        t0 = time.monotonic()
        stats, memory, problems = run(proxy.host, proxy.port, args.seed, args.streams, args.workers, args.minutes,
                                      rss=lambda: proc_rss(proxy.pid)[0], log_text=proxy.stderr_text,
                                      progress=show, first=args.first)
        print(f"seed {args.seed}: {stats.streams} streams in {time.monotonic() - t0:.0f} s: {stats.verdicts}")
        print(f"proxy RSS MB every 100 streams: {[round(m / 1e6, 1) for m in memory]}")
        for f in stats.failures[:20]:
            print(f"FAILED stream {f.index}: {f.verdict}: {f.detail!r}")
        for line in problems[:20]:
            print(f"proxy log: {line}")
        wrong = misplaced(before, census(fleet))
        for line in wrong:
            print(f"misplaced mailbox: {line}")
        return 1 if stats.failures or problems or wrong else 0
    finally:
        if proxy is not None:
            proxy.stop()
        fleet.stop()
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def proxy_config(fleet, port: int) -> str:
    lines = ["[proxy]", f'listen = ["tcp:{port}:interface=127.0.0.1"]', 'hostname = "fuzz.test"']
    lines += [f"{k} = {v}" for k, v in LIMITS.items()]
    for name, d in fleet.backends.items():
        lines += [f"[backends.{name}]", f'endpoint = "{d.endpoint}"', f'url = "{d.url}"', 'tls = "none"']
    lines += ["[map]", 'default = "b1"', 'store = "sqlite:map.sqlite3"']
    for r in RULES:
        lines += ["[[map.rules]]"] + [f'{k} = "{v}"' for k, v in r.items()]
    return "\n".join(lines) + "\n"


def start_proxy(fleet, workdir: Path, port: int):
    from referral_proxy.testing.proxyproc import ProxyProcess

    (workdir / "proxy.toml").write_text(proxy_config(fleet, port))
    proxy = ProxyProcess(workdir / "proxy.toml", host="127.0.0.1", port=port, workdir=workdir)
    proxy.start(tied_to_parent=True)
    return proxy


if __name__ == "__main__":
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    sys.exit(main())
