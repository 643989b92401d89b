"""LIST / LSUB / RLIST / RLSUB across backends: one mail store out of several partial ones.

Each backend contributes only the mailboxes the map gives to it (a stray copy
elsewhere is hidden, INBOX comes once from home), missing parents are shown as
``\\Noselect`` placeholders, and ``\\HasChildren`` / ``\\HasNoChildren`` are
recomputed over the merged tree. The client's reference and pattern are applied
here, to the merged names. :func:`list_command` carries out the command for a
session, through the narrow :class:`ListHost`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.logger import Logger

from .backend import BackendProtocol, UntaggedResponse
from .imap.command import Atom, ParenList, ParseError, String, astring_value, parse_arguments
from .imap.grammar import Arguments, Slot, encode
from .imap.quoting import quoted
from .listmatch import list_matcher
from .moveview import HIDDEN, move_view
from .routing import MailboxMap, normalize
from .staging import ASIDE_PREFIX, STAGING_PREFIX, is_private_name

__all__ = ["ListEntry", "ListHost", "list_command", "answer_merged", "parse_list_entry", "merge", "select",
           "format_entry", "add_flag", "is_basic_list", "command_pieces"]

log = Logger()

_CHILD_FLAGS = {b"\\HASCHILDREN", b"\\HASNOCHILDREN"}


@dataclass(frozen=True)
class ListEntry:
    """One mailbox of a LIST/LSUB answer and the backend it came from."""

    flags: tuple[bytes, ...]
    delimiter: bytes | None
    name: bytes
    backend: str

    @property
    def text(self) -> str:
        return self.name.decode("utf-8", "surrogateescape")


# ``(\HasNoChildren) "/" INBOX``: atoms for flags, a plain quoted delimiter or NIL, an atom or an escape-free
# quoted name and nothing after it, as Dovecot writes nearly every entry: what parse_arguments makes of it.
_ATOM = rb'[^ ()"{\x00-\x1f\x7f\[\]]++'
_PLAIN_ENTRY = re.compile(rb'\(((?:%s(?: %s)*+)?+)\) (?:"([^"\\\r\n\x00])"|NIL) (?:"([^"\\\r\n\x00]*+)"|(%s))'
                          % (_ATOM, _ATOM, _ATOM))


def parse_list_entry(fragments: Sequence[bytes], literals: Sequence[bytes], backend: str) -> ListEntry:
    """The arguments of ``* LIST (flags) "/" name`` (after the name LIST)."""
    if not literals and (m := _PLAIN_ENTRY.fullmatch(fragments[0])) is not None:
        flags, delimiter, quoted_name, atom_name = m.groups()
        return ListEntry(tuple(flags.split(b" ")) if flags else (), delimiter,
                         quoted_name if quoted_name is not None else atom_name, backend)
    args = parse_arguments(fragments, literals)
    if len(args) < 3 or not isinstance(args[0], ParenList):
        raise ParseError("malformed LIST response")
    flags = tuple(t.value for t in args[0].items if isinstance(t, Atom))
    delim_tok, name_tok = args[1], args[2]
    delimiter = None if isinstance(delim_tok, Atom) and delim_tok.value.upper() == b"NIL" else delim_tok.value  # type: ignore[union-attr]
    if not isinstance(name_tok, (Atom, String)):
        raise ParseError("malformed LIST mailbox name")
    return ListEntry(flags, delimiter, name_tok.value, backend)


def merge(
    entries: Iterable[ListEntry],
    owner: Callable[[str], str],
    separator: str,
    *,
    placeholders: bool = True,
    list_flags: bool = True,
) -> list[ListEntry]:
    """Keep each mailbox from its owner only; add missing parents (with child flags when
    *list_flags*: LIST's, not LSUB's); fix child flags. The proxy's staging mailboxes
    (staging.py) are never shown."""
    kept: dict[str, ListEntry] = {}
    held: dict[str, ListEntry] = {}  # LSUB: a subscription only a backend not owning the name keeps
    strays: list[tuple[str, str]] = []  # LIST: (backend, name) of a mailbox hidden there (not its owner)
    for e in entries:
        if is_private_name(e.name):
            continue
        name = normalize(e.text, separator)
        if owner(name) != e.backend:
            if not list_flags:
                held.setdefault(name, e)
            else:
                strays.append((e.backend, name))
            continue
        kept.setdefault(name, e)
    # A subscription is a name kept where it was made (RFC 3501 6.3.6): one whose route changed since
    # (a RENAME of a moved mailbox unplaced it) is still the user's; UNSUBSCRIBE reaches every backend.
    for name, e in held.items():
        kept.setdefault(name, e)
    if placeholders:
        sep_b = separator.encode()
        # LIST placeholders take child flags (recomputed below); LSUB's carry none, as Dovecot's
        placeholder = (b"\\Noselect", b"\\HasChildren") if list_flags else (b"\\Noselect",)
        for name in list(kept):
            parts = name.split(separator)
            for i in range(1, len(parts)):
                parent = separator.join(parts[:i])
                if parent and parent not in kept:
                    kept[parent] = ListEntry(placeholder, sep_b, parent.encode("utf-8", "surrogateescape"), owner(parent))
    # every name with a mailbox under it, from each name's own parents: linear in the names (a
    # startswith() of each name against every other was quadratic, 5.8 s for 2,000 mailboxes)
    with_children = {separator.join(parts[:i]) for parts in (name.split(separator) for name in kept)
                     for i in range(1, len(parts))}
    if strays:  # a \Noselect parent a backend shows only for a child hidden there: no mailbox to the client
        _drop_hollow_parents(kept, with_children, strays, separator)  # (Dovecot lists none without a child)
    merged = []
    for name, e in kept.items():
        if any(f.upper() in _CHILD_FLAGS for f in e.flags):
            has = name in with_children
            flags = tuple(f for f in e.flags if f.upper() not in _CHILD_FLAGS)
            e = ListEntry(flags + ((b"\\HasChildren",) if has else (b"\\HasNoChildren",)), e.delimiter, e.name,
                          e.backend)  # (not dataclasses.replace: a sixth of a 3,000-mailbox merge)
        merged.append(e)
    return merged


def _drop_hollow_parents(kept: dict[str, ListEntry], with_children: set[str], strays: list[tuple[str, str]],
                         separator: str) -> None:
    """Remove from *kept* each ``\\Noselect`` name with no child kept whose backend holds a hidden one (a
    RENAME across set the source aside and put back a child the map sends elsewhere: its parent came
    back as ``\\Noselect``, and stayed listed after the RENAME; probe 1, stop 48)."""
    above = {(backend, separator.join(parts[:i])) for backend, name in strays
             for parts in (name.split(separator),) for i in range(1, len(parts))}
    for name, e in list(kept.items()):
        if (name not in with_children and (e.backend, name) in above
                and any(f.upper() == b"\\NOSELECT" for f in e.flags)):
            del kept[name]


def select(entries: Iterable[ListEntry], reference: bytes, pattern: bytes, separator: str, *,
           lsub_parents: bool = False) -> list[ListEntry]:
    """The entries the client's reference and pattern ask for (RFC 3501 6.3.8), matched as one
    server matches them (listmatch.py). *lsub_parents* (LSUB with ``%``, RFC 3501 6.3.9): a
    subscribed name the pattern does not match brings its nearest parent that it does match,
    as ``\\Noselect`` unless that parent is subscribed itself; as Dovecot, no other parent."""
    matches = list_matcher(pattern, separator, reference)
    out: list[ListEntry] = []
    unmatched: list[ListEntry] = []
    for e in entries:
        (out if matches(e.name) else unmatched).append(e)
    if lsub_parents:
        shown = {normalize(e.text, separator) for e in out}
        sep_b = separator.encode()
        for e in unmatched:
            parts = e.text.split(separator)
            for i in range(len(parts) - 1, 0, -1):
                parent = separator.join(parts[:i]).encode("utf-8", "surrogateescape")
                if parent and matches(parent):
                    key = normalize(parent.decode("utf-8", "surrogateescape"), separator)
                    if key not in shown:
                        shown.add(key)
                        out.append(ListEntry((b"\\Noselect",), sep_b, parent, e.backend))
                    break
    return sorted(out, key=lambda e: (normalize(e.text, separator) != "INBOX", e.text))


def format_entry(kind: bytes, entry: ListEntry, extra_flags: tuple[bytes, ...] = ()) -> bytes:
    """``* LIST (flags) "/" name`` with the name quoted, or as a literal when it must be."""
    flags = b" ".join(entry.flags + extra_flags)
    delimiter = quoted(entry.delimiter) if entry.delimiter is not None else b"NIL"
    try:
        name = quoted(entry.name)
    except ValueError:
        name = b"{%d}\r\n" % len(entry.name) + entry.name
    return b"* %s (%s) %s %s\r\n" % (kind, flags, delimiter, name)


def add_flag(raw: bytes, flag: bytes) -> bytes:
    """Insert *flag* into the attribute list of a raw ``* LIST (...)`` response."""
    i = raw.index(b"(") + 1
    return raw[:i] + flag + (b"" if raw[i:i + 1] == b")" else b" ") + raw[i:]


def is_basic_list(args: Sequence[object]) -> bool:
    """``LIST reference pattern`` with two plain strings: what the proxy evaluates itself."""
    return len(args) == 2 and all(isinstance(a, (Atom, String)) for a in args)


# -- the command, for a session ---------------------------------------------------------------


class ListHost(Protocol):
    """What a LIST needs of its session."""

    user: str
    home: str
    referral_aware: bool
    referrals_mode: str  # [proxy].referrals: aware | always | never
    mailbox_map: MailboxMap

    def relay_to(self, tag: bytes, name: str, args: Arguments, backend: str) -> None:
        """Relay the command, as *name*, to *backend* (its answer goes straight to the client)."""

    def run(self, tag: bytes, work: Coroutine[Any, Any, None]) -> None:
        """Carry out *work* with the client's input paused; failures answered for *tag*."""

    async def gather(self, backends: Sequence[str], command: bytes,
                     then: Sequence[bytes] = ()) -> list[tuple[BackendProtocol, UntaggedResponse]]:
        """Run *command* on every backend, once all are quiet: their untagged responses (*then*:
        the command's synchronizing literals, as BackendProtocol.command takes them)."""

    def send(self, data: bytes) -> None: ...

    def refuse(self, line: bytes) -> None:
        """The proxy's own refusal: after the answers of the commands before it (appends.after_answers)."""

    def write_from(self, source: object, data: bytes, end: bool = True) -> None: ...


