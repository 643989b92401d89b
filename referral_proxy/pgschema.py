"""The PostgreSQL map store's tables (pgstore.py), and the check a proxy makes of them at start-up.

SCHEMA is what ``referral-proxy map migrate`` (pgstore.migrate) runs, idempotent; SCHEMA_VERSION
(store.py) is the version it brings a database to.
"""

from __future__ import annotations

from typing import Any

import psycopg

from .store import SCHEMA_VERSION, SchemaError

__all__ = ["SCHEMA", "schema_version", "check_schema", "migrate_on"]

SCHEMA = [
    "CREATE TABLE IF NOT EXISTS map_state (one boolean PRIMARY KEY DEFAULT true CHECK (one),"
    " schema_version integer NOT NULL, change bigint NOT NULL DEFAULT 0)",
    # names are the bytes a client sent (any, even invalid UTF-8): bytea
    "CREATE TABLE IF NOT EXISTS placements (username bytea NOT NULL, mailbox bytea NOT NULL,"
    " backends text NOT NULL, PRIMARY KEY (username, mailbox))",
    "CREATE TABLE IF NOT EXISTS journal (id bigserial PRIMARY KEY, username bytea NOT NULL, op text NOT NULL,"
    " data text NOT NULL, step text NOT NULL, created double precision NOT NULL, owner text,"
    " lease_until timestamptz)",
    # version 3: each step of an entry, what changed (or, whole, all of its data): journalrows.py
    "ALTER TABLE journal ADD COLUMN IF NOT EXISTS nsteps bigint NOT NULL DEFAULT 0",
    "CREATE TABLE IF NOT EXISTS journal_steps (entry bigint NOT NULL REFERENCES journal (id) ON DELETE CASCADE,"
    " seq bigint NOT NULL, whole boolean NOT NULL, delta text NOT NULL, PRIMARY KEY (entry, seq))",
    "CREATE TABLE IF NOT EXISTS reservations (entry bigint NOT NULL REFERENCES journal (id) ON DELETE CASCADE,"
    " username bytea NOT NULL, name bytea, subtree boolean NOT NULL, shared boolean NOT NULL)",
    "CREATE INDEX IF NOT EXISTS reservations_user ON reservations (username)",
    # each running proxy's listener: the newest change it has read, and when it last said so
    "CREATE TABLE IF NOT EXISTS listeners (id text PRIMARY KEY, seen bigint NOT NULL, beat timestamptz NOT NULL)",
    # version 2: transfers counted by processes other than the proxies (the admin move)
    "CREATE TABLE IF NOT EXISTS transfer_counts (kind text NOT NULL, result text NOT NULL, n bigint NOT NULL,"
    " bytes bigint NOT NULL, PRIMARY KEY (kind, result))",
]


def schema_version(conn: psycopg.Connection[Any]) -> int | None:
    """The schema version the database records (None: no schema yet)."""
    exists = conn.execute("SELECT to_regclass('map_state') IS NOT NULL").fetchone()
    if not exists or not exists[0]:
        return None
    row = conn.execute("SELECT schema_version FROM map_state").fetchone()
    return None if row is None else int(row[0])


def check_schema(conn: psycopg.Connection[Any]) -> None:
    """SchemaError unless the database's schema is this referral-proxy's (SCHEMA_VERSION)."""
    version = schema_version(conn)
    if version is None:
        raise SchemaError("the PostgreSQL map store has no schema: run `referral-proxy map --config FILE migrate`")
    if version < SCHEMA_VERSION:
        raise SchemaError(f"the PostgreSQL map store's schema is version {version}, older than this "
                          f"referral-proxy's ({SCHEMA_VERSION}): run `referral-proxy map --config FILE migrate`")
    if version > SCHEMA_VERSION:
        raise SchemaError(f"the PostgreSQL map store's schema is version {version}, newer than this "
                          f"referral-proxy's ({SCHEMA_VERSION}): upgrade referral-proxy")


def migrate_on(conn: psycopg.Connection[Any]) -> int | None:
    """Create the tables or bring them to SCHEMA_VERSION, in one transaction (pgstore.migrate); the version before."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(7118511)")  # two migrations at once wait for each other
        before = schema_version(conn)
        if before is not None and before > SCHEMA_VERSION:
            raise SchemaError(f"the database's schema is version {before}, newer than this referral-proxy "
                              f"({SCHEMA_VERSION})")
        for statement in SCHEMA:
            conn.execute(statement)  # type: ignore[arg-type]
        conn.execute("INSERT INTO map_state (schema_version) VALUES (%s) ON CONFLICT (one) DO UPDATE"
                     " SET schema_version = EXCLUDED.schema_version", (SCHEMA_VERSION,))
    return before
