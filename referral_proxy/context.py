"""What every client session shares: configuration, mailbox map, reactor, backend connector.

A reload (SIGHUP) replaces the configuration and the map's rules in one step, so a
session never routes by a rule that names a backend its configuration lacks.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .admission import Admission
from .backend import BackendProtocol, Credentials
from .config import BackendConfig, Config
from .crossturns import FileTurns
from .keepalive import KeepAlive
from .observe import Observer
from .renamehold import RenameHold
from .routing import MailboxMap
from .staging import MapJournal, StagingJournal
from .turns import Turns

__all__ = ["Connect", "ConnectFor", "ProxyContext"]

Connect = Callable[[BackendConfig, Credentials], Awaitable[BackendProtocol]]
# connect_for(session, backend, credentials): a connection made for a session (its backends
# are told who the real client is, ID x-originating-ip); the service provides it.
ConnectFor = Callable[[Any, BackendConfig, Credentials], Awaitable[BackendProtocol]]


@dataclass
class ProxyContext:
    """Shared by every session of one proxy process."""

    config: Config
    mailbox_map: MailboxMap
    reactor: Any
    connect: Connect
    server_tls: Any = None  # IOpenSSLServerConnectionCreator for STARTTLS, or None
    sessions: set[Any] = field(default_factory=set)  # the ClientSessions open now
    backend_caps: dict[str, frozenset[str]] = field(default_factory=dict)  # as last seen after login
    observer: Observer = field(default_factory=Observer)  # counts (metrics) and events (logs)
    admission: Admission = field(default_factory=Admission)  # connection limits, the login penalty
    connect_for: ConnectFor | None = None
    staging_journal: StagingJournal | None = None  # staging mailboxes (staging.py); None: the map store's journal
    keepalive: KeepAlive = field(init=False)  # backend connections parked between a user's sessions
    move_turns: Turns = field(default_factory=Turns)  # relayed MOVEs of one mailbox, one at a time (turns.py)
    worker_turns: FileTurns | None = None  # the same between the workers of one master (crossturns.py)
    proxy_turns: Any = None  # ... and between the proxies on one PostgreSQL map (pgturns.PgTurns)
    rename_holds: dict[tuple[str, str], RenameHold] = field(default_factory=dict)  # renamehold.py
    remote_holds: dict[tuple[str, str], list[RenameHold]] = field(default_factory=dict)  # (another proxy's RENAME)
    worker_holds: Any = None  # a worker's channel to its master: the other workers hold too (workerholds.WorkerHolds)
    look_at_sessions: Callable[[], bool] = lambda: False  # relocation.RelocationWatch.check: BYE those whose mail moves
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def __post_init__(self) -> None:
        if self.staging_journal is None:
            self.staging_journal = MapJournal(self.mailbox_map)
        self.keepalive = KeepAlive(self.reactor, lambda: self.config.proxy.backend_keepalive,
                                   self.mailbox_map.login_user, in_all=self.admission.fd_parked)

    def next_id(self) -> int:
        return next(self._ids)

    def connector(self, session: Any) -> Connect:
        """How *session* connects to backends: for it (connect_for), else the plain connect."""
        connect_for = self.connect_for
        if connect_for is None:
            return self.connect

        async def connect(backend: BackendConfig, credentials: Credentials) -> BackendProtocol:
            return await connect_for(session, backend, credentials)

        return connect

    def reload(self, config: Config) -> None:
        """Backends and rules change together: no command sees one without the other."""
        self.mailbox_map.reconfigure(config.map)
        self.config = config