def list_command(host: ListHost, tag: bytes, name: str, args: Arguments) -> None:
    """LIST, LSUB, RLIST, RLSUB (and LIST-EXTENDED forms) for one session."""
    kind = "LSUB" if name in ("LSUB", "RLSUB") else "LIST"
    if name in ("RLIST", "RLSUB") and not is_basic_list(args.tokens):  # RFC 2193 6: one list_mailbox, no list
        return host.refuse(b"%s BAD Invalid arguments: %s takes one pattern\r\n" % (tag, name.encode()))
    remote_option = name == "LIST" and b"REMOTE" in _selection(args)
    if (name in ("RLIST", "RLSUB") or remote_option) and host.referrals_mode == "aware":
        host.referral_aware = True
    remote = name in ("RLIST", "RLSUB") or remote_option or not host.referral_aware
    backends = host.mailbox_map.backends_for(host.user) if remote else [host.home]
    if is_basic_list(args.tokens):
        reference, pattern = (astring_value(a) for a in args.tokens)
        parents = True
        if pattern == b"" and kind == "LSUB" and reference:  # Dovecot matches the reference then, no parent
            reference, pattern, parents = b"", reference, False  # added: LSUB "%" "" (probe 5, stop 48)
        elif pattern == b"":  # the hierarchy delimiter: any backend knows it
            return host.relay_to(tag, kind, args, host.home)
        host.run(tag, _merged(host, tag, kind, reference, pattern, backends, remote, parents))
    else:
        # \Remote only where a mailbox can be remote: none with referrals = "never" (RFC 5258 3.1: REMOTE ignored)
        host.run(tag, _filtered(host, tag, kind, args, backends, remote_option and host.referrals_mode != "never", remote))


