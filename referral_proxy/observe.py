"""What the running proxy counts and tells: one Observer a process.

Sessions call it through a few one-line hooks (a session starts and ends, bytes in
and out at the one place the client's bytes are written, a command starts, a login
ends, a transfer runs); the service's backend connector tells it about backend
connections. It keeps plain counters (the reactor is single-threaded: no locks on the
hot path), which /metrics turns into Prometheus families at scrape time
(``metrics.py``), and writes one structured event a session start, end, login,
referral and transfer (``logs.py`` formats them as text or JSON).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.logger import Logger, LogLevel

from .imap.command import CommandStart
from .origin import LoopGuard, Origin, id_arguments, id_command

__all__ = [
    "EVENTS_NAMESPACE",
    "COMMAND_BUCKETS",
    "KNOWN_COMMANDS",
    "LOGIN_RESULTS",
    "REFUSAL_REASONS",
    "TRANSFER_KINDS",
    "Observer",
    "SessionRecord",
]

EVENTS_NAMESPACE = "referral_proxy.events"

# Upper bounds (seconds) of referral_proxy_command_seconds' buckets.
COMMAND_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Command names counted under their own label; any other name counts as "OTHER" (a
# client must not be able to grow the label set).
KNOWN_COMMANDS = frozenset({
    "APPEND", "AUTHENTICATE", "CAPABILITY", "CHECK", "CLOSE", "COPY", "CREATE", "DELETE", "DELETEACL",
    "ENABLE", "EXAMINE", "EXPUNGE", "FETCH", "GETACL", "GETMETADATA", "GETQUOTA", "GETQUOTAROOT", "ID",
    "IDLE", "LIST", "LISTRIGHTS", "LOGIN", "LOGOUT", "LSUB", "MOVE", "MYRIGHTS", "NAMESPACE", "NOOP",
    "RENAME", "RLIST", "RLSUB", "SEARCH", "SELECT", "SETACL", "SETMETADATA", "SETQUOTA", "SORT",
    "STARTTLS", "STATUS", "STORE", "SUBSCRIBE", "THREAD", "UID COPY", "UID EXPUNGE", "UID FETCH",
    "UID MOVE", "UID SEARCH", "UID SORT", "UID STORE", "UID THREAD", "UNSELECT", "UNSUBSCRIBE",
})
LOGIN_RESULTS = ("ok", "failed", "referred", "unavailable", "limit")
# Why connections are refused before their session starts (admission.Admission).
REFUSAL_REASONS = ("max_connections", "max_connections_per_ip", "max_unauthenticated_per_ip")
TRANSFER_KINDS = ("copy", "move", "rename", "admin_move")
_STATUSES = {b"OK": "ok", b"NO": "no"}
# What the proxy said last with "* BYE", to how the session ended (any other BYE: one
# relayed from a backend that went away).
_BYE_OUTCOMES = ((b"* BYE Logging out", "logout"), (b"* BYE Autologout", "login_timeout"),
                 (b"* BYE Too many commands before login", "too_many_commands"),
                 (b"* BYE Too long command", "too_long_command"))
# Commands awaiting their answer, per session: more are not timed (a bound, whatever happens).
MAX_PENDING = 1000


class _Meter:
    """One command name's answers: the count, the latency histogram and its sum, folded
    as each answer comes (a command's pending entry holds its meter: no lookup then).
    Answers that are not OK are also counted by result in Observer._commands_total."""

    __slots__ = ("name", "n", "buckets", "seconds", "not_ok")

    def __init__(self, name: str) -> None:
        self.name = name
        self.n = 0  # answers of every result (the histogram's count)
        self.buckets = [0] * (len(COMMAND_BUCKETS) + 1)  # +Inf last
        self.seconds = 0.0
        self.not_ok = 0  # answers NO or BAD


@dataclass(eq=False, slots=True)
class SessionRecord:
    """What the Observer keeps of one live client session."""

    session: Any
    id: int
    started: float
    origin: Origin
    bytes_in: int = 0
    bytes_out: int = 0
    pending: list[tuple[bytes, _Meter, float]] = field(default_factory=list)  # (tag + b" ", its meter, started)
    bye: bytes = b""
    outcome: str | None = None  # set when the proxy ended it without a BYE (an aborted login timeout)

    def context(self) -> dict[str, Any]:
        """session, user, client, backend: the fields every event of this session carries."""
        s = self.session
        return {
            "session": self.id,
            "user": getattr(s, "user", None),
            "client": self.origin.client,
            "backend": getattr(s, "selected", None) or getattr(s, "home", None),
        }


class Observer:
    """Counts and events of one proxy process (see the module docstring)."""

    def __init__(self, guard: LoopGuard | None = None, *, clock: Callable[[], float] = time.monotonic,
                 backends: tuple[str, ...] = ()) -> None:
        self.guard = guard
        self.clock = clock
        self.log = Logger(namespace=EVENTS_NAMESPACE)
        self._live: dict[Any, SessionRecord] = {}
        self._by_id: dict[int, SessionRecord] = {}
        self.sessions_total: dict[str, int] = {}
        self.logins_total: dict[str, int] = dict.fromkeys(LOGIN_RESULTS, 0)
        self._commands_total: dict[tuple[str, str], int] = {}  # answers NO and BAD (OK ones: the meters)
        self._meters: dict[str, _Meter] = {"OTHER": _Meter("OTHER")}  # KNOWN_COMMANDS and OTHER
        self.referrals_total: dict[str, int] = {}
        self.connect_failures: dict[str, int] = dict.fromkeys(backends, 0)
        self.transfers_total: dict[tuple[str, str], int] = {}
        self.transfer_bytes: dict[str, int] = dict.fromkeys(TRANSFER_KINDS, 0)
        self.bytes_client_in = 0
        self.bytes_client_out = 0
        self._backend_bytes_closed = [0, 0]  # (in, out) of backend connections already closed
        self._backends: set[Any] = set()
        self._prune_at = 64  # closed connections are dropped from _backends when it grows this big
        self.stopping = False  # the service is shutting down: sessions end with outcome "shutdown"
        self.refusals_total: dict[str, int] = dict.fromkeys(REFUSAL_REASONS, 0)
        self.login_delays_total = 0
        self.login_delay_seconds = 0.0
        self.map_store_up = True  # the map store (PostgreSQL) reachable; routing goes on from the cache if not
        self.map_store_outages = 0

    # -- sessions -------------------------------------------------------------

    @property
    def sessions(self) -> int:
        return len(self._live)

    def session_started(self, session: Any) -> None:
        transport = session.transport
        origin = (self.guard.origin(transport, session.id) if self.guard is not None
                  else Origin.of(transport, f"rp-{session.id}", 5))
        rec = SessionRecord(session, session.id, self.clock(), origin)
        self._live[session] = rec
        self._by_id[rec.id] = rec
        self._event("session_start", rec, "session start", local=origin.local)

    def session_ended(self, session: Any) -> None:
        rec = self._live.pop(session, None)
        if rec is None:
            return
        outcome = rec.outcome or next((o for prefix, o in _BYE_OUTCOMES if rec.bye.startswith(prefix)),
                                      "shutdown" if self.stopping else "backend_lost" if rec.bye else "client_closed")
        self.sessions_total[outcome] = self.sessions_total.get(outcome, 0) + 1
        self._event("session_end", rec, "session end", outcome=outcome,
                    seconds=round(self.clock() - rec.started, 3), bytes_in=rec.bytes_in, bytes_out=rec.bytes_out)
        self._by_id.pop(rec.id, None)

    def refused(self, transport: Any, reason: str) -> None:
        """A connection refused before its session started (too many): counted and logged."""
        self.refusals_total[reason] = self.refusals_total.get(reason, 0) + 1
        origin = Origin.of(transport, "", 0)
        self.log.emit(LogLevel.warn, "connection refused", rp_event="refused",
                      rp_fields={"client": origin.client, "reason": reason})

    def timed_out(self, session: Any) -> None:
        """The proxy ends *session* for want of a login in time (with or without a BYE)."""
        rec = self._live.get(session)
        if rec is not None:
            rec.outcome = "login_timeout"

    def login_delayed(self, session: Any, user: str, seconds: float) -> None:
        """A login waits for the failed-login penalty of its address or user."""
        self.login_delays_total += 1
        self.login_delay_seconds += seconds
        rec = self._live.get(session)
        if rec is not None:
            self._event("login_delay", rec, "login delayed", user=user, seconds=seconds)

    def origin(self, session: Any) -> Origin | None:
        rec = self._live.get(session)
        return rec.origin if rec is not None else None

    def context(self, session_id: int) -> dict[str, Any] | None:
        """The fields of a live session, for log events that only name its id."""
        rec = self._by_id.get(session_id)
        return rec.context() if rec is not None else None

    # -- the client's bytes (the hot path: keep it short) ----------------------------------

    def client_in(self, session: Any, data: bytes) -> None:
        rec = self._live.get(session)
        if rec is not None:
            n = len(data)
            rec.bytes_in += n
            self.bytes_client_in += n

    def written_to(self, session: Any) -> int:
        """The bytes written to *session*'s client so far (stayalive.Waiting: has it heard anything?)."""
        rec = self._live.get(session)
        return 0 if rec is None else rec.bytes_out

    def read_from(self, session: Any) -> int:
        """The bytes read from *session*'s client so far (unread.py: is it still sending?)."""
        rec = self._live.get(session)
        return 0 if rec is None else rec.bytes_in

    def client_out(self, session: Any, data: bytes) -> None:
        """Everything written to the client: counted, and the completion of a command
        found (the last line of a write that ends a response)."""
        rec = self._live.get(session)
        if rec is None:
            return
        n = len(data)
        rec.bytes_out += n
        self.bytes_client_out += n
        pending = rec.pending
        if pending and data.endswith(b"\r\n"):  # no slices: nothing allocated per write
            tag = pending[0][0]
            if data.startswith(tag) and data.startswith(b"OK ", len(tag)):
                # the usual answer, inline: the oldest command's OK in a write of its own
                _, meter, started = pending.pop(0)
                took = self.clock() - started
                meter.n += 1
                meter.buckets[bisect.bisect_left(COMMAND_BUCKETS, took)] += 1
                meter.seconds += took
            else:
                self._completion(rec, data)
        if data.startswith(b"* BYE"):
            rec.bye = data

    def command(self, session: Any, start: CommandStart) -> None:
        """A command line was read: its completion will be timed and counted."""
        self.command_named(session, start.tag, start.name)

    def command_named(self, session: Any, tag: bytes, name: str) -> None:
        """The same, from the tag and the name (the fast path has no CommandStart)."""
        rec = self._live.get(session)
        if rec is not None and len(rec.pending) < MAX_PENDING:
            meter = self._meters.get(name)
            if meter is None:  # the first of a known name, or a name counted as OTHER (never kept)
                meter = self._meters["OTHER"] if name not in KNOWN_COMMANDS else self._meters.setdefault(name, _Meter(name))
            rec.pending.append((tag + b" ", meter, self.clock()))

    def _completion(self, rec: SessionRecord, data: bytes) -> None:
        """Count the command whose tagged answer ends *data*, if one does.

        A tagged answer is a write of its own (it starts with the tag) or the last line of
        a longer one (a merged LIST); literal data that happens to end a line is looked
        at no further back than 512 bytes."""
        pending = rec.pending
        oldest = pending[0][0]
        if data.startswith(oldest):  # the usual case: the oldest command answered, in a write of its own
            return self._answered(rec, 0, data, len(oldest))
        for i in range(1, len(pending)):
            if data.startswith(pending[i][0]):
                return self._answered(rec, i, data, len(pending[i][0]))
        end = len(data) - 2
        start = data.rfind(b"\n", max(0, end - 512), end) + 1
        if start == 0:
            return
        for i in range(len(pending)):
            if data.startswith(pending[i][0], start):
                return self._answered(rec, i, data, start + len(pending[i][0]))

    def _answered(self, rec: SessionRecord, i: int, data: bytes, pos: int) -> None:
        """*data*[pos:] is the status of the answer to rec.pending[i]."""
        if data.startswith(b"OK", pos):  # the usual cases first, without a slice
            result = "ok"
        elif data.startswith(b"NO", pos):
            result = "no"
        else:
            status = data[pos:pos + 3].upper()
            if status[:2] in _STATUSES:
                result = _STATUSES[status[:2]]
            elif status == b"BAD":
                result = "bad"
            else:
                return
        _, meter, started = rec.pending.pop(i)
        took = self.clock() - started
        meter.n += 1
        meter.buckets[bisect.bisect_left(COMMAND_BUCKETS, took)] += 1
        meter.seconds += took
        name = meter.name
        if result != "ok":
            meter.not_ok += 1
            key = (name, result)
            self._commands_total[key] = self._commands_total.get(key, 0) + 1
        if result == "no" and data[pos + 3:pos + 13].upper() == b"[REFERRAL ":
            self.referrals_total[name] = self.referrals_total.get(name, 0) + 1
            urls = data[pos + 13:data.find(b"]", pos)].decode("ascii", "replace").split()
            self._event("referral", rec, "referral", command=name, urls=urls)

    def flush(self) -> None:
        """Nothing is buffered any more (each answer is folded into its meter as it comes);
        kept for callers that made sure of the counts (testing/memtrace.py)."""

    @property
    def commands_total(self) -> dict[tuple[str, str], int]:
        """(command, result) -> answers, for the commands answered at least once."""
        out = dict(self._commands_total)
        for name, m in self._meters.items():
            if m.n > m.not_ok:
                out[(name, "ok")] = m.n - m.not_ok
        return out

    @property
    def command_seconds(self) -> dict[str, tuple[list[int], list[float]]]:
        """command -> ([count per bucket of COMMAND_BUCKETS, +Inf last], [sum of seconds])."""
        return {name: (list(m.buckets), [m.seconds]) for name, m in self._meters.items() if m.n}

    # -- logins, the loop guard -------------------------------------------------------------

    def client_id(self, session: Any, args: Any) -> None:
        """The client's ID before login (a trusted upstream tells who the client is)."""
        rec = self._live.get(session)
        if rec is not None and self.guard is not None:
            self.guard.received_id(rec.origin, id_arguments(args))

    def refuses_login(self, session: Any, tag: bytes, user: str) -> bool:
        """True (and the client answered) when this login would make a proxy loop: the
        client (a proxy) spent the TTL or sent our own session back, or every backend of
        the user's home is this proxy's own listener."""
        rec = self._live.get(session)
        if rec is None or self.guard is None:
            return False
        why = rec.origin.loop
        if why is None and self.guard.any_self(session.config):
            home = [session.config.backends[n] for n in session.mailbox_map.home(user).backends
                    if n in session.config.backends]
            if home and all(self.guard.is_self(b) for b in home):
                why = f"backend {home[0].name} ({home[0].endpoint}) is this proxy's own listener"
        if why is None:
            return False
        session.tagged(tag, "NO", f"[UNAVAILABLE] Proxy loop detected: {why}; login refused")
        self.login(session, user, None, "unavailable", why="proxy loop")
        return True

    def login(self, session: Any, user: str | None, backend: str | None, result: str, **more: Any) -> None:
        self.logins_total[result] = self.logins_total.get(result, 0) + 1
        rec = self._live.get(session)
        if rec is not None:
            fields = {"user": user, "backend": backend}
            level = LogLevel.info if result in ("ok", "referred") else LogLevel.warn
            self._event("login", rec, "login", result=result, level=level, **fields, **more)

    def id_for_backend(self, session: Any) -> bytes | None:
        """The ``ID (...)`` to send a backend of *session* before its login, or None."""
        rec = self._live.get(session)
        return id_command(rec.origin) if rec is not None else None

    # -- backend connections ----------------------------------------------------------------

    def map_store_available(self, up: bool) -> None:
        """The map store went away (routing continues from the cache) or came back."""
        if self.map_store_up and not up:
            self.map_store_outages += 1
        self.map_store_up = up

    def backend_opened(self, proto: Any) -> None:
        self._backends.add(proto)
        if len(self._backends) >= self._prune_at:  # without scrapes too: closed ones must not pile up
            self._prune()
            self._prune_at = 2 * len(self._backends) + 64

    def connect_failed(self, backend: str) -> None:
        self.connect_failures[backend] = self.connect_failures.get(backend, 0) + 1

    def backend_connections(self) -> int:
        self._prune()
        return len(self._backends)

    def backend_bytes(self) -> tuple[int, int]:
        """(received from, sent to) backends, all connections made for clients."""
        self._prune()
        live_in = sum(getattr(p, "bytes_in", 0) for p in self._backends)
        live_out = sum(getattr(p, "bytes_out", 0) for p in self._backends)
        return self._backend_bytes_closed[0] + live_in, self._backend_bytes_closed[1] + live_out

    def _prune(self) -> None:
        for proto in [p for p in self._backends if p.closed]:
            self._backends.discard(proto)
            self._backend_bytes_closed[0] += getattr(proto, "bytes_in", 0)
            self._backend_bytes_closed[1] += getattr(proto, "bytes_out", 0)

    # -- transfers --------------------------------------------------------------------------

    async def transfer(self, session: Any, kind: str, work: Awaitable[Any], **details: Any) -> Any:
        """Run *work* (a cross-server COPY / MOVE / RENAME), then count and log it.

        Its result may carry ``status`` ("OK"/"NO") and ``bytes`` (CopyOutcome, MoveResult)."""
        kind = {"COPY": "copy", "UID COPY": "copy", "MOVE": "move", "UID MOVE": "move"}.get(kind, kind)
        started = self.clock()
        try:
            outcome = await work
        except BaseException as e:
            self.transferred(session, kind, "failed", 0, started, why=str(e) or type(e).__name__, **details)
            raise
        result = "ok" if getattr(outcome, "status", "OK") == "OK" else "failed"
        why = None if result == "ok" else getattr(outcome, "text", None)  # a refusal answered, not raised
        self.transferred(session, kind, result, getattr(outcome, "bytes", 0), started,
                         messages=getattr(outcome, "messages", None), why=why, **details)
        return outcome

    def transferred(self, session: Any, kind: str, result: str, nbytes: int, started: float, **details: Any) -> None:
        key = (kind, result)
        self.transfers_total[key] = self.transfers_total.get(key, 0) + 1
        self.transfer_bytes[kind] = self.transfer_bytes.get(kind, 0) + nbytes
        rec = self._live.get(session)
        if rec is not None:
            level = LogLevel.info if result == "ok" else LogLevel.warn
            self._event("transfer", rec, "transfer", level=level, kind=kind, result=result, bytes=nbytes,
                        seconds=round(self.clock() - started, 3), **{k: v for k, v in details.items() if v is not None})

    # -- events -------------------------------------------------------------------------------

    def _event(self, name: str, rec: SessionRecord, message: str, level: LogLevel = LogLevel.info,
               **fields: Any) -> None:
        context = rec.context()
        context.update(fields)
        # Logger.emit's event, built here: emit checks the level against a freshly sorted list
        # of every level each time, a third of an event's cost (three events a session).
        log = self.log
        publish: Any = log.observer  # a zope ILogObserver: mypy cannot see its __call__
        publish({"log_logger": log, "log_level": level, "log_namespace": log.namespace, "log_source": None,
                      "log_format": message, "log_time": time.time(), "rp_event": name, "rp_fields": context})
