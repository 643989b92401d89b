"""hostile18: a pipelined CLOSE answered after a later SELECT never unselects that SELECT's mailbox.

Found by tests/test_hostile18_pipeline.py. A client that pipelines ``SELECT INBOX, CLOSE,
SELECT Work, SELECT Far (another backend), CLOSE, UID COPY 1 Missing, CHECK, EXPUNGE,
FETCH 1 FLAGS``: the first CLOSE's answer, arriving after ``SELECT Work`` was relayed,
marked the session unselected, so ``SELECT Far`` left Work selected on the home backend;
after the second CLOSE, CHECK, EXPUNGE and FETCH ran there: OK where Dovecot says BAD,
the \\Deleted message of Work expunged (the client had left Work), and FETCH answered
before CHECK and EXPUNGE. Mend: mailboxes.py counts SELECT/EXAMINEs; a CLOSE's OK (and a
SELECT's NO) unselects the session only if no SELECT was dispatched after it.
"""

from __future__ import annotations

from imapwire import Wire

RULES = [{"mailbox": "Far*", "backend": "b2"}, {"mailbox": "Shared*", "backend": "b3"}]
SCRIPT = [b"SELECT INBOX", b"CLOSE", b"SELECT Work", b"SELECT Far", b"CLOSE", b"UID COPY 1 Missing",
          b"CHECK", b"EXPUNGE", b"FETCH 1 FLAGS"]


def _prepare(fleet, user: str) -> None:
    """Work (home) and Far (b2 for carol through the proxy, b1 for bob direct), each one \\Deleted message."""
    for name, box in (("b1", "Work"), ("b2", "Far")):
        with fleet[name if user == "carol" else "b1"].client(user) as m:
            m.create(box)
            m.append(box, "(\\Deleted)", None, b"Message-Id: <%s@h18>\r\n\r\nx\r\n" % box.encode())


def _answers(host: str, port: int, user: str) -> list[bytes]:
    w = Wire(host, port)
    w.login(user)
    return [b" ".join(line.split(b" ")[:2]) for line in w.pipelined(SCRIPT)]  # in the order they come


def test_pipelined_close_then_select_elsewhere_leaves_nothing_selected(fleet, clean_mail, proxy_factory):
    proxy = proxy_factory(rules=RULES)
    _prepare(fleet, "carol")
    _prepare(fleet, "bob")
    direct = _answers(fleet["b1"].host, fleet["b1"].port, "bob")
    assert direct == [b"c0 OK", b"c1 OK", b"c2 OK", b"c3 OK", b"c4 OK",
                      b"c5 BAD", b"c6 BAD", b"c7 BAD", b"c8 BAD"]
    assert _answers(proxy.host, proxy.port, "carol") == direct
    with fleet["b1"].client("carol") as m:  # the census: Work's message is still there
        assert m.select("Work", readonly=True) == ("OK", [b"1"])