def _selection(args: Arguments) -> set[bytes]:
    """The LIST-EXTENDED selection options (RFC 5258), upper-cased."""
    options = args.values(Slot.LIST)
    if not options or not isinstance(options[0], ParenList):
        return set()
    return {t.value.upper() for t in options[0].items if isinstance(t, Atom)}


def _returned(args: Arguments) -> set[bytes]:
    """The LIST-EXTENDED return options (RFC 5258 ``RETURN (...)``), upper-cased."""
    tokens = list(args.tokens)
    for token, after in zip(tokens, tokens[1:]):
        if isinstance(token, Atom) and token.value.upper() == b"RETURN" and isinstance(after, ParenList):
            return {t.value.upper() for t in after.items if isinstance(t, Atom)}
    return set()


def _owner(host: ListHost, name: str) -> str:
    return host.mailbox_map.lookup(host.user, name).primary


VIEW_ATTEMPTS = 4  # a LIST asked again while a move's view changed during it (moveview.py)


@dataclass(frozen=True)
class _Gathered:
    """A command's answers from the backends, and the view of the moves they are to be seen by."""

    owner: Callable[[str], str]  # a name's backend as the moves in progress show it
    backends: list[str]  # those asked
    hidden: list[str] | None  # the names a move hides now (None: no move of the user's is on)
    answers: list[tuple[BackendProtocol, UntaggedResponse]]


