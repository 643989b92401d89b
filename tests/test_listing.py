"""listing.py's own evaluation of a LIST/LSUB reference and pattern over merged names."""

from __future__ import annotations

from referral_proxy.listing import ListEntry, select


def test_list_patterns_match_a_names_characters_not_its_modified_utf7():
    names = [b"INBOX", b"Caf&AOk-", b"&AOkA6Q-", b"a&-b"]
    entries = [ListEntry((), b"/", n, "b1") for n in names]

    def listed(pattern: bytes) -> list[bytes]:
        return sorted(e.name for e in select(entries, b"", pattern, "/"))

    assert listed(b"*O*") == [b"INBOX"]  # no "O" in Café
    assert listed(b"*-") == []
    assert listed(b"*&AOk-") == [b"&AOkA6Q-", b"Caf&AOk-"]
    assert listed(b"\xc3\xa9*") == [b"&AOkA6Q-"]
    assert listed(b"a&*") == [b"a&-b"]  # not modified UTF-7: matched as it is
    assert listed(b"&AOk-&AOk-") == []


def test_a_pattern_that_may_match_inbox_matches_its_letters_in_any_case():
    """Dovecot's rule (imap-match.c): "inbox*", "i*", "*n*" and "I%B%X" list INBOX (and what is under
    it); the rest of a name, and any other name, is matched with its case."""
    entries = [ListEntry((), b"/", n, "b1") for n in (b"INBOX", b"INBOX/x", b"Inboxes", b"Sent", b"Work")]

    def listed(reference: bytes, pattern: bytes) -> list[bytes]:
        return sorted(e.name for e in select(entries, reference, pattern, "/"))

    assert listed(b"", b"inbox*") == [b"INBOX", b"INBOX/x"]
    assert listed(b"", b"i*") == [b"INBOX", b"INBOX/x"]
    assert listed(b"", b"*n*") == [b"INBOX", b"INBOX/x", b"Inboxes", b"Sent"]
    assert listed(b"", b"I%B%X") == [b"INBOX"]
    assert listed(b"inbox", b"/%") == [b"INBOX/x"]
    assert listed(b"", b"inbox/X") == []  # past INBOX the case counts
    assert listed(b"", b"w*") == []
