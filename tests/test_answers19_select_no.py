"""answers19: a SELECT's NO answered after a later SELECT sent to another backend leaves that SELECT's mailbox.

A client that pipelines, in one write, ``SELECT Work, SELECT Nope, SELECT Far (another backend),
MOVE 1 Work``: the NO of ``SELECT Nope`` (home backend) came after ``SELECT Far`` was dispatched,
and cleared the session's selected mailbox name, which ``SELECT Far`` had set: the MOVE found a
mailbox selected with no name and was refused (``NO [INUSE]``) where Dovecot moves. (hostile18
mended the same for CLOSE/UNSELECT: mailboxes.py counts SELECT/EXAMINEs everywhere.) Each script
is played in one write through the proxy (carol: Work on b1, her home, Far* on b2) and, one
command at a time, on direct Dovecot (bob: every mailbox on b1); the tagged answers must agree,
and the census of both stores, by content, too.
"""

from __future__ import annotations

import re

import pytest
from imapwire import Wire

RULES = [{"mailbox": "Far*", "backend": "b2"}]
BOXES = ("Work", "Far", "Far/y")
SCRIPTS = {
    "no-home-then-far-move-home": [b"SELECT Work", b"SELECT Nope", b"SELECT Far", b"MOVE 1 Work"],
    "no-home-first-then-far-move-home": [b"SELECT Nope", b"SELECT Far", b"MOVE 1 Work", b"FETCH 1 FLAGS"],
    "no-home-then-far-uid-move-far": [b"SELECT Work", b"SELECT Nope", b"SELECT Far", b"UID MOVE 1 Far/y"],
    "no-home-then-far-copy-home": [b"SELECT Nope", b"SELECT Far", b"COPY 1 Work", b"MOVE 1 Work"],
    "no-home-then-examine-far-copy": [b"SELECT Nope", b"EXAMINE Far", b"COPY 1 Work"],
    "no-far-then-home-move-far": [b"SELECT Far", b"SELECT Far/nope", b"SELECT Work", b"MOVE 1 Far"],
    "no-far-then-home-move-far-y": [b"SELECT Far/nope", b"SELECT Work", b"UID MOVE 1 Far/y", b"CHECK"],
    "far-no-home-home-move-far": [b"SELECT Far", b"SELECT Nope", b"SELECT Work", b"MOVE 1 Far/y"],
    "two-no-then-far": [b"SELECT Nope", b"SELECT Far/nope", b"SELECT Far", b"MOVE 1 Work"],
    "no-home-then-far-then-no-far": [b"SELECT Nope", b"SELECT Far", b"SELECT Far/nope", b"MOVE 1 Work"],
    "no-home-then-far-expunge": [b"SELECT Nope", b"SELECT Far", b"STORE 1 +FLAGS.SILENT (\\Deleted)", b"EXPUNGE"],
    "far-close-no-home-home-move": [b"SELECT Far", b"CLOSE", b"SELECT Nope", b"SELECT Work", b"MOVE 1 Far"],
    "examine-no-then-far-move": [b"EXAMINE Nope", b"SELECT Far", b"MOVE 1 Work", b"STATUS Work (MESSAGES)"],
    "no-far-unselect-far-move": [b"SELECT Work", b"SELECT Far/nope", b"UNSELECT", b"SELECT Far", b"MOVE 1 Work"],
    "no-far-then-no-home": [b"SELECT Nope", b"SELECT Far", b"SELECT Nope2", b"MOVE 1 Work", b"CHECK"],
    "far-then-no-home-move": [b"SELECT Far", b"SELECT Nope", b"MOVE 1 Work", b"EXPUNGE"],
    "no-home-far-close-move": [b"SELECT Nope", b"SELECT Far", b"CLOSE", b"MOVE 1 Work"],
    "no-home-far-no-far-y": [b"SELECT Nope", b"SELECT Far", b"SELECT Far/nope", b"SELECT Far/y", b"UID MOVE 1:* Work"],
}


def _prepare(fleet, user: str) -> None:
    """Two messages in each of Work (home), Far and Far/y (b2 for carol through the proxy, b1 for bob)."""
    for box in BOXES:
        backend = "b2" if user == "carol" and box.startswith("Far") else "b1"
        with fleet[backend].client(user) as m:
            m.create(box)
            for i in (1, 2):
                m.append(box, None, None, b"Message-Id: <%s-%d@a19>\r\nSubject: %s %d\r\n\r\nx\r\n"
                         % (box.encode(), i, box.encode(), i))


def _status(line: bytes) -> bytes:
    """``tag OK`` / ``tag NO [CODE]``: the answer without its words."""
    m = re.match(rb"(\S+ (?:OK|NO|BAD))( \[[A-Z-]+)?", line)
    assert m is not None, line
    return m.group(1) + (m.group(2) + b"]" if m.group(2) else b"")


def _answers(wire: Wire, script: list[bytes], pipelined: bool) -> list[bytes]:
    if pipelined:  # ONE write
        return [_status(line) for line in wire.pipelined(script)]
    return [_status(wire.cmd(b"c%d" % i, c)[-1]) for i, c in enumerate(script)]


def _census(fleet, user: str) -> dict[str, list[bytes]]:
    out = {}
    for box in BOXES:
        backend = "b2" if user == "carol" and box.startswith("Far") else "b1"
        with fleet[backend].client(user) as m:
            typ, data = m.select(box, readonly=True)
            assert typ == "OK", (box, data)
            typ, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])") if data != [b"0"] else ("OK", [])
            out[box] = sorted(part[1].strip() for part in data if isinstance(part, tuple))
    return out


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_select_no_then_select_elsewhere(fleet, clean_mail, proxy_factory, name):
    script = SCRIPTS[name]
    proxy = proxy_factory(rules=RULES)
    _prepare(fleet, "carol")
    _prepare(fleet, "bob")
    w = Wire(fleet["b1"].host, fleet["b1"].port)
    w.login("bob")
    direct = _answers(w, script, pipelined=False)
    w.close()
    p = Wire(proxy.host, proxy.port)
    p.login("carol")
    proxied = _answers(p, script, pipelined=True)
    p.close()
    assert proxied == direct
    assert _census(fleet, "carol") == _census(fleet, "bob")