async def _gather(host: ListHost, backends: list[str], remote: bool, command: bytes, *,
                  subscriptions: bool = False, then: Sequence[bytes] = ()) -> _Gathered:
    """*command* on *backends* (and, when every backend is asked, those showing a moved name),
    between two looks at the moves' view (moveview.py): if it changed meanwhile (a move reached its
    commit point, planned its names, ended), the backends may have answered from either side of
    it, so they are asked again. With no move of the user's on, both looks are the snapshot's."""
    sep = host.mailbox_map.separator
    view = await move_view(host.mailbox_map, host.user, subscriptions=subscriptions)
    for _attempt in range(VIEW_ATTEMPTS):
        asked = list(dict.fromkeys(backends + view.backends)) if remote else backends
        answers = await host.gather(asked, command, then) if then else await host.gather(asked, command)
        again = await move_view(host.mailbox_map, host.user, subscriptions=subscriptions)
        if again == view:
            break
        view = again
    hidden = [name for name, backend in view.shown.items() if backend == HIDDEN] if view.shown else None
    return _Gathered(view.owner(host.mailbox_map.router(host.user), sep), asked, hidden, answers)


async def _merged(host: ListHost, tag: bytes, kind: str, reference: bytes, pattern: bytes,
                  backends: list[str], remote: bool, parents: bool) -> None:
    got = await _gather(host, backends, remote, kind.encode() + b' "" "*"', subscriptions=kind == "LSUB")
    answer_merged(host, tag, kind, reference, pattern, got.answers, got.owner, got.hidden, parents=parents)


