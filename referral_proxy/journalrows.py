"""A journal entry's data written as what changed at each step, not whole (SQLite and PostgreSQL stores).

Every step of a move used to rewrite the entry's whole ``data`` (every pair and batch so far):
~9 steps per mailbox, so a move of N mailboxes wrote O(N^2) bytes (1,000 mailboxes: 1.06 GB
of JSON, 9,006 writes). Now the entry's row keeps its *base* (the data as ``begin_move`` wrote
it, or as the code before this wrote it at each step: such an entry has no rows below), and each
step adds one row to ``journal_steps`` (entry, seq, full, delta), in the same transaction as the
step itself and its owner check:

* a *delta*: the operations (``diff``) that turn the data as last written into the data now:
  a key set or deleted, a list extended or cut, recursively; its size is what changed;
* a *full* row: the whole data (the first write of a process that did not write the one before,
  a write that found another seq than it expected, data that JSON would not keep as it is,
  and -- so that reading an entry stays cheap -- once the deltas since the last full one
  outgrow it: amortized, still linear). A full row deletes the rows before it.

The writer knows which seq it follows (``Deltas``: the data as it last wrote it, per entry);
the step's UPDATE of the journal row checks owner AND seq, so a delta is only ever applied to
exactly the data it was computed from; otherwise the step is written full. Readers rebuild the
data from the base and the rows in seq order (``rebuild``).

A step written so is stored as ``<step>@rows`` in the journal row: a process of the version before
(a proxy still running on PostgreSQL after ``map migrate``) reads it as an unknown step, so it
reports the entry as another version's and neither recovers it from its base nor shows it in a
LIST, as it would with data it cannot see.

Equality is Python's: ``1 == 1.0 == True``, so a value changed only between those is not
written (the journal's data holds ints, strings, None, lists and dicts, never floats or bools
that change type).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .journal import Step

__all__ = ["diff", "apply", "rebuild", "by_entry", "stored_step", "read_step", "Deltas", "NotCanonical", "write_step", "COMPACT_FLOOR"]

ROWS_MARK = "@rows"  # a journal row's step written with its rows (the version before cannot read them)
COMPACT_FLOOR = 64 * 1024  # bytes of deltas always allowed after a full row (a small entry: no rewrites)


def stored_step(step: Step) -> str:
    """The journal row's step column of a step written with its journal_steps row."""
    return step.value + ROWS_MARK


def read_step(value: str) -> Step | None:
    """A journal row's step column (the version before's, or ours); None: unknown (another version's)."""
    try:
        return Step(value.removesuffix(ROWS_MARK))
    except ValueError:
        return None  # written by another version: recovery reports it, never guesses


class NotCanonical(Exception):
    """The data holds what JSON would change (a key that is not a string): written whole."""


def diff(old: dict, new: dict) -> list[list[Any]]:
    """The operations that turn *old* (as JSON gave it back) into *new*; [] if they are equal."""
    if type(new) is not dict or type(old) is not dict:
        raise NotCanonical("the journal's data is a dict")
    ops: list[list[Any]] = []
    _diff([], old, new, ops)
    return ops


def _diff(path: list[Any], old: Any, new: Any, ops: list[list[Any]]) -> None:
    if type(old) is dict and type(new) is dict:
        for k, v in new.items():
            if type(k) is not str:
                raise NotCanonical(f"key {k!r}")
            if k not in old:
                ops.append(["s", path + [k], v])
            elif old[k] != v:
                _diff(path + [k], old[k], v, ops)
        ops.extend(["d", path + [k]] for k in old if k not in new)
    elif type(old) is list and type(new) is list:
        n = min(len(old), len(new))
        if old[:n] != new[:n]:
            for i in range(n):
                if old[i] != new[i]:
                    _diff(path + [i], old[i], new[i], ops)
        if len(new) > n:
            ops.append(["x", path, new[n:]])
        elif len(old) > n:
            ops.append(["t", path, n])
    else:  # another value, or another type (a tuple is written as the list JSON makes of it)
        ops.append(["s", path, new])


