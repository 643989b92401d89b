"""Who may connect and log in: connections counted in all, per address and per user;
the failed-login penalty; the file descriptors all of it needs.

One Admission per process (in the ProxyContext). A session asks it when connected
(:meth:`Admission.connect`), once logged in (:meth:`Admission.logged_in`) and when
gone (:meth:`Admission.gone`); a refusal is a reason (a metrics label) and a text the
session sends as ``* BYE [UNAVAILABLE] ...`` or ``NO [LIMIT] ...``. The limits are
read from the running configuration at each call, so a reload applies to new
connections and logins.

The login penalty imitates Dovecot's auth penalty (``src/auth/auth-penalty.c`` and
``src/anvil/penalty.c``): each failed login raises a penalty (0 to 4) of the
client's address (an IPv6 one by its /48) and, here also, of the user name; a login
waits ``2 * 2**penalty`` seconds (at most ``login_penalty``, 15 by default as in
Dovecot) before its credentials are checked; a penalty falls by one step for each
step's delay passed since the last failure (with the cap that is all of it once the
cap has passed), a success resets it, and it is forgotten 14 s + the cap after its
last change.
Failing again with the same user name and password does not raise it (a client with
an old password retrying). The user's penalty makes a password-guessing botnet of
many addresses wait as much as one address would, at the cost of the same wait (at
most ``login_penalty`` seconds) for the user's own next login during an attack.
"""

from __future__ import annotations

import ipaddress
import resource
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

from .config import ConnectionLimits

__all__ = [
    "Admission", "Refusal", "LoginPenalty", "address_key", "penalty_seconds", "file_descriptors",
    "sessions_for", "FDS_PER_SESSION",
]

# A session holds the client's descriptor and its home backend's; more backends or a
# transfer take more, and a backend that cannot be reached for want of one answers
# NO [UNAVAILABLE] (never a crash).
FDS_PER_SESSION = 2
# Descriptors kept out of the sessions' budget: listeners, the map store, logs, health
# checks, the connections a burst of accepts holds before they are refused, transfers.
FD_RESERVE = 128

PENALTY_INIT_SECS = 2.0
MAX_PENALTY = 4
PENALTY_EXPIRE_SECS = 2 + 4 + 8  # plus the cap: Dovecot's AUTH_PENALTY_TIMEOUT (29 s with its 15 s cap)
_CHECKSUMS = 10  # user+password checksums remembered per address or user
_MAX_RECORDS = 100_000  # penalties remembered at most (the oldest go first): bounded memory


@dataclass(frozen=True)
class Refusal:
    """Why a connection or a login is refused: *reason* labels the metric, *text* is said."""

    reason: str
    text: str


def address_key(ip: str, v6_prefix: int = 64) -> str:
    """An address as it is counted: IPv4 whole, IPv6 by its first *v6_prefix* bits (one
    client holds a whole /64), an IPv4-mapped IPv6 address as IPv4."""
    if ":" not in ip:  # IPv4, or not an address: itself, without parsing it (three times a session)
        return ip
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, v6_prefix), strict=False))
    return ip


@dataclass(slots=True)
class _Connection:
    ip: str
    user: str | None = None


class Admission:
    """The connection counts of one process, and its login penalty."""

    def __init__(self, fd_sessions: int | None = None, fd_parked: int | None = None) -> None:
        self.fd_sessions = fd_sessions  # the most sessions the descriptors allow (None: no bound known)
        self.fd_parked = fd_parked  # ... and backend connections parked between sessions (keepalive.py)
        self.penalty = LoginPenalty()
        self._live: dict[object, _Connection] = {}
        self._per_ip: dict[str, int] = {}
        self._unauthenticated: dict[str, int] = {}
        self._per_user: dict[str, int] = {}

    @property
    def connections(self) -> int:
        return len(self._live)

    def max_connections(self, limits: ConnectionLimits) -> int:
        """The configured limit, lowered to what the file descriptors allow."""
        if self.fd_sessions is None:
            return limits.max_connections
        return min(limits.max_connections, self.fd_sessions)

    def connect(self, key: object, ip: str, limits: ConnectionLimits) -> Refusal | None:
        """Count a new connection from *ip*, or say why it is refused (then nothing is counted)."""
        ip = address_key(ip)
        most = self.max_connections(limits)
        if len(self._live) >= most:
            return Refusal("max_connections", f"Too many connections to this server (limit {most}); try again later")
        if self._per_ip.get(ip, 0) >= limits.max_connections_per_ip:
            return Refusal("max_connections_per_ip",
                           f"Too many connections from your address (limit {limits.max_connections_per_ip})")
        if self._unauthenticated.get(ip, 0) >= limits.max_unauthenticated_per_ip:
            return Refusal("max_unauthenticated_per_ip", "Too many connections from your address waiting to log in "
                                                         f"(limit {limits.max_unauthenticated_per_ip})")
        self._live[key] = _Connection(ip)
        _add(self._per_ip, ip, 1)
        _add(self._unauthenticated, ip, 1)
        return None

    def logged_in(self, key: object, user: str, limits: ConnectionLimits) -> Refusal | None:
        """*key*'s login as *user* succeeded: count it, or refuse it (the user has too many)."""
        entry = self._live.get(key)
        if entry is None or entry.user is not None:
            return None
        if self._per_user.get(user, 0) >= limits.max_connections_per_user:
            return Refusal("max_connections_per_user",
                           f"Too many connections for this user (limit {limits.max_connections_per_user})")
        entry.user = user
        _add(self._unauthenticated, entry.ip, -1)
        _add(self._per_user, user, 1)
        return None

    def gone(self, key: object) -> None:
        """The connection closed (idempotent; nothing happens for one never counted)."""
        entry = self._live.pop(key, None)
        if entry is None:
            return
        _add(self._per_ip, entry.ip, -1)
        if entry.user is None:
            _add(self._unauthenticated, entry.ip, -1)
        else:
            _add(self._per_user, entry.user, -1)

    def counts(self, ip: str) -> tuple[int, int]:
        """(connections, unauthenticated ones) from *ip* now."""
        ip = address_key(ip)
        return self._per_ip.get(ip, 0), self._unauthenticated.get(ip, 0)