def answer_merged(host: ListHost, tag: bytes, kind: str, reference: bytes, pattern: bytes,
                  answers: Iterable[tuple[BackendProtocol, UntaggedResponse]], owner: Callable[[str], str],
                  hidden: list[str] | None, *, parents: bool = True) -> None:
    """Answer a basic LIST/LSUB from the backends' answers to ``LIST "" "*"`` (``LSUB``): each name from
    *owner*, placeholders, child flags, the client's reference and pattern (also fastnames.py's)."""
    entries = []
    for conn, r in answers:
        if r.start.name == kind:
            fragments, literals = r.arguments
            try:
                entries.append(parse_list_entry(fragments, literals, conn.name))
            except ParseError:
                log.warn("unparsable {kind} from {b}", kind=kind, b=conn.name)
        elif not _names_private(r.raw) and not (hidden is not None and r.start.status == "NO"):  # as below
            host.write_from(conn, r.raw)
    separator = host.mailbox_map.separator
    merged = merge(entries, owner, separator, placeholders=(kind == "LIST"),
                   list_flags=(kind == "LIST"))
    # Dovecot brings a subscribed name's parent only when the pattern ends with "%" (RFC 3501 6.3.9's
    # case, "%"): not for "%/Sub", "Sha%d" (each backend's own LSUB answers so, the merge as well).
    lsub_parents = parents and kind == "LSUB" and pattern.endswith(b"%")
    out = [format_entry(kind.encode(), e) for e in select(merged, reference, pattern, separator,
                                                          lsub_parents=lsub_parents)]
    host.send(b"".join(out) + b"%s OK %s completed.\r\n" % (tag, kind.encode()))


# Untagged responses a LIST-EXTENDED command may bring whose first argument is a mailbox:
# each is shown only from the backend that owns that mailbox.
_PER_MAILBOX = frozenset({"STATUS", "MYRIGHTS", "METADATA"})