def apply(doc: Any, ops: Iterable[list[Any]]) -> Any:
    """*doc* with *ops* (``diff``'s, as JSON gave them back) done to it, in place where it can be."""
    for op in ops:
        kind, path = op[0], op[1]
        if kind == "s" and not path:
            doc = op[2]
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        if kind == "s":
            parent[path[-1]] = op[2]
        elif kind == "d":
            del parent[path[-1]]
        else:
            target = parent[path[-1]] if path else doc
            if kind == "x":
                target.extend(op[2])
            elif kind == "t":
                del target[op[2]:]
            else:
                raise ValueError(f"journal_steps: unknown operation {kind!r}")
    return doc


def rebuild(base: str, rows: Iterable[tuple[bool, str]]) -> dict:
    """An entry's data: its *base* (the journal row's JSON), then its rows (full, text) in seq order."""
    doc = json.loads(base)
    for full, text in rows:
        doc = json.loads(text) if full else apply(doc, json.loads(text))
    return doc  # type: ignore[no-any-return]


def by_entry(rows: Iterable[tuple[Any, Any, str]]) -> dict[int, list[tuple[bool, str]]]:
    """journal_steps rows (entry, whole, delta), in seq order, by entry (for ``rebuild``)."""
    found: dict[int, list[tuple[bool, str]]] = {}
    for entry, whole, text in rows:
        found.setdefault(int(entry), []).append((bool(whole), text))
    return found


@dataclass
class _Written:
    seq: int  # the journal row's nsteps after that write
    doc: dict  # the data as written (a copy, JSON's)
    since_full: int  # bytes of deltas written since the last full document
    full: int  # bytes of that document


class Deltas:
    """What this store last wrote of each entry it writes, so the next step writes only what changed."""

    def __init__(self) -> None:
        self._written: dict[int, _Written] = {}

    def began(self, entry_id: int, text: str) -> None:
        """begin_move wrote *text* as the entry's base (seq 0)."""
        self._written[entry_id] = _Written(0, json.loads(text), 0, len(text))

    def forget(self, entry_id: int) -> None:
        self._written.pop(entry_id, None)

    def plan(self, entry_id: int, data: dict) -> tuple[int | None, str]:
        """(the seq the delta follows, its JSON), or (None, the whole data's JSON)."""
        w = self._written.get(entry_id)
        if w is not None:
            try:
                text = json.dumps(diff(w.doc, data))
            except NotCanonical:
                pass
            else:
                if w.since_full + len(text) <= max(w.full, COMPACT_FLOOR):
                    return w.seq, text
        return None, json.dumps(data)

    def wrote(self, entry_id: int, seq: int, full: bool, text: str) -> None:
        if full:
            self._written[entry_id] = _Written(seq, json.loads(text), 0, len(text))
            return
        w = self._written[entry_id]
        w.doc = apply(w.doc, json.loads(text))
        w.seq, w.since_full = seq, w.since_full + len(text)


# write(full, expected seq or None, text) -> the entry's new seq, or None: not written (not ours,
# gone, or -- with an expected seq -- another seq than that)
Write = Callable[[bool, "int | None", str], Awaitable["int | None"]]


async def write_step(deltas: Deltas, entry_id: int, data: dict, write: Write) -> bool:
    """Write one step's data (a delta if the store's last write of it is known, else whole); False: not ours."""
    expected, text = deltas.plan(entry_id, data)
    if expected is not None:
        seq = await write(False, expected, text)
        if seq is not None:
            deltas.wrote(entry_id, seq, False, text)
            return True
        text = json.dumps(data)  # not ours, or written by someone else since: whole (the owner check decides)
    seq = await write(True, None, text)
    if seq is None:
        deltas.forget(entry_id)
        return False
    deltas.wrote(entry_id, seq, True, text)
    return True
