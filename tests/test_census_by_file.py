"""The census reads each message's Message-Id from its file, not from Dovecot's cache.

Soak seed 14707 (--admin --multiappend --odd-names --capitals --workers 2) reported c0-41
lost. It was not: its file was in b2's Archive/B as UID 31, and ``BODY[]`` of UID 31 was
c0-41, but Dovecot's cache record of UID 31 was c2-57's (Message-Id, MIME parts, date). A
SIGKILL of b2 during the proxy's APPEND of c0-41 left dovecot-uidlist naming its file as UID
31 while the index had no UID 31; b2, restarted, saved c2-57 as UID 31 in its index with its
cache record, found "UIDs not ordered (31 >= 31)" in the uidlist, and gave c2-57's file UID 32,
UID 31 keeping c2-57's cache record. ``BODY[HEADER.FIELDS (MESSAGE-ID)]`` (the census) is
answered from that record: c2-57 twice, c0-41 nowhere. Here that end state is made by hand
(a file rewritten under its cache record, same size) and the census must count by the files.
"""

from __future__ import annotations

import pytest
from movecheck import body, census, quote, seed

pytestmark = pytest.mark.usefixtures("clean_mail")

MOVED, OTHER = "c0-41@lost12", "c2-57@lost12"  # the same length: their files the same size


def _header_ids(backend, mailbox: str) -> list[bytes]:
    """Message-Ids as Dovecot's ``BODY[HEADER.FIELDS (MESSAGE-ID)]`` gives them (from its cache once cached)."""
    with backend.client("carol") as m:
        m.select(quote(mailbox), readonly=True)
        typ, data = m.fetch("1:*", "(BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])")
        assert typ == "OK", data
        return [item[1].split(b"<", 1)[1].split(b">", 1)[0] for item in data if isinstance(item, tuple)]


def test_a_message_whose_cache_record_is_another_messages_is_counted_by_its_file(fleet):
    b2 = fleet["b2"]
    seed(b2, "carol", "Archive/B", [OTHER])
    assert _header_ids(b2, "Archive/B") == [OTHER.encode()]  # UID 1's Message-Id now in Dovecot's cache
    files = [p for p in (b2.user_mail_dir("carol") / ".Archive.B").glob("*/*") if p.parent.name in ("cur", "new")]
    assert len(files) == 1
    stored = body(MOVED).replace(b"\r\n", b"\n")  # as Dovecot stores a saved message: LF line ends
    assert len(stored) == files[0].stat().st_size
    files[0].write_bytes(stored)  # UID 1 is now c0-41's file under c2-57's cache record
    seed(b2, "carol", "Archive/B", [OTHER], create=False)  # c2-57's own file, UID 2
    assert _header_ids(b2, "Archive/B") == [OTHER.encode(), OTHER.encode()]  # what Dovecot's cache says

    counts, where = census(fleet, "carol", [b2])

    assert counts[MOVED] == 1 and counts[OTHER] == 1, (counts, where)