async def _filtered(host: ListHost, tag: bytes, kind: str, args: Arguments, backends: list[str],
                    remote_option: bool, remote: bool) -> None:
    """LIST-EXTENDED forms: the command, re-encoded, on every backend; each mailbox from its owner."""
    subscribed = b"SUBSCRIBED" in _selection(args)  # names, not mailboxes, are selected (RFC 5258 3.1)
    # Each literal synchronizing, its "+" awaited (as relay.py writes them): a backend that refuses
    # the line before it (an 8-bit or "{" atom, a line over its limit once names are quoted) must
    # not read a literal's bytes as commands (tests/test_list_extended_literals.py).
    text, then = command_pieces(kind, args)
    got = await _gather(host, backends, remote, text, subscriptions=kind == "LSUB", then=then)
    owner, backends, hidden = got.owner, got.backends, got.hidden
    out: list[bytes] = []
    seen: set[str] = set()
    # A \NonExistent parent (RFC 5258 3.4) said by a backend that holds its children but not the
    # parent's name: shown unless the parent's owner lists the name itself. Its index in *out*.
    parents: dict[str, int] = {}
    child_flagged: dict[int, str] = {}  # an entry with \\HasChildren or \\HasNoChildren: its index, its name
    owned: dict[int, str] = {}  # every entry from its owner: its index, its name
    strays: dict[str, bytes] = {}  # a mailbox kept where its name does not route: its name, its line
    # (a pre-pass, only with an untagged NO to judge: Dovecot says a STATUS's NO before its mailbox's LIST line)
    unowned = _unowned(got.answers, owner) if any(r.start.status == "NO" for _c, r in got.answers) else {}
    for conn, r in got.answers:
        fragments, literals = r.arguments
        if r.start.name in ("LIST", "LSUB"):
            try:
                entry = parse_list_entry(fragments, literals, conn.name)
            except ParseError:
                continue
            if is_private_name(entry.name):
                continue
            if owner(entry.text) == HIDDEN and _owner(host, entry.text) == conn.name and entry.text not in seen:
                if subscribed and b"\\SUBSCRIBED" in (f.upper() for f in entry.flags):  # as Dovecot's after a RENAME
                    seen.add(entry.text)
                    out.append(_subscribed_only(r.raw))
                continue
            if owner(entry.text) != conn.name:
                flags = {f.upper() for f in entry.flags}
                if entry.text not in parents and (_NONEXISTENT in flags or subscribed and (
                        b"\\SUBSCRIBED" in flags or _CHILDINFO in r.raw.upper())):
                    # (a subscription kept where its name no longer routes: a name, as LSUB lists it, merge();
                    # or one under it, RECURSIVEMATCH: the owner, a move's destination, may not know it: probe d1)
                    parents[entry.text] = len(out)
                    if flags & _CHILD_FLAGS:  # this backend's children only: said over all of them below (a
                        child_flagged[len(out)] = entry.text  # subscribed stray's too: probe l5 F2, \\HasNoChildren)
                    if _NONEXISTENT in flags or b"\\SUBSCRIBED" not in flags:
                        out.append(r.raw)
                    else:
                        out.append(_subscribed_only(r.raw))
                elif not subscribed and _NONEXISTENT not in flags:
                    strays.setdefault(entry.text, r.raw)
                continue
            if entry.text in seen:
                continue
            seen.add(entry.text)
            owned[len(out)] = entry.text
            if any(f.upper() in _CHILD_FLAGS for f in entry.flags):
                child_flagged[len(out)] = entry.text
            out.append(add_flag(r.raw, b"\\Remote") if remote_option and conn.name != host.home else r.raw)
        elif r.start.name in _PER_MAILBOX:
            try:
                mailbox = astring_value(parse_arguments(fragments, literals)[0])
            except (ParseError, IndexError):
                continue
            if owner(mailbox.decode("utf-8", "surrogateescape")) == conn.name and not is_private_name(mailbox):
                out.append(r.raw)
        elif not _names_private(r.raw) and not (hidden is not None and r.start.status == "NO") and not (
                r.start.status == "NO" and _names_one_of(r.raw, unowned.get(conn.name, ()))):
            # (a move on: Dovecot's "* NO Mailbox was deleted under us" for the STATUS of a source it
            # renamed aside meanwhile, naming none; a warning, RFC 3501 7.1.2, about no name shown; nor the
            # "* NO Mailbox doesn't exist: Shared" of a line left out: probe l2 F2)
            out.append(r.raw)
    sep = host.mailbox_map.separator
    if strays.keys() - seen - parents.keys():  # a stray parent (Dovecot's DELETE of a parent keeps its node):
        # its children's node all the same, \NonExistent as one server lists it; it was left out (probe l2 F1)
        with_children = await _parents(host, backends, owner)
        for name, raw in strays.items():
            if name not in seen and name not in parents and normalize(name, sep) in with_children:
                parents[name] = len(out)
                out.append(_nonexistent(raw, b"CHILDREN" in _returned(args)))
    for name, i in parents.items():
        if name in seen:  # the owner said it
            out[i] = b""
        elif (hidden and any(h.startswith(normalize(name, sep) + sep) for h in hidden)
              and normalize(name, sep) not in await _parents(host, backends, owner)):
            out[i] = b""  # the parent of names a move hides now (a RENAME's new ones before its commit point)
        elif await _exists(host, name, owner):  # there, but not selected (SUBSCRIBED): not \NonExistent
            out[i] = _drop_flag(out[i], _NONEXISTENT)
        elif _NONEXISTENT not in out[i].upper():  # a mailbox where its name no longer routes: not the name's
            out[i] = add_flag(out[i], b"\\NonExistent")
    listed = {**parents, **({n: i for i, n in owned.items()} if len(backends) > 1 else {})}
    if b"SUBSCRIBED" in _returned(args) and (bare := {name: i for name, i in listed.items()
                                                    if out[i] and b"\\SUBSCRIBED" not in out[i].upper()}):
        # RETURN (SUBSCRIBED): a \NonExistent parent said by its child's backend, or a mailbox whose
        # subscription another backend keeps (its route changed since), subscribed where its name is kept
        kept = {normalize(e.text, sep) for e in await _listed(host, backends, b'LSUB "" "*"')}
        for name, i in bare.items():
            if normalize(name, sep) in kept:
                out[i] = add_flag(out[i], b"\\Subscribed")
    if child_flagged and len(backends) > 1:
        # Each backend knows only its own children (Shared on b1, Shared/Projects on b3): the
        # child flags said over every backend's mailboxes, as in the merged LIST.
        with_children = await _parents(host, backends, owner)
        for i, name in child_flagged.items():
            if not out[i]:  # (a parent's line the owner's replaced)
                continue
            flag = b"\\HasChildren" if normalize(name, sep) in with_children else b"\\HasNoChildren"
            out[i] = _child_flag(out[i], flag)
    if owned and len(backends) > 1 and b"RECURSIVEMATCH" in _selection(args):
        # RFC 5258 3.5: CHILDINFO for a subscribed descendant, wherever it is kept
        with_subscribed = await _parents(host, backends, owner, b'LSUB "" "*"')
        for i, name in owned.items():
            if normalize(name, sep) in with_subscribed:
                out[i] = _with_childinfo(out[i])
    host.send(b"".join(out) + b"%s OK %s completed.\r\n" % (tag, kind.encode()))


