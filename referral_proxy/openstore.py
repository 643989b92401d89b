"""The map store ``[map].store`` names, opened: in memory, an SQLite file, or PostgreSQL (psycopg only then)."""

from __future__ import annotations

from typing import Any

from .store import MapStore, MemoryStore, SQLiteStore

__all__ = ["open_store"]


def open_store(spec: str | None, reactor: Any = None, *, lease_seconds: float = 60.0,
               serving: bool = False) -> MapStore:
    """Open the store named by ``[map].store`` (already made absolute by the config loader).

    A PostgreSQL store needs the *reactor* (its thread pool answers there); it is not
    connected yet: ``await store.load()`` (or ``check()``) is the first to reach it.
    *serving* (the proxy): an SQLite store waits for another process's lock on the reactor,
    in slices, never blocking it (the admin commands block: nothing else runs there)."""
    if spec is None:
        return MemoryStore()
    scheme, _, rest = spec.partition(":")
    if scheme == "sqlite":
        return SQLiteStore(rest, reactor if serving else None)
    if scheme in ("postgresql", "postgres"):
        from .pgstore import PostgresStore  # psycopg only where it is used

        if reactor is None:
            from twisted.internet import reactor as default_reactor
            reactor = default_reactor
        return PostgresStore(spec, reactor, lease_seconds=lease_seconds)
    raise ValueError(f"unknown store {spec!r}")
