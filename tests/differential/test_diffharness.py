"""The differential harness itself, without any server: it must see what differs,
and forgive only what the documented differences say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from diffharness import (
    DIFFERENCES,
    Exchange,
    Normaliser,
    compare,
    expand,
    load_corpus,
    parse_corpus,
)

REPO = Path(__file__).resolve().parents[2]


def _conv(extra: str = "") -> object:
    return parse_corpus(f"=== t\n{extra}C: a1 NOOP\n")[0]


def _greeting() -> Exchange:
    return Exchange(b"", [b"* OK Dovecot ready."])


def _cmp(direct: list[bytes], proxy: list[bytes], sent: bytes = b"a1 FETCH 1 BODY[]\r\n", extra: str = "",
         mode: str = "single"):
    conv = _conv(extra)
    return compare(conv, mode, [_greeting(), Exchange(sent, direct)], [_greeting(), Exchange(sent, proxy)])


def test_corpus_parses_and_names_are_unique():
    convs = load_corpus()
    assert len(convs) > 80
    assert len({c.name for c in convs}) == len(convs)
    assert all(c.steps for c in convs)


def test_corpus_directives_and_errors():
    [c] = parse_corpus("# x\n=== one\n@prelogin\n@allow own-text\n@xfail split bug 7\nC: a1 NOOP\nX: append INBOX\n"
                       "W: EXISTS\n")
    assert not c.login and c.allow == {"own-text"} and c.xfail_reason("split") == "bug 7"
    assert c.xfail_reason("single") is None
    assert [s.kind for s in c.steps] == ["C", "X", "W"]
    for bad in ("C: a1 NOOP\n", "=== x\n@allow nosuch\nC: a\n", "=== x\n@xfail\nC: a\n", "=== x\nQ: a\n",
                "=== x\n"):
        with pytest.raises(ValueError):
            parse_corpus(bad)


def test_expand_literals_and_escapes():
    assert expand("a1 LOGIN {{carol}} {{+p\\\"w}}", {}) == [b"a1 LOGIN {5}\r\n", b'carol {4+}\r\np\\"w\r\n']
    assert expand('a1 CREATE "a\\\\b" (\\Seen)', {}) == [b'a1 CREATE "a\\\\b" (\\Seen)\r\n']
    assert expand("a1 NOOP\\r\\na2 NOOP", {}) == [b"a1 NOOP\r\na2 NOOP\r\n"]
    assert expand("a1 X \\x00\\xff é\\", {}) == [b"a1 X \x00\xff \xc3\xa9"]
    assert expand("a1 LOGIN ${USER}", {"USER": "carol"}) == [b"a1 LOGIN carol\r\n"]
    with pytest.raises(ValueError):
        expand("a1 ${NOPE}", {})


def test_normal_form():
    n = Normaliser()
    r, uv = n.response(b"a1 OK [READ-WRITE] Select completed (0.001 + 0.000 + 0.002 secs).")
    assert r == b"a1 OK [READ-WRITE] Select completed." and uv == ()
    r, uv = n.response(b"* OK [UIDVALIDITY 1796030808] UIDs valid")
    assert r == b"* OK [UIDVALIDITY <uidvalidity>] UIDs valid" and uv == (b"1796030808",)
    r, _ = n.response(b"* CAPABILITY SORT IMAP4rev1 ACL")
    assert r == b"* CAPABILITY ACL IMAP4rev1 SORT"


def test_same_transcripts_have_no_difference():
    rs = [b"* 1 FETCH (BODY[] {5}\r\nhello)", b"a1 OK Fetch completed (0.001 + 0.000 secs)."]
    assert _cmp(rs, list(rs)).differences == []


@pytest.mark.parametrize("proxy", [
    [b"* 1 FETCH (BODY[] {5}\r\nhellO)", b"a1 OK Fetch completed."],  # one byte of a body
    [b"a1 OK Fetch completed."],  # a response lost
    [b"* 1 FETCH (BODY[] {5}\r\nhello)", b"* 1 FETCH (BODY[] {5}\r\nhello)", b"a1 OK Fetch completed."],
    [b"* 1 FETCH (BODY[] {5}\r\nhello)", b"a1 NO Fetch completed."],
])
def test_a_difference_is_seen(proxy):
    direct = [b"* 1 FETCH (BODY[] {5}\r\nhello)", b"a1 OK Fetch completed."]
    assert _cmp(direct, proxy).differences


def test_the_proxys_tag_inside_a_response_is_a_difference():
    direct = [b'* ESEARCH (TAG "a1") ALL 1:6', b"a1 OK Search completed."]
    proxy = [b'* ESEARCH (TAG "rp16") ALL 1:6', b"a1 OK Search completed."]
    assert _cmp(direct, proxy, b"a1 SEARCH RETURN (ALL) ALL\r\n").differences


def test_uidvalidity_must_map_as_a_function():
    sel = b"a1 SELECT INBOX\r\n"
    conv = _conv()
    d = [_greeting(), Exchange(sel, [b"* OK [UIDVALIDITY 10] x", b"a1 OK y"]),
         Exchange(b"a2 STATUS INBOX (UIDVALIDITY)\r\n", [b"* STATUS INBOX (UIDVALIDITY 10)", b"a2 OK z"])]
    same = [_greeting(), Exchange(sel, [b"* OK [UIDVALIDITY 77] x", b"a1 OK y"]),
            Exchange(b"a2 STATUS INBOX (UIDVALIDITY)\r\n", [b"* STATUS INBOX (UIDVALIDITY 77)", b"a2 OK z"])]
    changed = [_greeting(), Exchange(sel, [b"* OK [UIDVALIDITY 77] x", b"a1 OK y"]),
               Exchange(b"a2 STATUS INBOX (UIDVALIDITY)\r\n", [b"* STATUS INBOX (UIDVALIDITY 78)", b"a2 OK z"])]
    assert compare(conv, "single", d, same).differences == []
    assert compare(conv, "single", d, changed).differences


def test_continuation_text_differs_only_for_a_literal():
    assert _cmp([b"+ OK"], [b"+ Ready for literal data"], b"a1 APPEND INBOX {5}\r\n").differences == []
    assert _cmp([b"+ idling"], [b"+ something else"], b"a1 IDLE\r\n").differences


def test_list_entries_compare_by_value():
    sent = b'a1 LIST "" *\r\n'
    d = [b'* LIST (\\HasNoChildren \\Sent) "/" Sent', b"* LIST (\\HasNoChildren) \"/\" INBOX", b"a1 OK List completed."]
    p = [b'* LIST (\\HasNoChildren) "/" "INBOX"', b'* LIST (\\Sent \\HasNoChildren) "/" "Sent"', b"a1 OK LIST completed."]
    assert _cmp(d, p, sent).differences == []
    wrong = [b'* LIST (\\HasChildren) "/" "INBOX"', b'* LIST (\\Sent \\HasNoChildren) "/" "Sent"', b"a1 OK x"]
    assert len(_cmp(d, wrong, sent).differences) == 1
    assert _cmp([b"a1 OK Noop completed."], [b"a1 OK NOOP completed."], b"a1 NOOP\r\n").differences


def test_own_text_only_where_allowed():
    d, p = [b"a1 BAD Error in IMAP command: Unknown command."], [b"a1 BAD Unknown command FROB"]
    assert _cmp(d, p, b"a1 FROB\r\n").differences
    assert _cmp(d, p, b"a1 FROB\r\n", "@allow own-text\n").differences == []
    assert _cmp([b"a1 NO x"], [b"a1 BAD x"], b"a1 FROB\r\n", "@allow own-text\n").differences


def test_split_only_differences_do_not_apply_in_single_mode():
    d = [b'* QUOTA "User quota" (STORAGE 5 10485760)', b"a1 OK q"]
    p = [b'* QUOTA "User quota" (STORAGE 4 10485760)', b"a1 OK q"]
    assert _cmp(d, p, b"a1 GETQUOTA x\r\n", "@allow quota-share\n", "split").differences == []
    assert _cmp(d, p, b"a1 GETQUOTA x\r\n", "@allow quota-share\n", "single").differences
    limit = [b'* QUOTA "User quota" (STORAGE 4 999)', b"a1 OK q"]
    assert _cmp(d, limit, b"a1 GETQUOTA x\r\n", "@allow quota-share\n", "split").differences


def test_every_difference_is_in_both_tables():
    """docs/design.md and the README list every allowed difference, by id, and no other."""
    for doc in (REPO / "docs" / "design.md", REPO / "README.md"):
        text = doc.read_text()
        table = text[text.index("| Id | What a client sees through the proxy, unlike direct Dovecot |"):]
        table = table[:table.index("\n\n")]
        rows = set(re.findall(r"^\| `([a-z-]+)` \|", table, re.M))
        assert rows == set(DIFFERENCES), (doc, rows ^ set(DIFFERENCES))


def test_bug_table_lists_exactly_the_xfails_of_the_corpus():
    """docs/design.md's table of proxy bugs names every conversation with an @xfail, in its modes, and no other."""
    text = (REPO / "docs" / "design.md").read_text()
    table = text[text.index("| Proxy bug (a strict xfail"):]
    table = table[:table.index("\n\n")]
    listed = {}
    for row in table.splitlines()[2:]:
        _bug, modes, names = (cell.strip() for cell in row.strip().strip("|").rsplit("|", 2))
        listed.update((name, modes) for name in names.split(", "))
    marked = {c.name: {m for m, _ in c.xfail} for c in load_corpus() if c.xfail}
    assert set(listed) == set(marked), set(listed) ^ set(marked)
    words = {"all": "both", "split": "split only", "single": "single only"}
    for name, modes in listed.items():
        assert modes in {words[m] for m in marked[name]}, (name, modes)