def command_pieces(kind: str, args: Arguments) -> tuple[bytes, list[bytes]]:
    """The command line up to its first literal's announcement, and each literal with what follows."""
    encoded = encode(args)
    frags, lits = encoded.fragments, encoded.literals
    text = kind.encode() + b" " + frags[0] + (_announce(lits[0]) if lits else b"")
    return text, [lit.value + frags[i + 1] + (_announce(lits[i + 1]) + b"\r\n" if i + 1 < len(lits) else b"\r\n")
                  for i, lit in enumerate(lits)]


async def _parents(host: ListHost, backends: list[str], owner: Callable[[str], str],
                   command: bytes = b'LIST "" "*"') -> set[str]:
    """Every name (normalized) that has a mailbox (LSUB: a subscription) under it on the backend
    that owns that mailbox."""
    sep = host.mailbox_map.separator
    found: set[str] = set()
    for entry in await _listed(host, backends, command):
        if is_private_name(entry.name) or owner(entry.text) != entry.backend:
            continue
        parts = normalize(entry.text, sep).split(sep)
        found.update(sep.join(parts[:i]) for i in range(1, len(parts)))
    return found


async def _listed(host: ListHost, backends: list[str], command: bytes) -> list[ListEntry]:
    """The ``* LIST``/``* LSUB`` entries *command* brings from *backends* (an unparsable one left out)."""
    out = []
    for conn, r in await host.gather(backends, command):
        if r.start.name in ("LIST", "LSUB"):
            try:
                out.append(parse_list_entry(*r.arguments, conn.name))
            except ParseError:
                continue
    return out


_NONEXISTENT = b"\\NONEXISTENT"
_CHILDINFO = b" (CHILDINFO "


def _with_childinfo(raw: bytes) -> bytes:
    """*raw* ``* LIST`` with ``(CHILDINFO ("SUBSCRIBED"))`` (RFC 5258 3.5) unless it has one."""
    if _CHILDINFO in raw.upper():
        return raw
    return raw[:-2] + b' (CHILDINFO ("SUBSCRIBED"))\r\n'


