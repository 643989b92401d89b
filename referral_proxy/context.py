"""What every client session shares: configuration, mailbox map, reactor, backend connector.

A reload (SIGHUP) replaces the configuration and the map's rules in one step, so a
session never routes by a rule that names a backend its configuration lacks.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .backend import BackendProtocol, Credentials
from .config import BackendConfig, Config
from .routing import MailboxMap

__all__ = ["Connect", "ProxyContext"]

Connect = Callable[[BackendConfig, Credentials], Awaitable[BackendProtocol]]


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
    _ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))

    def next_id(self) -> int:
        return next(self._ids)

    def reload(self, config: Config) -> None:
        """Backends and rules change together: no command sees one without the other."""
        self.mailbox_map.reconfigure(config.map)
        self.config = config
