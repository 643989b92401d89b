"""The declared command table: every command the proxy accepts, and how it is routed.

One row per command says in which states it is allowed, its argument grammar
(which arguments are mailboxes, destinations, patterns: see imap.grammar), how it
is routed, whether its responses refer back to its tag, which capability brings it,
and the session handler that carries it out. Commands not in the table are
answered ``BAD`` and reach no backend. The capabilities announced after login are
derived from the same table: a backend capability is relayed only when every
command it brings is declared here (:data:`CAPABILITIES`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import Enum
from functools import lru_cache

from .imap.command import Atom, ParenList
from .imap.grammar import Arguments, Grammar
from .imap.reader import Command

__all__ = ["State", "Routing", "CommandSpec", "COMMANDS", "Capability", "CAPABILITIES", "NOT_RELAYED",
           "PROXY_OWN", "relayable", "post_login_capabilities", "enabling", "enables_condstore", "CONDSTORE_ATOMS"]


class State(Enum):
    NOT_AUTHENTICATED = "not authenticated"
    AUTHENTICATED = "authenticated"
    SELECTED = "selected"

    __hash__ = object.__hash__  # identity, in C (see flow.Block)


class Routing(Enum):
    """Where a command goes (after login; before it the proxy answers everything itself)."""

    PROXY = "answered by the proxy"
    HOME = "the user's home backend"
    SELECTED = "the backend of the selected mailbox (home if none)"
    MAILBOX = "the backend that owns its mailbox argument (referred in a referral-aware session)"
    TRANSFER = "the selected backend if the destination lives there; else copied across by the proxy"
    EACH = "each mailbox's backend: relayed if both live on one, moved across by the proxy if not"
    MERGED = "every backend that holds the user's mailboxes, merged"
    STREAMED = "streamed to its mailbox's backend, message by message"

    __hash__ = object.__hash__  # identity, in C (see flow.Block)


PRE = frozenset({State.NOT_AUTHENTICATED})
ANY = frozenset(State)
AUTH = frozenset({State.AUTHENTICATED, State.SELECTED})
SEL = frozenset({State.SELECTED})


@dataclass(frozen=True)
class CommandSpec:
    name: str
    states: frozenset[State]
    grammar: Grammar
    routing: Routing
    capability: str
    handler: str  # what carries it out: "x" is ClientSession.cmd_x, "mailboxes.x" session.mailboxes.x
    tag_refs: bool = False  # its responses name its tag: ESEARCH (TAG "...") (RFC 4731, 5267)
    tag_args: bool = False  # its arguments are tags of earlier commands (CANCELUPDATE)
    # RFC 2193 4.1-4.4 (and RFC 6851 for MOVE) name it: a referral-aware session is referred for a remote
    # mailbox. Other commands on a remote mailbox (ACL, QUOTA, METADATA) are proxied to its backend, which
    # answers them as directly (arguments the proxy does not check: SETACL's rights, METADATA entries).
    referred: bool = False


_DEFAULT_HANDLER = {Routing.HOME: "to_home", Routing.SELECTED: "to_selected", Routing.MAILBOX: "mailboxes.by_mailbox"}


def _spec(name: str, states: frozenset[State], grammar: str, routing: Routing, capability: str = "IMAP4rev1",
          handler: str | None = None, **flags: bool) -> CommandSpec:
    return CommandSpec(name, states, Grammar.parse(grammar), routing, capability,
                       handler or _DEFAULT_HANDLER[routing], **flags)


_ROWS = [
    # -- any state ------------------------------------------------------------------
    _spec("CAPABILITY", ANY, "", Routing.PROXY, handler="capability"),
    _spec("NOOP", ANY, "", Routing.SELECTED, handler="noop"),
    _spec("LOGOUT", ANY, "", Routing.PROXY, handler="logout"),
    _spec("ID", ANY, "any", Routing.HOME, "ID", handler="id"),
    # -- not authenticated ------------------------------------------------------------
    _spec("STARTTLS", PRE, "", Routing.PROXY, handler="starttls"),
    _spec("LOGIN", PRE, "astring astring", Routing.PROXY, handler="auth.login"),
    _spec("AUTHENTICATE", PRE, "atom atom?", Routing.PROXY, handler="auth.authenticate"),
    # -- authenticated ----------------------------------------------------------------
    _spec("SELECT", AUTH, "mailbox list?", Routing.MAILBOX, handler="selection.select", referred=True),
    _spec("EXAMINE", AUTH, "mailbox list?", Routing.MAILBOX, handler="selection.select", referred=True),
    _spec("CREATE", AUTH, "mailbox list?", Routing.MAILBOX, referred=True),  # the list: CREATE-SPECIAL-USE
    _spec("DELETE", AUTH, "mailbox", Routing.MAILBOX, referred=True),
    _spec("RENAME", AUTH, "mailbox dest", Routing.EACH, handler="mailboxes.rename", referred=True),
    _spec("SUBSCRIBE", AUTH, "mailbox", Routing.MAILBOX, referred=True),
    _spec("UNSUBSCRIBE", AUTH, "mailbox", Routing.MAILBOX, referred=True),
    _spec("LIST", AUTH, "list? reference pattern any*", Routing.MERGED, handler="list"),  # LIST-EXTENDED
    _spec("LSUB", AUTH, "reference pattern", Routing.MERGED, handler="list"),
    _spec("STATUS", AUTH, "mailbox list", Routing.MAILBOX, referred=True),
    _spec("APPEND", AUTH, "mailbox any+", Routing.STREAMED, handler="append", referred=True),  # read by imap.reader
    _spec("RLIST", AUTH, "reference pattern", Routing.MERGED, "MAILBOX-REFERRALS", handler="list"),
    _spec("RLSUB", AUTH, "reference pattern", Routing.MERGED, "MAILBOX-REFERRALS", handler="list"),
    _spec("ENABLE", AUTH, "atom*", Routing.HOME, "ENABLE", handler="enable"),
    _spec("NAMESPACE", AUTH, "", Routing.HOME, "NAMESPACE"),
    _spec("IDLE", AUTH, "", Routing.SELECTED, "IDLE", handler="idle"),
    _spec("GETQUOTA", AUTH, "astring", Routing.HOME, "QUOTA"),
    _spec("SETQUOTA", AUTH, "astring list", Routing.HOME, "QUOTA"),
    _spec("GETQUOTAROOT", AUTH, "mailbox", Routing.MAILBOX, "QUOTA"),
    _spec("SETACL", AUTH, "mailbox astring astring", Routing.MAILBOX, "ACL"),
    _spec("DELETEACL", AUTH, "mailbox astring", Routing.MAILBOX, "ACL"),
    _spec("GETACL", AUTH, "mailbox", Routing.MAILBOX, "ACL"),
    _spec("LISTRIGHTS", AUTH, "mailbox astring", Routing.MAILBOX, "ACL"),
    _spec("MYRIGHTS", AUTH, "mailbox", Routing.MAILBOX, "ACL"),
    _spec("GETMETADATA", AUTH, "list? mailbox any+", Routing.MAILBOX, "METADATA"),
    _spec("SETMETADATA", AUTH, "mailbox list", Routing.MAILBOX, "METADATA"),
    # -- selected ----------------------------------------------------------------------
    _spec("CHECK", SEL, "", Routing.SELECTED),
    _spec("CLOSE", SEL, "", Routing.SELECTED, handler="selection.close"),
    _spec("UNSELECT", SEL, "", Routing.SELECTED, "UNSELECT", handler="selection.close"),
    _spec("EXPUNGE", SEL, "", Routing.SELECTED, handler="mailboxes.change"),
    _spec("UID EXPUNGE", SEL, "seqset", Routing.SELECTED, "UIDPLUS", handler="mailboxes.change"),
    _spec("SEARCH", SEL, "any+", Routing.SELECTED, tag_refs=True),
    _spec("UID SEARCH", SEL, "any+", Routing.SELECTED, tag_refs=True),
    _spec("FETCH", SEL, "seqset any+", Routing.SELECTED),
    _spec("UID FETCH", SEL, "seqset any+", Routing.SELECTED),
    _spec("STORE", SEL, "seqset any+", Routing.SELECTED, handler="mailboxes.change"),
    _spec("UID STORE", SEL, "seqset any+", Routing.SELECTED, handler="mailboxes.change"),
    _spec("COPY", SEL, "seqset dest", Routing.TRANSFER, handler="copies.copy", referred=True),
    _spec("UID COPY", SEL, "seqset dest", Routing.TRANSFER, handler="copies.copy", referred=True),
    _spec("MOVE", SEL, "seqset dest", Routing.TRANSFER, "MOVE", handler="copies.copy", referred=True),
    _spec("UID MOVE", SEL, "seqset dest", Routing.TRANSFER, "MOVE", handler="copies.copy", referred=True),
    _spec("SORT", SEL, "any+", Routing.SELECTED, "SORT", tag_refs=True),
    _spec("UID SORT", SEL, "any+", Routing.SELECTED, "SORT", tag_refs=True),
    _spec("THREAD", SEL, "astring astring any+", Routing.SELECTED, "THREAD="),
    _spec("UID THREAD", SEL, "astring astring any+", Routing.SELECTED, "THREAD="),
    _spec("CANCELUPDATE", SEL, "quoted+", Routing.SELECTED, "CONTEXT=SEARCH", handler="cancel_update",
          tag_args=True),
]

COMMANDS: dict[str, CommandSpec] = {spec.name: spec for spec in _ROWS}

#: Words whose use enables CONDSTORE on a connection for good (RFC 7162 3.1: SELECT (CONDSTORE),
#: STATUS (HIGHESTMODSEQ), FETCH/SEARCH MODSEQ, FETCH CHANGEDSINCE, STORE UNCHANGEDSINCE) or QRESYNC,
#: anywhere in a command's arguments (a match in a string too: keepalive.py only loses a reuse).
CONDSTORE_WORDS = re.compile(rb"(?i)modseq|changedsince|condstore|qresync")
#: Those words as a command's own atoms (not inside a string): the command enables CONDSTORE for the rest
#: of the session (RFC 7162 3.1), on every backend of it (pool.condstore_used). On a plain line, and as a token.
CONDSTORE_ATOMS = re.compile(rb"(?i)(?<![^ (])(?:highestmodseq|modseq|changedsince|unchangedsince|condstore)(?![^ )])")


def enables_condstore(tokens: Iterable[object]) -> bool:
    """Does a command with these argument tokens enable CONDSTORE (SELECT (CONDSTORE), STATUS (HIGHESTMODSEQ),
    FETCH (MODSEQ), CHANGEDSINCE, UNCHANGEDSINCE, SEARCH MODSEQ)? Atoms only: a string may say anything."""
    for tok in tokens:
        if type(tok) is Atom and CONDSTORE_ATOMS.fullmatch(tok.value) is not None:
            return True
        if isinstance(tok, ParenList) and enables_condstore(tok.items):
            return True
    return False


@dataclass(frozen=True)
class Capability:
    """A backend capability the proxy relays, and the commands it brings (all declared above)."""

    name: str  # ends with "=" for a family (SORT=DISPLAY, THREAD=REFS ...)
    commands: tuple[str, ...] = ()


def _caps(*rows: tuple[str, tuple[str, ...]] | str) -> dict[str, Capability]:
    out = {}
    for row in rows:
        name, commands = (row, ()) if isinstance(row, str) else row
        out[name] = Capability(name, commands)
    return out


#: Relayed when the home backend announces them. Most only change responses or add
#: arguments to commands above; those that bring commands name them.
CAPABILITIES = _caps(
    ("ACL", ("SETACL", "DELETEACL", "GETACL", "LISTRIGHTS", "MYRIGHTS")), "RIGHTS=",
    "APPENDLIMIT", "APPENDLIMIT=", "BINARY", "CHILDREN", "CONDSTORE", "CREATE-SPECIAL-USE",
    ("ENABLE", ("ENABLE",)), "ESEARCH", ("ESORT", ("SORT", "UID SORT")),
    ("CONTEXT=SEARCH", ("CANCELUPDATE",)), ("CONTEXT=SORT", ("CANCELUPDATE", "SORT", "UID SORT")),
    "I18NLEVEL=1", ("IDLE", ("IDLE",)), "LIST-EXTENDED", "LIST-MYRIGHTS", "LIST-STATUS", "LIST-METADATA",
    ("METADATA", ("GETMETADATA", "SETMETADATA")), ("METADATA-SERVER", ("GETMETADATA", "SETMETADATA")),
    ("MOVE", ("MOVE", "UID MOVE")), ("MULTIAPPEND", ("APPEND",)), ("NAMESPACE", ("NAMESPACE",)),
    "OBJECTID", "PARTIAL", "PREVIEW", "PREVIEW=", "SNIPPET=", "QRESYNC",
    ("QUOTA", ("GETQUOTA", "GETQUOTAROOT", "SETQUOTA")), "QUOTA=", "QUOTASET",
    "SAVEDATE", "SEARCHRES", ("SORT", ("SORT", "UID SORT")), "SORT=", "SPECIAL-USE", "STATUS=SIZE",
    ("THREAD=", ("THREAD", "UID THREAD")), ("UIDPLUS", ("UID EXPUNGE",)), ("UNSELECT", ("UNSELECT",)),
    "UTF8=ACCEPT", "WITHIN",
)

#: Announced by the proxy itself, whatever the backend has.
PROXY_OWN = ("IMAP4rev1", "LITERAL+", "ID", "MAILBOX-REFERRALS", "MULTIAPPEND")

#: Never relayed, and why (a client that needs one loses what it brings).
NOT_RELAYED = {
    "COMPRESS=": "changes the byte stream under the proxy's codec",
    "STARTTLS": "before login: the proxy's own", "LOGINDISABLED": "before login: the proxy's own",
    "AUTH=": "before login: the proxy's own", "SASL-IR": "before login: the proxy's own",
    "LOGIN-REFERRALS": "before login: the proxy's own",
    "UNAUTHENTICATE": "would log the backend out while the proxy believes it logged in",
    "NOTIFY": "events of mailboxes on other backends cannot be merged yet",
    "LITERAL-": "the proxy offers LITERAL+ itself", "LITERAL+": "the proxy offers LITERAL+ itself",
    "IMAP4rev2": "the proxy speaks IMAP4rev1 toward clients",
    "CATENATE": "APPEND's CATENATE parts are not streamed; their URLs may name mailboxes of other backends",
    "URL-PARTIAL": "URLs name mailboxes of any backend: URLFETCH and CATENATE are not routed",
    "URLAUTH": "GENURLAUTH / URLFETCH / RESETKEY are not routed", "URLAUTH=": "as URLAUTH",
    "MULTISEARCH": "ESEARCH IN (...) spans mailboxes of several backends: not merged",
    "REPLACE": "its APPEND half may target another backend than the message it replaces: not streamed",
    "I18NLEVEL=2": "its COMPARATOR command is not routed", "LANGUAGE": "its LANGUAGE command is not routed",
    "XLIST": "LIST with SPECIAL-USE says the same", "UTF8=ONLY": "the proxy speaks IMAP4rev1 toward clients",
}


def _capability(name: str) -> Capability | None:
    up = name.upper()
    cap = CAPABILITIES.get(up)
    if cap is not None:
        return cap
    family = up.split("=", 1)[0] + "=" if "=" in up else None
    return CAPABILITIES.get(family) if family else None


@lru_cache(maxsize=1024)
def relayable(name: str) -> bool:
    """True if *name*, as a backend announces it, is relayed: declared, and all its commands too."""
    up = name.upper()
    if up in NOT_RELAYED:
        return False
    cap = _capability(up)
    return cap is not None and all(c in COMMANDS for c in cap.commands)


def post_login_capabilities(backend_caps: Iterable[str], *, mailbox_referrals: bool = True) -> list[str]:
    """The proxy's own capabilities followed by the relayable ones of the home backend.

    Without referrals (``referrals = "never"``) MAILBOX-REFERRALS is not announced:
    a proxy that never refers should not invite RLIST."""
    return list(_post_login(tuple(backend_caps), mailbox_referrals))


@lru_cache(maxsize=64)
def _post_login(backend_caps: tuple[str, ...], mailbox_referrals: bool) -> tuple[str, ...]:
    """Computed once per backend capability list (every login and CAPABILITY asks)."""
    caps = [c for c in PROXY_OWN if mailbox_referrals or c != "MAILBOX-REFERRALS"]
    seen = {c.upper() for c in caps}
    for cap in backend_caps:
        up = cap.upper()
        if up not in seen and relayable(up):
            caps.append(cap)
            seen.add(up)
    return tuple(caps)


def enabling(cmd: Command) -> Command:
    """An ENABLE with only the capabilities the proxy relays (RFC 5161: a server ignores names
    it does not know): ``* ENABLED`` never names one the proxy does not announce, and a backend
    is never switched into a mode the proxy does not speak (ENABLE IMAP4rev2, UTF8=ONLY)."""
    kept = tuple(t for t in cmd.args.tokens if isinstance(t, Atom) and relayable(t.value.decode("ascii", "replace")))
    if len(kept) == len(cmd.args.tokens):
        return cmd
    return replace(cmd, args=Arguments(kept, cmd.args.slots[:len(kept)]))