async def _exists(host: ListHost, name: str, owner: Callable[[str], str]) -> bool:
    """Whether *name* is a mailbox (neither \\NonExistent nor \\Noselect) on the backend that owns it."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        arg = quoted(raw)
    except ValueError:
        arg = b"{%d+}\r\n" % len(raw) + raw
    backend = owner(name)
    if not backend:
        return False  # a name a move hides now (moveview.py)
    for entry in await _listed(host, [backend], b'LIST "" ' + arg):
        if normalize(entry.text, host.mailbox_map.separator) == normalize(name, host.mailbox_map.separator):
            return not {f.upper() for f in entry.flags} & {_NONEXISTENT, b"\\NOSELECT"}
    return False


def _names_private(raw: bytes) -> bool:
    """An untagged response naming one of the proxy's private mailboxes: Dovecot's ``* NO Mailbox
    doesn't exist: referral-proxy-aside-...`` for a LIST-STATUS of one a move deleted meanwhile."""
    lowered = raw.lower()
    return STAGING_PREFIX in lowered or ASIDE_PREFIX in lowered


def _nonexistent(raw: bytes, children: bool) -> bytes:
    """*raw* ``* LIST (...)`` as the node of mailboxes under it: ``(\\NonExistent \\HasChildren)`` (Dovecot's)."""
    i, j = raw.index(b"("), raw.index(b")")
    return raw[:i] + b"(\\NonExistent" + b" \\HasChildren" * children + raw[j:]


def _unowned(answers: Iterable[tuple[BackendProtocol, UntaggedResponse]], owner: Callable[[str], str]) -> dict[str, set[bytes]]:
    """By backend: the names of its ``* LIST`` lines that name mailboxes another backend owns."""
    found: dict[str, set[bytes]] = {}
    for conn, r in answers:
        if r.start.name == "LIST":
            try:
                entry = parse_list_entry(*r.arguments, conn.name)
            except ParseError:
                continue
            if owner(entry.text) != conn.name:
                found.setdefault(conn.name, set()).add(entry.name)
    return found


def _names_one_of(raw: bytes, names: Iterable[bytes]) -> bool:
    """An untagged NO whose text ends with one of *names* (Dovecot's ``Mailbox doesn't exist: Shared``)."""
    text = raw.rstrip(b"\r\n")
    return any(text.endswith(b": " + n) or text.endswith(b': "' + n + b'"') for n in names)


def _subscribed_only(raw: bytes) -> bytes:
    """*raw* ``* LIST (...)`` of a subscribed name that is no mailbox now: ``(\\Subscribed \\NonExistent)``
    (then ``\\HasNoChildren`` if child flags were asked for), as Dovecot lists the old name of a mailbox
    renamed (its subscription stays: RFC 3501 6.3.6)."""
    i, j = raw.index(b"("), raw.index(b")")
    children = b" \\HasNoChildren" if _CHILD_FLAGS & {f.upper() for f in raw[i + 1:j].split()} else b""
    return raw[:i] + b"(\\Subscribed \\NonExistent" + children + raw[j:]  # (Dovecot's order)


def _child_flag(raw: bytes, flag: bytes) -> bytes:
    """*raw* ``* LIST (...)`` with *flag* for its child flag, where that was (Dovecot's order of attributes)."""
    i, j = raw.index(b"(") + 1, raw.index(b")")
    flags = raw[i:j].split()
    at = next((k for k, f in enumerate(flags) if f.upper() in _CHILD_FLAGS), None)
    if at is None:
        return add_flag(raw, flag)
    return raw[:i] + b" ".join([*flags[:at], flag, *flags[at + 1:]]) + raw[j:]


def _drop_flag(raw: bytes, flag: bytes) -> bytes:
    """*raw* ``* LIST (...)`` without *flag* (any case) in its attribute list."""
    i, j = raw.index(b"(") + 1, raw.index(b")")
    kept = [f for f in raw[i:j].split() if f.upper() != flag]
    return raw[:i] + b" ".join(kept) + raw[j:]


def _announce(lit: String) -> bytes:
    """A literal's synchronizing announcement, without its CRLF."""
    return b"%s{%d}" % (b"~" if lit.binary else b"", len(lit.value))