def _add(counts: dict[str, int], key: str, n: int) -> None:
    value = counts.get(key, 0) + n
    if value > 0:
        counts[key] = value
    else:
        counts.pop(key, None)


# -- the failed-login penalty --------------------------------------------------------------


def penalty_seconds(penalty: int, cap: float) -> float:
    """How long a login waits at *penalty*: 2 s doubled per step (4, 8, 16...), at most *cap*."""
    if penalty <= 0 or cap <= 0:
        return 0.0
    return min(PENALTY_INIT_SECS * 2 ** penalty, cap)


@dataclass
class _Penalty:
    penalty: int = 0
    last: float = 0.0  # when it was last raised
    updated: float = 0.0  # when it was last changed (forgotten PENALTY_EXPIRE_SECS after)
    checksums: list[int] = field(default_factory=list)


class LoginPenalty:
    """Dovecot's auth penalty, per address (an IPv6 one by its /48) and per user name."""

    def __init__(self) -> None:
        self._records: OrderedDict[str, _Penalty] = OrderedDict()  # oldest change first

    def __len__(self) -> int:
        return len(self._records)

    def delay(self, ip: str, user: str, cap: float, now: float) -> float:
        """Seconds a login of *user* from *ip* waits before its credentials are checked."""
        if cap <= 0 or not self._records:  # no failure remembered (the usual case): no wait
            return 0.0
        self._expire(now, cap)
        return max(penalty_seconds(self._current(ident, now, cap), cap) for ident in _idents(ip, user))

    def failed(self, ip: str, user: str, password: str, cap: float, now: float, asked: float | None = None) -> None:
        """A login failed (wrong credentials): both penalties rise, unless it was the same password again. From
        their value when its delay was *asked* (Dovecot's ``last_penalty + 1``): reckoned after the wait, the wait
        itself had lowered them, and a guesser's 15 s fell back to 4 s (probe j2 of stop 59)."""
        if cap <= 0:
            return
        self._expire(now, cap)
        checksum = zlib.crc32(user.encode("utf-8", "surrogateescape"), zlib.crc32(password.encode("utf-8", "surrogateescape"))) or 1
        for ident in _idents(ip, user):
            value = min(self._current(ident, now if asked is None else min(asked, now), cap) + 1, MAX_PENALTY)
            rec = self._record(ident, now)
            if checksum in rec.checksums:  # the same wrong password again: no higher
                rec.checksums.remove(checksum)
                rec.checksums.insert(0, checksum)
                rec.penalty = value - 1
            else:
                rec.checksums.insert(0, checksum)
                del rec.checksums[_CHECKSUMS:]
                rec.penalty, rec.last = value, now

    def succeeded(self, ip: str, user: str) -> None:
        """A login succeeded: both penalties are reset."""
        if self._records:
            for ident in _idents(ip, user):
                self._records.pop(ident, None)

    def _current(self, ident: str, now: float, cap: float) -> int:
        """The penalty now: as Dovecot lowers it, a step for each step's delay since the last raise."""
        rec = self._records.get(ident)
        if rec is None:
            return 0
        penalty, drop = rec.penalty, MAX_PENALTY
        since = now - min(rec.last, now)
        while penalty > 0 and since >= penalty_seconds(drop, cap):
            drop -= 1
            penalty -= 1
        return penalty

    def _record(self, ident: str, now: float) -> _Penalty:
        rec = self._records.pop(ident, None)
        if rec is None:
            rec = _Penalty()
            while len(self._records) >= _MAX_RECORDS:
                self._records.popitem(last=False)
        rec.updated = now
        self._records[ident] = rec  # now the newest
        return rec

    def _expire(self, now: float, cap: float) -> None:
        records = self._records
        while records:
            ident, rec = next(iter(records.items()))
            if now - rec.updated < PENALTY_EXPIRE_SECS + cap:
                break
            del records[ident]


def _idents(ip: str, user: str) -> tuple[str, str]:
    return "ip " + address_key(ip, 48), "user " + user


# -- file descriptors ---------------------------------------------------------------------------


def file_descriptors(wanted: int) -> int:
    """How many descriptors this process may open: its soft limit, first raised toward
    *wanted* as far as the hard limit allows (what ``ulimit -n`` left it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return wanted if soft == resource.RLIM_INFINITY else soft


def sessions_for(fds: int) -> int:
    """The sessions *fds* descriptors serve, a reserve kept aside."""
    reserve = max(32, min(FD_RESERVE, fds // 4))
    return max(1, (fds - reserve) // FDS_PER_SESSION)
