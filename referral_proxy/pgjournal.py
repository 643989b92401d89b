"""The PostgreSQL statements of a journal step and of reading the journal (pgstore.py runs them in its pool).

A step is written as a row of what changed (journalrows.py), with the journal row's UPDATE that
checks the owner (and the seq the delta follows) and renews the lease, in one transaction."""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import psycopg

from .journal import Step
from .journalrows import stored_step

__all__ = ["write_step_row", "read_journal", "local_renames"]


def write_step_row(conn: psycopg.Connection[Any], entry_id: int, step: Step, owner: str | None, lease: float,
                   whole: bool, expected: int | None, text: str) -> int | None:
    """In the caller's transaction: the step, then its row; the entry's new seq, or None (not ours, or
    *expected* is not its seq: nothing written)."""
    row = conn.execute(
        "UPDATE journal SET step = %s, nsteps = nsteps + 1,"
        " lease_until = CASE WHEN owner IS NULL THEN NULL ELSE now() + make_interval(secs => %s) END"
        " WHERE id = %s AND owner IS NOT DISTINCT FROM %s::text AND (%s::bigint IS NULL OR nsteps = %s)"
        " RETURNING nsteps", (stored_step(step), lease, entry_id, owner, expected, expected)).fetchone()
    if row is None:
        return None
    if whole:  # the rows before it are superseded
        conn.execute("DELETE FROM journal_steps WHERE entry = %s", (entry_id,))
    conn.execute("INSERT INTO journal_steps (entry, seq, whole, delta) VALUES (%s, %s, %s, %s)",
                 (entry_id, row[0], whole, text))
    return int(row[0])


def read_journal(conn: psycopg.Connection[Any]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every entry (id, username, op, data, step, created, owner, lease ran out) and every step row
    (entry, whole, delta) in seq order, as of one moment (the caller's transaction, begun here)."""
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
    entries = conn.execute("SELECT id, username, op, data, step, created, owner, coalesce(lease_until < now(), false)"
                           " FROM journal ORDER BY id").fetchall()
    return entries, conn.execute("SELECT entry, whole, delta FROM journal_steps ORDER BY entry, seq").fetchall()


def local_renames(conn: psycopg.Connection[Any], ids: Collection[int], mine: str) -> dict[int, str]:
    """Of the entries *ids*, the RENAMEs on one backend (``rename-local``) of another process than
    *mine* (an owner, journal.process_owner): each one's backend."""
    rows = conn.execute("SELECT id, data FROM journal WHERE op = 'rename-local' AND id = ANY(%s)"
                        " AND owner IS DISTINCT FROM %s", (list(ids), mine)).fetchall()
    found = {int(i): json.loads(data).get("backend") for i, data in rows}
    return {i: backend for i, backend in found.items() if isinstance(backend, str)}
