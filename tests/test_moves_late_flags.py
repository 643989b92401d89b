"""Flags a client's STORE gave a source message after the move copied it (a STORE under way at the source when
the move began, run late: the client read its FETCH and OK) are carried to the copy when the drain takes the
source away; they were lost with the source (probe 6 of stop 49: 20 messages flagged $Moved, answered OK, none
with it after the move). A copy a client changed at the destination since keeps that change (RFC 7162
UNCHANGEDSINCE). Here the late STORE is sent straight to the source while the move is paused past its commit.
"""

from __future__ import annotations

import pytest
from movecheck import census, judge, move_paused, seed
from test_moves import MASTERS, ids

pytestmark = pytest.mark.usefixtures("clean_mail")


def _flags(backend, box: str) -> dict[str, set[str]]:
    """Message-Id -> flags (\\Recent apart) of carol's *box* on *backend*."""
    out = {}
    with backend.client("carol") as m:
        m.select(box, readonly=True)
        typ, data = m.uid("FETCH", "1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
    for part in data:
        if isinstance(part, tuple):
            mid = part[1].split(b"<", 1)[1].split(b">", 1)[0].decode()
            flags = part[0].split(b"FLAGS (", 1)[1].split(b")", 1)[0].decode().split()
            out[mid] = {f for f in flags if f != "\\Recent"}
    return out


def _store(backend, box: str, mid: str, how: str, flags: str) -> None:
    with backend.client("carol") as m:
        m.select(box)
        typ, data = m.uid("SEARCH", "HEADER", "Message-Id", mid)
        assert typ == "OK" and len(data[0].split()) == 1, data
        typ, data = m.uid("STORE", data[0], how, flags)
        assert typ == "OK", data


@pytest.mark.parametrize("step", ["committed:1", "placed:1"])
def test_flags_set_at_the_source_after_the_copy_reach_the_copy(proxy_factory, fleet, tmp_path, step):
    seed(fleet["b1"], "carol", "Work", mail := ids("f", 6))
    mover = move_paused(proxy_factory(MASTERS), pause := tmp_path / "pause", step, "carol", "Work", "b3")
    before = _flags(fleet["b1"], "Work")  # (the seed's own flags)
    _store(fleet["b1"], "Work", mail[0], "+FLAGS", r"(\Flagged $Moved)")  # the late STOREs
    _store(fleet["b1"], "Work", mail[1], "-FLAGS", " ".join(["(", *before[mail[1]], "$Gone)"]).replace("( ", "("))
    _store(fleet["b1"], "Work", mail[2], "+FLAGS", r"($Late)")
    _store(fleet["b3"], "Work", mail[2], "+FLAGS", r"($There)")  # a client at the new place changed this copy
    (pause / "resume").touch()
    out = mover.communicate(timeout=300)[0].decode()
    assert mover.returncode == 0, out
    counts, where = census(fleet, "carol")
    assert judge(counts, mail) == ([], []) and {where[i][0] for i in mail} == {("b3", "Work")}
    flags = _flags(fleet["b3"], "Work")
    assert flags[mail[0]] == before[mail[0]] | {"\\Flagged", "$Moved"} and flags[mail[1]] == set(), (before, flags)
    assert flags[mail[2]] == before[mail[2]] | {"$There"}, flags  # its own change kept, the source's not laid over it
    assert all(flags[m] == before[m] for m in mail[3:]), (before, flags)
