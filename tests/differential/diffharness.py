"""Differential testing: one scripted conversation, run against direct Dovecot and
through the proxy on identical fresh mail stores, and the two transcripts compared.

A conversation comes from a corpus file (``corpus/*.imapc``, format below). Each
side starts from the same state: the user's maildir and home are restored from a
snapshot taken right after a deterministic seed (:data:`SEED`) was stored over
IMAP on that backend. The server's bytes are split into responses with the codec's
own :class:`~referral_proxy.imap.framing.Framer` (literals included) and
normalised; what still differs must be explained by a documented difference
(:data:`DIFFERENCES`, the table of docs/design.md and the README), or the test fails.

Normalised on both sides, and why:

* Dovecot's timing text ``(0.001 + 0.000 secs)``: it measures this run's CPU and waits.
* UIDVALIDITY values (``[UIDVALIDITY n]``, STATUS, ``APPENDUID``/``COPYUID``): chosen
  by the server from the clock when a mailbox is created. They are hidden, not
  forgotten: the values of matching responses must map Dovecot's to the proxy's as a
  function, so "the same mailbox keeps its UIDVALIDITY" is still compared.
* the order of capability names inside one CAPABILITY list (RFC 3501 7.2.1 gives the
  order no meaning), and the order of consecutive ``* LIST``/``* LSUB`` responses
  (RFC 3501 7.2.2/7.2.3: none is defined; the proxy merges its backends' lists).
* ``* CAPABILITY X`` right before ``tag OK Logged in`` is read as ``tag OK [CAPABILITY
  X] Logged in`` (RFC 3501 7.1: the same information).

Client tags are not normalised: both sides get the same script, so a tag the proxy
leaks is a difference.

Corpus format (one file holds several conversations)::

    # a comment
    === name                     a conversation starts
    @prelogin                    no automatic LOGIN first (default: LOGIN as the user)
    @allow ID [ID ...]           differences allowed in it (ids of DIFFERENCES)
    @exact-capabilities          capability names compared with their case (else without)
    @xfail MODE reason...        a proxy bug, marked strict xfail (MODE: single, split, all)
    @only MODE                   run only in this mode
    @relayed CAP [CAP ...]       run only if the proxy relays these capabilities (a client that is
                                 not offered one does not use it: see referral_proxy/commands.py)
    C: text                      one write; CRLF appended unless the text ends with "\\"
    X: append MAILBOX            a message delivered to MAILBOX by another session
    X: expunge MAILBOX UIDS      those messages of MAILBOX expunged by another session (UID EXPUNGE)
    W: regex                     read until a response matches

In ``C:`` text: ``\\r \\n \\t \\0 \\xHH`` escapes (any other backslash is sent as it
is: IMAP's ``\\"`` and ``\\\\``, ``\\Seen``); ``{{text}}`` a synchronizing literal (``{n}``,
then the harness waits for the continuation), ``{{+text}}`` a LITERAL+ one;
``${USER}``, ``${PASS}`` (a quoted string), ``${PLAIN}`` (SASL PLAIN, base64),
``${UV:mailbox}`` (that seeded mailbox's UIDVALIDITY on the side being run).
After each write the harness reads until every command sent so far is answered, or a
continuation request (``+``) arrives, or the connection closes.
"""

from __future__ import annotations

import base64
import difflib
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from referral_proxy.commands import relayable
from referral_proxy.fleet import Dovecot
from referral_proxy.imap.framing import NEED_DATA, Framer, Line, LiteralData
from referral_proxy.imap.response import parse_response_start

CORPUS = Path(__file__).resolve().parent / "corpus"
READ_TIMEOUT = 20.0
MODES = ("single", "split")

# ------------------------------------------------------------------ the seed

#: The mail store every conversation starts from: (mailbox, subscribed, messages),
#: each message (flags, internal date, body). Mailboxes in order of creation.
_D = "Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"


def _msg(i: int, subject: str, body: str, frm: str = "Fred Foobar <foobar@example.com>",
         extra: str = "") -> bytes:
    return (f"{_D}From: {frm}\r\nSubject: {subject}\r\nTo: carol@example.org\r\n"
            f"Message-Id: <m{i}@example.com>\r\n{extra}"
            f"MIME-Version: 1.0\r\nContent-Type: TEXT/PLAIN; CHARSET=US-ASCII\r\n\r\n{body}\r\n").encode()


_MULTIPART = (
    f"{_D}From: Ann <ann@example.net>\r\nSubject: report with attachment\r\nTo: carol@example.org\r\n"
    "Message-Id: <m3@example.com>\r\nMIME-Version: 1.0\r\n"
    'Content-Type: multipart/mixed; boundary="XX"\r\n\r\npreamble\r\n--XX\r\n'
    "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n"
    "Caf=C3=A9 report, see the attachment.\r\n--XX\r\n"
    'Content-Type: application/octet-stream; name="data.bin"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
    + base64.encodebytes(bytes(range(256))).decode().replace("\n", "\r\n")
    + "--XX--\r\n"
).encode()

SEED: tuple[tuple[str, bool, tuple[tuple[str, str, bytes], ...]], ...] = (
    ("INBOX", True, (
        ("\\Seen", "01-Jan-2020 10:00:00 +0000", _msg(1, "Hello world", "first message\r\nlunch?")),
        ("\\Seen \\Flagged", "02-Jan-2020 11:00:00 +0100", _msg(
            2, "Re: Hello world", "second, a reply", "Ann <ann@example.net>",
            "In-Reply-To: <m1@example.com>\r\nReferences: <m1@example.com>\r\n")),
        ("", "03-Jan-2020 12:00:00 -0500", _MULTIPART),
        ("\\Answered $Work", "04-Jan-2020 13:00:00 +0000", _msg(
            4, "Budget 2020", "numbers\r\n" + "x" * 300, "Zed <zed@example.com>")),
        ("\\Deleted", "05-Jan-2020 14:00:00 +0000", _msg(5, "old junk", "delete me")),
        ("\\Draft", "06-Jan-2020 15:00:00 +0000", _msg(
            6, "Re: Re: Hello world", "third in the thread", "Bob <bob@example.com>",
            "In-Reply-To: <m2@example.com>\r\nReferences: <m1@example.com> <m2@example.com>\r\n")),
    )),
    ("Work", True, (
        ("\\Seen", "10-Feb-2021 09:00:00 +0000", _msg(11, "Work item one", "alpha")),
        ("", "11-Feb-2021 09:00:00 +0000", _msg(12, "Work item two", "beta")),
        ("$Important", "12-Feb-2021 09:00:00 +0000", _msg(13, "Work item three", "gamma")),
    )),
    ("Work/Archive", False, (
        ("\\Seen", "01-Mar-2019 08:00:00 +0000", _msg(21, "archived", "old stuff")),
    )),
    ("Sent", True, (
        ("\\Seen", "02-Mar-2022 08:00:00 +0000", _msg(31, "sent mail", "I sent this", "Carol <carol@example.org>")),
    )),
    ("Trash", False, ()),
    ("Caf&AOk-", False, (
        ("", "03-Mar-2022 08:00:00 +0000", _msg(41, "in the cafe", "coffee")),
    )),
    ("Shared/Projects", True, (
        ("\\Seen", "01-Apr-2023 10:00:00 +0000", _msg(51, "project plan", "plan A")),
        ("\\Flagged", "02-Apr-2023 10:00:00 +0000", _msg(52, "project risks", "risk B")),
        ("", "03-Apr-2023 10:00:00 +0000", _msg(53, "project budget", "budget C")),
    )),
    ("Shared/Projects/2026", False, ()),
)
#: Subscribed although it does not exist (LSUB shows it, LIST does not).
SUBSCRIBED_ONLY = ("Gone",)
#: The message ``X: append`` delivers.
DELIVERY = _msg(99, "delivered meanwhile", "arrived during the conversation")
DELIVERY_DATE = "09-Sep-2024 09:09:09 +0000"


def split_owner(mailbox: str) -> str:
    """Which proxy-side backend holds *mailbox* in the split mode (the rule ``Shared/*``
    -> b3 of the split module's proxy); the single mode has everything on b1."""
    return "b3" if mailbox.startswith("Shared/") else "b1"


# ------------------------------------------------------------------ the corpus


@dataclass(frozen=True)
class Step:
    kind: str  # "C" (write), "X" (side action), "W" (wait for a response)
    text: str


@dataclass(frozen=True)
class Conversation:
    name: str
    path: str
    line: int
    steps: tuple[Step, ...]
    login: bool = True
    allow: frozenset[str] = frozenset()
    xfail: tuple[tuple[str, str], ...] = ()  # (mode or "all", reason)
    only: str | None = None
    exact_capabilities: bool = False  # capability names compared with their case
    relayed: tuple[str, ...] = ()  # capabilities the proxy must relay for it to be run

    @property
    def commands(self) -> int:
        """Client command lines in it (a pipelined write counts each)."""
        n = 0
        for s in self.steps:
            if s.kind == "C":
                n += max(1, len(re.findall(r"\\r\\n(?=[A-Za-z0-9.]+ )", s.text)) + 1)
        return n + (1 if self.login else 0)

    def xfail_reason(self, mode: str) -> str | None:
        for m, reason in self.xfail:
            if m in (mode, "all"):
                return reason
        return None


def load_corpus(directory: Path = CORPUS) -> list[Conversation]:
    """Every conversation of every ``*.imapc`` file, in file and line order."""
    out: list[Conversation] = []
    for path in sorted(directory.glob("*.imapc")):
        out.extend(parse_corpus(path.read_text(encoding="utf-8"), path.name))
    names = [c.name for c in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"conversation names used twice: {sorted(dupes)}")
    return out


def parse_corpus(text: str, path: str = "<corpus>") -> list[Conversation]:
    convs: list[Conversation] = []
    cur: dict | None = None

    def finish() -> None:
        if cur is not None:
            if not cur["steps"]:
                raise ValueError(f"{path}:{cur['line']}: conversation {cur['name']!r} has no steps")
            convs.append(Conversation(cur["name"], path, cur["line"], tuple(cur["steps"]), cur["login"],
                                      frozenset(cur["allow"]), tuple(cur["xfail"]), cur["only"], cur["exact"],
                                      tuple(cur["relayed"])))

    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith("=== "):
            finish()
            cur = {"name": line[4:].strip(), "line": n, "steps": [], "login": True, "allow": set(),
                   "xfail": [], "only": None, "exact": False, "relayed": []}
            continue
        if cur is None:
            raise ValueError(f"{path}:{n}: text before the first '=== name'")
        if line.startswith("@"):
            word, _, rest = line[1:].partition(" ")
            if word == "prelogin":
                cur["login"] = False
            elif word == "exact-capabilities":
                cur["exact"] = True
            elif word == "allow":
                unknown = [a for a in rest.split() if a not in DIFFERENCES]
                if unknown:
                    raise ValueError(f"{path}:{n}: unknown difference id(s) {unknown}")
                cur["allow"].update(rest.split())
            elif word == "xfail":
                mode, _, reason = rest.partition(" ")
                if mode not in MODES + ("all",) or not reason.strip():
                    raise ValueError(f"{path}:{n}: @xfail MODE reason")
                cur["xfail"].append((mode, reason.strip()))
            elif word == "relayed":
                cur["relayed"].extend(rest.split())
            elif word == "only":
                if rest.strip() not in MODES:
                    raise ValueError(f"{path}:{n}: @only {MODES}")
                cur["only"] = rest.strip()
            else:
                raise ValueError(f"{path}:{n}: unknown directive @{word}")
            continue
        kind, sep, rest = line.partition(": ")
        if not sep and line in ("C:",):
            kind, rest = "C", ""
        if kind not in ("C", "X", "W"):
            raise ValueError(f"{path}:{n}: a step is 'C: ', 'X: ' or 'W: ', not {line!r}")
        cur["steps"].append(Step(kind, rest))
    finish()
    return convs


# ------------------------------------------------------------------ expanding C: lines

_ESCAPE = re.compile(r"\\(x[0-9A-Fa-f]{2}|[rnt0])")
_LITERAL_MACRO = re.compile(r"\{\{(\+?)(.*?)\}\}")


def _unescape(text: str) -> bytes:
    """``\\r \\n \\t \\0 \\xHH`` to bytes; every other backslash is sent as it is
    (IMAP's own ``\\"`` and ``\\\\`` in quoted strings, ``\\Seen``); the rest as UTF-8."""
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos:m.start()].encode("utf-8")
        e = m.group(1)
        if e.startswith("x"):
            out.append(int(e[1:], 16))
        else:
            out += {"r": b"\r", "n": b"\n", "t": b"\t", "0": b"\0"}[e]
        pos = m.end()
    out += text[pos:].encode("utf-8")
    return bytes(out)


def expand(text: str, subst: dict[str, str]) -> list[bytes]:
    """The writes for one ``C:`` line: split after each synchronizing literal's announcement."""
    for key, value in subst.items():
        text = text.replace("${" + key + "}", value)
    if "${" in text:
        raise ValueError(f"unknown substitution in {text!r}")
    no_crlf = text.endswith("\\")
    if no_crlf:
        text = text[:-1]
    writes: list[bytes] = []
    cur = b""
    pos = 0
    for m in _LITERAL_MACRO.finditer(text):
        cur += _unescape(text[pos:m.start()])
        body = _unescape(m.group(2))
        if m.group(1):
            cur += b"{%d+}\r\n" % len(body) + body
        else:
            writes.append(cur + b"{%d}\r\n" % len(body))
            cur = body
        pos = m.end()
    cur += _unescape(text[pos:])
    if not no_crlf:
        cur += b"\r\n"
    writes.append(cur)
    return writes


def imap_quoted(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ------------------------------------------------------------------ running


@dataclass
class Exchange:
    """One client write and the responses read after it."""

    sent: bytes
    received: list[bytes] = field(default_factory=list)
    end: str = ""  # "", "timeout", "closed", "skipped"


class Client:
    """A raw socket client whose responses are split by the codec's Framer."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=READ_TIMEOUT)
        self.framer = Framer(16 * 1024 * 1024, auto_accept=True)
        self.closed = False

    def response(self) -> bytes | None:
        """One whole response (literals inline), or None when the connection closed."""
        parts: list[bytes] = []
        while True:
            ev = self.framer.next_event()
            if ev is NEED_DATA:
                if self.closed:
                    return None
                try:
                    data = self.sock.recv(65536)
                except TimeoutError:
                    raise
                except OSError:
                    data = b""
                if not data:
                    self.closed = True
                    if parts:
                        return b"".join(parts) + b"<EOF>"
                    return None
                self.framer.receive_data(data)
                continue
            if isinstance(ev, Line):
                parts.append(ev.data)
                if ev.literal is None:
                    return b"".join(parts)
                parts.append(ev.literal.announce() + b"\r\n")
            elif isinstance(ev, LiteralData):
                parts.append(ev.data)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


_TAG_OF_COMMAND = re.compile(rb"([^\s(){%*\"\\\]+]+) ")
_SYNC_AT_END = re.compile(rb"~?\{\d+\}\r\n\Z")


@dataclass
class Side:
    """Where a conversation runs: an address, and how to deliver mail meanwhile."""

    name: str  # "direct" or "proxy"
    host: str
    port: int
    deliver: Callable[..., None]  # (mailbox): a delivery; (mailbox, uids): those UIDs expunged
    uidvalidity: dict[str, str]  # seeded mailbox -> its UIDVALIDITY here


class _Tracker:
    """Which of the client's commands are sent whole and not yet answered, read from
    the client's own bytes with the codec's Framer."""

    def __init__(self) -> None:
        self.framer = Framer(16 * 1024 * 1024, auto_accept=True)
        self.pending: list[bytes] = []  # sent whole, no tagged answer yet
        self.current: bytes | None = None  # the command being sent (a literal announced)
        self.answering = False  # a "+" was read: the next line answers it (DONE, SASL)
        self.sync_literal = False  # the last write ends announcing a synchronizing literal

    def sent(self, data: bytes) -> None:
        self.framer.receive_data(data)
        while True:
            ev = self.framer.next_event()
            if ev is NEED_DATA:
                break
            if not isinstance(ev, Line):
                continue
            if ev.first:
                if self.answering:
                    self.answering = False
                    self.current = None
                else:
                    m = _TAG_OF_COMMAND.match(ev.data)
                    self.current = m.group(1) if m else None
            if ev.literal is None and self.current is not None:
                self.pending.append(self.current)
                self.current = None
        self.sync_literal = bool(_SYNC_AT_END.search(data))

    def refused(self) -> None:
        """The announced literal will not be sent: read the next write as a new line."""
        self.framer = Framer(16 * 1024 * 1024, auto_accept=True)
        self.current = None
        self.sync_literal = False

    def waiting(self) -> bool:
        return bool(self.pending) or self.sync_literal or self.answering

    def answered(self, tag: bytes) -> bool:
        """A tagged response: True when it completes a command the harness waits for."""
        if tag in self.pending:
            self.pending.remove(tag)
            return True
        if tag == self.current:  # a literal refused before it was sent
            self.current = None
            self.sync_literal = False
            return True
        return False


def run(conv: Conversation, side: Side, user: str, password: str) -> list[Exchange]:
    """Play *conv* against *side*; the transcript."""
    subst = {"USER": user, "PASS": imap_quoted(password),
             "PLAIN": base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()}
    for mailbox, uv in side.uidvalidity.items():
        subst["UV:" + mailbox] = uv
    client = Client(side.host, side.port)
    out: list[Exchange] = []
    greeting = client.response()
    out.append(Exchange(b"", [greeting] if greeting is not None else [], "" if greeting else "closed"))
    t = _Tracker()

    def read_until(pattern: re.Pattern | None = None) -> str:
        """Read into the last exchange until nothing is awaited (or *pattern* matched)."""
        ex = out[-1]
        while True:
            try:
                r = client.response()
            except TimeoutError:
                return "timeout"
            if r is None:
                return "closed"
            ex.received.append(r)
            if r.endswith(b"<EOF>"):
                return "closed"
            if pattern is not None:
                if pattern.search(r):
                    return ""
                continue
            try:
                start = parse_response_start(r.split(b"\r\n", 1)[0])
            except Exception:
                continue
            if start.kind == "tagged" and start.tag is not None and t.answered(start.tag):
                if not t.pending and not t.sync_literal:
                    return ""
            elif start.kind == "continuation":
                if t.sync_literal:
                    t.sync_literal = False
                elif t.pending:
                    t.answering = True
                return ""

    steps = list(conv.steps)
    if conv.login:
        steps.insert(0, Step("C", "L0 LOGIN ${USER} ${PASS}"))
    steps.append(Step("C", "Z9 LOGOUT"))
    try:
        for step in steps:
            if client.closed:
                out.append(Exchange(step.text.encode(), [], "skipped"))
                continue
            if step.kind == "X":
                verb, _, arg = step.text.partition(" ")
                if verb == "append":
                    side.deliver(arg.strip())
                elif verb == "expunge":
                    mailbox, _, uids = arg.strip().rpartition(" ")
                    side.deliver(mailbox, uids)
                else:
                    raise ValueError(f"unknown action {step.text!r}")
                continue
            if step.kind == "W":
                out.append(Exchange(b"", []))
                out[-1].end = read_until(re.compile(step.text.encode()))
                continue
            writes = expand(step.text, subst)
            for i, data in enumerate(writes):
                ex = Exchange(data)
                out.append(ex)
                try:
                    client.sock.sendall(data)
                except OSError:
                    ex.end = "closed"
                    break
                t.sent(data)
                if not t.waiting():
                    continue  # a partial line, a LITERAL+ one: nothing to wait for
                literal = t.sync_literal
                ex.end = read_until()
                if ex.end:
                    break
                if literal and t.sync_literal is False and t.current is None:
                    # the literal was refused: the rest of this command is not sent (the next
                    # write starts a new line, also when this step ended at the announcement)
                    t.refused()
                    for rest in writes[i + 1:]:
                        out.append(Exchange(rest, [], "skipped"))
                    break
            if out[-1].end == "timeout":
                break
    finally:
        client.close()
    return out


# ------------------------------------------------------------------ normalising

_TIMING = re.compile(rb" \(\d+\.\d{3} \+ \d+\.\d{3}(?: \+ \d+\.\d{3})? secs\)")
_UIDVALIDITY = re.compile(rb"(\[UIDVALIDITY |UIDVALIDITY |\[APPENDUID |\[COPYUID |\(UIDVALIDITY )(\d+)")
_CAPS = re.compile(rb"(\* CAPABILITY |\[CAPABILITY )([^\]\r\n]*)")


class Normaliser:
    """The normal form of one side's responses; remembers the UIDVALIDITY values it hid."""

    def response(self, r: bytes) -> tuple[bytes, tuple[bytes, ...]]:
        """(normalised response, the UIDVALIDITY values it held, in order)."""
        values: list[bytes] = []

        def uv(m: re.Match) -> bytes:
            values.append(m.group(2))
            return m.group(1) + b"<uidvalidity>"

        r = _TIMING.sub(b"", r)
        r = _UIDVALIDITY.sub(uv, r)
        r = _CAPS.sub(lambda m: m.group(1) + b" ".join(sorted(m.group(2).split(), key=bytes.upper)), r)
        return r, tuple(values)

    def exchange(self, received: Sequence[bytes]) -> list[tuple[bytes, tuple[bytes, ...]]]:
        return _sort_list_runs(_fold_capability([self.response(r) for r in received]))


def _fold_capability(rs: list[tuple[bytes, tuple]]) -> list[tuple[bytes, tuple]]:
    """``* CAPABILITY X`` right before ``tag OK Logged in`` is ``tag OK [CAPABILITY X] Logged in``
    (RFC 3501 7.1: the code saves the client a CAPABILITY command; Dovecot sends the
    untagged form to a client that asked for capabilities before it logged in)."""
    out: list[tuple[bytes, tuple]] = []
    for r, v in rs:
        m = re.match(rb"(\S+) OK (Logged in.*)\Z", r, re.S)
        if m and out and out[-1][0].startswith(b"* CAPABILITY "):
            caps = out.pop()[0][len(b"* CAPABILITY "):]
            r = m.group(1) + b" OK [CAPABILITY " + caps + b"] " + m.group(2)
        out.append((r, v))
    return out


def _list_unit_kind(r: bytes) -> bytes | None:
    m = re.match(rb"\* (LIST|LSUB) ", r)
    return m.group(1) if m else None


def _list_key(r: bytes) -> bytes:
    entry = _list_entry(r)
    return entry[3] if entry is not None else r


def _sort_list_runs(rs: list[tuple[bytes, tuple]]) -> list[tuple[bytes, tuple]]:
    """Consecutive LIST (or LSUB) responses, each with the STATUS responses that follow
    it (LIST-STATUS), in a canonical order."""
    out: list[tuple[bytes, tuple]] = []
    i = 0
    while i < len(rs):
        kind = _list_unit_kind(rs[i][0])
        if kind is None:
            out.append(rs[i])
            i += 1
            continue
        units: list[list[tuple[bytes, tuple]]] = []
        while i < len(rs) and _list_unit_kind(rs[i][0]) == kind:
            unit = [rs[i]]
            i += 1
            while i < len(rs) and rs[i][0].startswith(b"* STATUS "):
                unit.append(rs[i])
                i += 1
            units.append(unit)
        for unit in sorted(units, key=lambda u: (_list_key(u[0][0]), u)):
            out.extend(unit)
    return out


# ------------------------------------------------------------------ differences


@dataclass(frozen=True)
class Context:
    """What a difference's predicate may look at besides the two responses."""

    conv: Conversation
    sent: bytes  # the client's write these responses answer
    verbs: dict[bytes, bytes] = field(default_factory=dict)  # tag -> command name, of everything sent so far
    proxy: tuple[bytes, ...] = ()  # the proxy's (normalised) responses in this exchange


@dataclass(frozen=True)
class Difference:
    """A documented way the proxy's answer may differ from direct Dovecot's: a row of
    the table in docs/design.md and the README (same id)."""

    id: str
    what: str
    why: str
    pair: Callable[[bytes, bytes, Context], bool] | None = None  # Dovecot's, the proxy's: explained?
    extra: Callable[[bytes, Context], bool] | None = None  # a response only the proxy sends
    missing: Callable[[bytes, Context], bool] | None = None  # a response only Dovecot sends
    end: Callable[[str, str], bool] | None = None  # (Dovecot's, the proxy's) way an exchange ended
    uidvalidity: bool = False  # a mailbox's UIDVALIDITY may change through the proxy only
    scope: str = "both"  # "both" modes, or "split" only
    default: bool = False  # allowed in every conversation (no @allow needed)


_STATUS = re.compile(rb"(\S+) (OK|NO|BAD|BYE|PREAUTH)(?: \[([^\] ]+)([^\]]*)\])?")


def _status_word(r: bytes) -> tuple[bytes, bytes, bytes]:
    """(tag, status, code) of a status response ("*" for untagged)."""
    m = _STATUS.match(r)
    return (m.group(1), m.group(2), (m.group(3) or b"").upper()) if m else (b"", b"", b"")


def _caps_of(r: bytes, exact: bool = False) -> set[bytes] | None:
    m = _CAPS.search(r)
    return {c if exact else c.upper() for c in m.group(2).split()} if m else None


#: Capabilities the proxy never relays before login (after login: whatever the declared
#: command table, referral_proxy/commands.py, does not call relayable).
NOT_RELAYED = {b"STARTTLS", b"LOGINDISABLED", b"SASL-IR", b"LOGIN-REFERRALS", b"NOTIFY", b"UNAUTHENTICATE",
               b"IMAP4REV2", b"LITERAL-", b"COMPRESS=DEFLATE", b"AUTH=LOGIN"}


def _capabilities(direct: bytes, proxy: bytes, ctx: Context | None = None) -> bool:
    """The proxy's list is Dovecot's without NOT_RELAYED, with the proxy's own (before
    login: SASL-IR, AUTH=PLAIN, MAILBOX-REFERRALS; after: MULTIAPPEND too);
    case-insensitive unless the conversation says @exact-capabilities."""
    exact = ctx is not None and ctx.conv.exact_capabilities
    d, p = _caps_of(direct, exact), _caps_of(proxy, exact)
    if d is None or p is None:
        return False
    if _CAPS.sub(b"", direct) != _CAPS.sub(b"", proxy) and not (
            direct.startswith(b"* OK") and proxy.startswith(b"* OK")):
        return False
    if b"AUTH=PLAIN" in d:  # before login
        d = {c for c in d if c.upper() not in NOT_RELAYED}
        own = {b"IMAP4rev1", b"LITERAL+", b"SASL-IR", b"ID", b"MAILBOX-REFERRALS"}
    else:
        d = {c for c in d if relayable(c.decode("ascii", "replace"))}
        own = {b"IMAP4rev1", b"LITERAL+", b"ID", b"MAILBOX-REFERRALS", b"MULTIAPPEND"}
    if not exact:
        own = {c.upper() for c in own}
    return p == d | own


def _greeting(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    if not (direct.startswith(b"* OK ") and proxy.startswith(b"* OK ") and ctx.sent == b""):
        return False
    return _caps_of(direct) is None or _capabilities(
        direct, proxy.split(b"]")[0] + b"]" + direct.split(b"]", 1)[1], ctx)


def _same_status(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    return _status_word(direct) == _status_word(proxy) and _status_word(direct)[1] != b""


def _id(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    return direct.startswith(b"* ID ") and proxy.startswith(b'* ID ("name" "referral-proxy"')


_COMMAND_HEAD = re.compile(rb"(?m)^([A-Za-z0-9.]+) ([A-Za-z]+)")
_SYNC_ANNOUNCED = re.compile(rb"~?\{\d+\}\r\n\Z")


def _literal_continuation(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    return direct.startswith(b"+") and proxy.startswith(b"+") and bool(_SYNC_ANNOUNCED.search(ctx.sent))


_LIST_LINE = re.compile(rb"\* (LIST|LSUB) \(([^)]*)\) (NIL|\"(?:[^\"\\]|\\.)\") (.*)\Z", re.S)
_HINTS = {b"\\MARKED", b"\\UNMARKED"}


def _list_entry(r: bytes) -> tuple | None:
    m = _LIST_LINE.match(r)
    if m is None:
        return None
    name = m.group(4)
    if name.startswith(b'"') and name.endswith(b'"'):
        name = re.sub(rb"\\(.)", rb"\1", name[1:-1])
    elif name.startswith(b"{"):
        name = name.split(b"\r\n", 1)[1]
    flags = frozenset(f.upper() for f in m.group(2).split()) - _HINTS
    return m.group(1), flags, m.group(3), name


def _list_merge(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    """The same LIST/LSUB entry (name as atom, quoted or literal; attributes in any
    order, \\Marked/\\Unmarked hints aside), or the completion of a LIST/LSUB."""
    a, b = _list_entry(direct), _list_entry(proxy)
    if a is not None or b is not None:
        return a == b
    tag = _status_word(direct)[0]
    return ctx.verbs.get(tag) in (b"LIST", b"LSUB", b"RLIST", b"RLSUB") and _same_status(direct, proxy, ctx)


def _auth_errors(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    """A failed AUTHENTICATE: NO or BAD, with or without [ALERT]."""
    dt, ds, dc = _status_word(direct)
    pt, ps, pc = _status_word(proxy)
    return dt == pt and ds in (b"NO", b"BAD") and ps in (b"NO", b"BAD") and pc in (b"", dc) and (
        dc in (b"", b"ALERT"))


def _quota_share(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    """The same quota root and limits; the usage is the owning backend's share."""
    pattern = re.compile(rb"\* QUOTA (\S+|\"[^\"]*\") \((.*)\)\Z")
    a, b = pattern.match(direct), pattern.match(proxy)
    if a is None or b is None or a.group(1) != b.group(1):
        return False
    da, db = a.group(2).split(), b.group(2).split()
    return len(da) == len(db) and all(x == y for i, (x, y) in enumerate(zip(da, db)) if i % 3 != 1)


def _catenate_across(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    return b"CATENATE" in ctx.sent.upper() and proxy.split(b" ", 2)[1:2] == [b"NO"] and b"[BADURL " in proxy


def _catenate_across_missing(direct: bytes, ctx: Context) -> bool:
    return b"CATENATE" in ctx.sent.upper() and (direct.startswith(b"* ") or b" OK " in direct)


def _dovecot_closed(direct_end: str, proxy_end: str) -> bool:
    return direct_end in ("closed", "skipped") and proxy_end in ("", "closed")


def _prelogin_enable(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    return direct == b"* ENABLED" and proxy.endswith(b" BAD ENABLE is not allowed before login")


def _prelogin_enable_missing(direct: bytes, ctx: Context) -> bool:
    return b" OK ENABLE ignored in non-authenticated state" in direct


def _referral_pair(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    tag = _status_word(direct)[0] or _status_word(proxy)[0]
    verb = ctx.verbs.get(tag) or ctx.verbs.get(_status_word(proxy)[0])
    if b"[REFERRAL " in proxy:
        return True
    return verb in (b"RLIST", b"RLSUB") or any(v in (b"RLIST", b"RLSUB") for v in _verbs_in(ctx.sent))


def _verbs_in(sent: bytes) -> list[bytes]:
    return [m.group(2).upper() for m in _COMMAND_HEAD.finditer(sent)]


def _referral_extra(proxy: bytes, ctx: Context) -> bool:
    return any(v in (b"RLIST", b"RLSUB") for v in _verbs_in(ctx.sent))


def _referral_missing(direct: bytes, ctx: Context) -> bool:
    return any(b"[REFERRAL " in r for r in ctx.proxy)


def _literal_lines_answered(direct: bytes, ctx: Context) -> bool:
    """Dovecot's answer to a line of a refused command's LITERAL+ literal: tagged with a
    "tag" that is no command the client sent, or an untagged BAD (which may come in
    the next exchange on one side and not on the other)."""
    tag = _status_word(direct)[0]
    return direct.startswith(b"* BAD Error in IMAP tag") or (tag not in (b"", b"*") and tag not in ctx.verbs)


def _literal_lines_untagged(proxy: bytes, ctx: Context) -> bool:
    return proxy.startswith(b"* BAD Error in IMAP tag")


def _bracket_tagged(proxy: bytes) -> bool:
    """The proxy's answer to a command whose tag holds ``]``: its completion or its ESEARCH."""
    tag = proxy.split(b" ", 1)[0]
    return b"]" in tag or re.match(rb'\* ESEARCH \(TAG "[^"]*\][^"]*"\)', proxy) is not None


def _tag_bracket(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    return direct.startswith(b"* BAD Error in IMAP tag") and _bracket_tagged(proxy)


def _tag_bracket_extra(proxy: bytes, ctx: Context) -> bool:
    return _bracket_tagged(proxy)


def _tag_bracket_missing(direct: bytes, ctx: Context) -> bool:
    return direct.startswith(b"* BAD Error in IMAP tag") and re.search(rb"(?m)^\S*\]\S* ", ctx.sent) is not None


def _anything(*_args) -> bool:
    return True


# The proxy's own refusals (referral_proxy/imap/reader.py and the session): a command it
# does not know, arguments that do not parse against the command's grammar (an escape
# RFC 3501 does not allow, an argument to a command that takes none ...), a limit. Such a
# command reaches no backend; Dovecot may have run it. Whatever Dovecot alone says in
# that exchange (the data of the command it ran, the lines of a refused APPEND's literal
# it read as commands) is explained by the refusal.
_OWN_REFUSAL = re.compile(
    rb"(\S+) (?:BAD|NO) (?:Unknown command |Invalid arguments: |Invalid command: |[A-Z ]+ takes no arguments"
    rb"|Command line too long|[A-Z ]+ is not allowed |\[LIMIT\] Too many literals|\[TOOBIG\] (?:Literal|Command) too)")


def _refused_tags(ctx: Context) -> set[bytes]:
    return {m.group(1) for r in ctx.proxy for m in [_OWN_REFUSAL.match(r)] if m}


_TO_ITSELF = b" NO [CANNOT] Messages are not moved into the mailbox they are in"


def _move_to_itself(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    """Dovecot's completion of a MOVE into the selected mailbox, the proxy's refusal of it (same tag)."""
    return _TO_ITSELF in proxy and direct.split(b" ", 1)[0] == proxy.split(b" ", 1)[0]


def _after_move_to_itself(direct: bytes, ctx: Context) -> bool:
    """What Dovecot said of such a MOVE before its completion ([COPYUID], EXPUNGE): nothing moved here."""
    return direct.startswith(b"* ") and any(_TO_ITSELF in line for line in ctx.proxy)


_SELECTED_AWAY = b" NO [INUSE] Close (or unselect) the mailbox before moving it to another server"


def _rename_selected(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    """Dovecot's completion of a RENAME of the selected mailbox, the proxy's refusal to move it across (same tag)."""
    return _SELECTED_AWAY in proxy and direct.split(b" ", 1)[0] == proxy.split(b" ", 1)[0]


def _own_refusal(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    m = _OWN_REFUSAL.match(proxy)
    return m is not None and direct.split(b" ", 1)[0] in (m.group(1), b"*", b"+")


def _after_own_refusal(direct: bytes, ctx: Context) -> bool:
    tags = _refused_tags(ctx)
    return bool(tags) and direct.split(b" ", 1)[0] in tags | {b"*", b"+"}


def _proxy_alone(proxy: bytes, ctx: Context) -> bool:
    """The proxy's own refusal standing apart (Dovecot's answer to that command came in
    another order), or anything after a LOGOUT with arguments, which only Dovecot ran."""
    return _OWN_REFUSAL.match(proxy) is not None or any(verb.upper() == b"LOGOUT" for verb in ctx.verbs.values())


def _bye_too_many(direct: bytes, proxy: bytes, ctx: Context) -> bool:
    return direct.startswith(b"* BYE ") and b" BAD " in proxy


def _modseq_known(proxy: bytes, ctx: Context) -> bool:
    """``* OK [HIGHESTMODSEQ n]`` on SELECT of a mailbox the proxy moved: the mover asked its
    HIGHESTMODSEQ (drain.py: a copy changed by a client is never taken back), and Dovecot keeps
    modification sequences for a mailbox from then on."""
    return proxy.startswith(b"* OK [HIGHESTMODSEQ ")


DIFFERENCES: dict[str, Difference] = {d.id: d for d in (
    Difference("greeting", "the greeting's text and its pre-login CAPABILITY",
               "the proxy greets with its own host name before any backend is chosen", pair=_greeting,
               default=True),
    Difference("capabilities", "the CAPABILITY list (response and [CAPABILITY] code)",
               "the proxy adds its own (IMAP4rev1 LITERAL+ ID MAILBOX-REFERRALS MULTIAPPEND, and SASL-IR AUTH=PLAIN "
               "before login) and does not relay STARTTLS, AUTH=LOGIN, LOGIN-REFERRALS, NOTIFY (events of other "
               "backends cannot be merged yet: a client polls with NOOP/IDLE and STATUS instead)",
               pair=_capabilities, default=True),
    Difference("literal-continuation", "the text of the continuation request for a synchronizing literal",
               "the proxy collects the command before relaying it and sends its own `+ Ready for literal data`",
               pair=_literal_continuation, default=True),
    Difference("list-merge", "LIST/LSUB entries re-encoded: names quoted, attributes reordered, "
               "\\Marked/\\Unmarked hints not compared (they change with every SELECT of the mailbox); "
               "`LIST completed.`",
               "the proxy lists every backend with `LIST \"\" \"*\"` and formats the merged result itself, even "
               "when one backend holds everything", pair=_list_merge, default=True),
    Difference("own-text", "the human text of an answer the proxy gives itself (same tag, status and code)",
               "pre-login commands, commands it cannot parse, refused or emulated ones (zero-length APPEND, "
               "RENAME across backends) are answered by the proxy", pair=_same_status),
    Difference("id", "the ID answer before login", "the proxy names itself; after login ID is relayed", pair=_id),
    Difference("auth-errors", "a failed AUTHENTICATE: BAD for an invalid response where Dovecot says NO [ALERT]",
               "RFC 3501 6.2.2: an invalid client response is rejected with BAD", pair=_auth_errors),
    Difference("invalid-command-limit", "Dovecot's login process disconnects after 3 invalid commands "
               "(`* BYE Too many invalid IMAP commands.`); the proxy answers each with BAD",
               "the proxy, not Dovecot, reads commands before login", pair=_bye_too_many, end=_dovecot_closed,
               extra=_anything),
    Difference("prelogin-enable", "ENABLE before login: Dovecot says `* ENABLED` and OK (ignored); the proxy BAD",
               "RFC 5161 3.1: ENABLE is valid in the authenticated state only", pair=_prelogin_enable,
               missing=_prelogin_enable_missing),
    Difference("referrals", "RLIST/RLSUB (RFC 2193) are answered (Dovecot: BAD); after them the session is "
               "referral-aware and a mailbox on another backend gets `NO [REFERRAL imap://...]`",
               "MAILBOX-REFERRALS is the proxy's own; a client that never sends RLIST/RLSUB is never referred",
               pair=_referral_pair, extra=_referral_extra, missing=_referral_missing),
    Difference("refused-literal-plus", "a command Dovecot refuses before its LITERAL+ literal: Dovecot reads the "
               "literal's lines as commands and answers them (`x BAD ...`); through the proxy Dovecot runs them too, "
               "but their tagged answers are dropped (see the bug list)", "the proxy forwards the literal as the client "
               "sent it and relays only answers to tags it sent", missing=_literal_lines_answered,
               extra=_literal_lines_untagged),
    Difference("rename-across", "RENAME to a mailbox another backend owns: the text says what moved, "
               "the mailbox has a new UIDVALIDITY", "it is a new mailbox on the other backend", pair=_same_status,
               uidvalidity=True, scope="split", extra=_modseq_known),
    Difference("move-across", "MOVE to a mailbox on another backend: the text of `* OK [COPYUID ...] Moved`",
               "the proxy carries out the move itself (FETCH, MULTIAPPEND, UID EXPUNGE) and says so in its own words",
               pair=_same_status, scope="split"),
    Difference("quota-share", "GETQUOTA(ROOT) usage counts the owning backend's messages only",
               "each backend keeps its own quota; the proxy relays the mailbox owner's", pair=_quota_share,
               scope="split"),
    Difference("catenate-across", "CATENATE with a URL of a mailbox on another backend than the destination "
               "gets `NO [BADURL ...]`", "the destination's backend cannot read the other backend's mailbox",
               pair=_catenate_across, missing=_catenate_across_missing, scope="split"),
    Difference("tag-bracket", "a command whose tag holds `]` is run and answered under that tag; Dovecot "
               "answers `* BAD Error in IMAP tag` and runs nothing",
               "RFC 3501 9 allows it (tag: any ASTRING-CHAR but `+`, and `]` is one); the proxy gives backends "
               "its own tags and puts the client's back only on the completion and in ESEARCH's quoted "
               "`(TAG \"...\")`", pair=_tag_bracket, extra=_tag_bracket_extra, missing=_tag_bracket_missing),
    Difference("rename-selected-across", "a RENAME of the selected (or examined) mailbox to a name another "
               "backend owns gets `NO [INUSE] Close (or unselect) the mailbox before moving it to another server`",
               "the session's selected state (its UIDs, UIDVALIDITY, sequence numbers) cannot follow the messages "
               "to a new mailbox on another server; within one backend it is relayed", pair=_rename_selected,
               scope="split"),
    Difference("move-to-itself", "a MOVE into the selected mailbox itself gets `NO [CANNOT]` (a COPY there is "
               "relayed)", "Dovecot 2.3.19 answers one whose set names a message another session expunged meanwhile "
               "`NO [EXPUNGEISSUED]`, having expunged the other messages without copying them: lost",
               pair=_move_to_itself, missing=_after_move_to_itself),
    Difference("refused-by-proxy", "a command the proxy refuses with BAD before any backend sees it where "
               "Dovecot runs it: arguments to a command that takes none (`NOOP now`, `LOGOUT later`), an escape "
               "RFC 3501 does not allow (`\"IN\\BOX\"`), a command the proxy does not relay (NOTIFY); a refused "
               "APPEND's literal that Dovecot reads as commands is never read so",
               "what the proxy relays it parses completely and writes again; what it cannot check reaches no "
               "backend (issue 10)", pair=_own_refusal, missing=_after_own_refusal, end=_dovecot_closed,
               extra=_proxy_alone),
)}


@dataclass
class Comparison:
    differences: list[str]  # unexplained, human-readable
    explained: dict[str, int]  # difference id -> how often it was used
    text: str  # both transcripts side by side, for the failure report


def compare(conv: Conversation, mode: str, direct: list[Exchange], proxy: list[Exchange]) -> Comparison:
    """What differs between the two transcripts after normalising, and which
    differences the conversation's @allow (and the global ones) explain.

    UIDVALIDITY values are hidden by the normal form, but not forgotten: the values
    of responses that match must map Dovecot's to the proxy's as a function (a
    mailbox keeps its UIDVALIDITY through the proxy whenever it keeps it in Dovecot).
    """
    allowed = [d for d in DIFFERENCES.values()
               if (d.default or d.id in conv.allow) and d.scope in ("both", mode)]
    norm = Normaliser()
    unexplained: list[str] = []
    used: dict[str, int] = {}
    lines: list[str] = []
    uv_map: dict[bytes, bytes] = {}
    verbs: dict[bytes, bytes] = {}
    ctx = Context(conv, b"", verbs)

    def explain(kind: str, a, b) -> bool:
        for d in allowed:
            ok = False
            if kind == "pair" and d.pair is not None:
                ok = d.pair(a, b, ctx)
            elif kind == "uidvalidity":
                ok = d.uidvalidity
            elif kind == "end" and d.end is not None:
                ok = d.end(a, b)
            elif kind == "extra" and d.extra is not None:
                ok = d.extra(b, ctx)
            elif kind == "missing" and d.missing is not None:
                ok = d.missing(a, ctx)
            if ok:
                used[d.id] = used.get(d.id, 0) + 1
                return True
        return False

    for k in range(max(len(direct), len(proxy))):
        ed = direct[k] if k < len(direct) else Exchange(b"<none>", [], "missing")
        ep = proxy[k] if k < len(proxy) else Exchange(b"<none>", [], "missing")
        label = ed.sent.decode("latin-1").rstrip("\r\n")[:120] or ("<greeting>" if k == 0 else "<wait>")
        lines.append(f"C: {label}")
        for m in _COMMAND_HEAD.finditer(ed.sent):
            verbs[m.group(1)] = m.group(2).upper()
        na, nb = norm.exchange(ed.received), norm.exchange(ep.received)
        a, b = [x for x, _ in na], [y for y, _ in nb]
        ctx = Context(conv, ed.sent, verbs, tuple(b))
        if ed.end == "timeout":  # the corpus waits for what never comes: nothing after it is compared
            unexplained.append(f"after {label!r}: Dovecot did not answer within {READ_TIMEOUT:.0f} s")
        if ed.end != ep.end and not explain("end", ed.end, ep.end):
            unexplained.append(f"after {label!r}: Dovecot {ed.end or 'answered'}, proxy {ep.end or 'answered'}")
        for r in a:
            lines.append("  D: " + r.decode("latin-1")[:300])
        for r in b:
            lines.append("  P: " + r.decode("latin-1")[:300])
        sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
        for op, i1, i2, j1, j2 in sm.get_opcodes():
            if op == "equal":
                for (_, va), (_, vb) in zip(na[i1:i2], nb[j1:j2]):
                    for x, y in zip(va, vb):
                        if uv_map.setdefault(x, y) != y and not explain("uidvalidity", x, y):
                            unexplained.append(f"after {label!r}: a UIDVALIDITY that Dovecot keeps ({x!r}) "
                                               f"changed through the proxy ({uv_map[x]!r}, then {y!r})")
                continue
            da, pb = a[i1:i2], b[j1:j2]
            # pair what can be paired in order, then what only one side says
            for x, y in zip(da, pb):
                if not explain("pair", x, y):
                    unexplained.append(f"after {label!r}:\n    Dovecot: {x!r}\n    proxy:   {y!r}")
            for x in da[len(pb):]:
                if not explain("missing", x, None):
                    unexplained.append(f"after {label!r}: only Dovecot says {x!r}")
            for y in pb[len(da):]:
                if not explain("extra", None, y):
                    unexplained.append(f"after {label!r}: only the proxy says {y!r}")
    return Comparison(unexplained, used, "\n".join(lines))


# ------------------------------------------------------------------ stores


def wait_sessions_gone(backend: Dovecot, user: str, timeout: float = 30.0) -> None:
    """Until no imap process of *user* is left on *backend* (they write indexes when they end)."""
    deadline = time.monotonic() + timeout
    while backend.sessions(user) and time.monotonic() < deadline:
        time.sleep(0.005)


def seed(backend: Dovecot, user: str, keep: Callable[[str], bool]) -> dict[str, str]:
    """Store :data:`SEED` (the mailboxes *keep* accepts) on *backend*; their UIDVALIDITYs."""
    backend.reset_mail(user)
    uv: dict[str, str] = {}
    with backend.client(user) as m:
        for mailbox, subscribed, messages in SEED:
            if not keep(mailbox):
                continue
            if mailbox != "INBOX":
                typ, data = m.create(imap_quoted(mailbox))
                assert typ == "OK", data
            for flags, date, body in messages:
                typ, data = m.append(imap_quoted(mailbox), f"({flags})", f'"{date}"', body)
                assert typ == "OK", data
            if subscribed:
                m.subscribe(imap_quoted(mailbox))
            typ, data = m.status(imap_quoted(mailbox), "(UIDVALIDITY)")
            uv[mailbox] = re.search(rb"UIDVALIDITY (\d+)", data[0]).group(1).decode()
        for name in SUBSCRIBED_ONLY:
            if keep(name):
                m.subscribe(name)
        if keep("INBOX"):
            typ, data = m.xatom("SETMETADATA", "INBOX", '(/private/comment "inbox note")')
            assert typ == "OK", data
            typ, data = m.xatom("SETMETADATA", '""', '(/private/vendor/rp/motd "hello")')
            assert typ == "OK", data
    wait_sessions_gone(backend, user)
    return uv


@dataclass
class Snapshot:
    """A user's maildir and home on one backend, as files, to put back before each conversation."""

    backend: Dovecot
    user: str
    path: Path

    @classmethod
    def take(cls, backend: Dovecot, user: str, where: Path) -> Snapshot:
        where.mkdir(parents=True, exist_ok=True)
        for name, d in (("mail", backend.mail_dir / user), ("home", backend.home_dir / user)):
            if d.exists():  # cp -a: owners, modes and times kept, and fast (this runs per conversation)
                subprocess.run(["cp", "-a", str(d), str(where / name)], check=True)
        return cls(backend, user, where)

    def restore(self) -> None:
        self.backend.reset_mail(self.user)  # waits until the user's imap processes are gone
        for name, d in (("mail", self.backend.mail_dir / self.user), ("home", self.backend.home_dir / self.user)):
            src = self.path / name
            if src.exists():
                subprocess.run(["cp", "-a", str(src), str(d)], check=True)


def deliverer(backends: Callable[[str], Dovecot], user: str) -> Callable[..., None]:
    """``deliver(mailbox)``: :data:`DELIVERY` appended by a session of its own on the owner;
    ``deliver(mailbox, uids)``: those messages expunged by one (UID EXPUNGE, nothing else)."""
    def deliver(mailbox: str, expunge: str | None = None) -> None:
        with backends(mailbox).client(user) as m:
            if expunge is None:
                typ, data = m.append(imap_quoted(mailbox), "()", f'"{DELIVERY_DATE}"', DELIVERY)
                assert typ == "OK", data
                return
            assert m.select(imap_quoted(mailbox))[0] == "OK"
            assert m.uid("STORE", expunge, "+FLAGS.SILENT", "(\\Deleted)")[0] == "OK"
            assert m.uid("EXPUNGE", expunge)[0] == "OK"
    return deliver


def report(conv: Conversation, mode: str, cmp: Comparison) -> str:
    head = f"{conv.path}:{conv.line} {conv.name} ({mode}): {len(cmp.differences)} unexplained difference(s)"
    return head + "\n" + "\n".join(cmp.differences) + "\n--- transcripts (D: Dovecot, P: proxy) ---\n" + cmp.text


def stats(convs: Iterable[Conversation]) -> tuple[int, int]:
    convs = list(convs)
    return len(convs), sum(c.commands for c in convs)


__all__ = ["CORPUS", "Conversation", "DIFFERENCES", "Difference", "Exchange", "MODES", "SEED", "Side", "Snapshot",
           "compare", "deliverer", "expand", "load_corpus", "parse_corpus", "report", "run", "seed", "split_owner",
           "stats"]
