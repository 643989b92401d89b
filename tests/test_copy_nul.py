"""A message holding NUL bytes copied across (copystream.py), in the corners a real Dovecot will not
produce on demand (scripted backends): the wire exactly, a BINARY FETCH refused, a cancel not refused."""

from __future__ import annotations

from test_transfer_faults import _across_of_one, _selected, _take

from referral_proxy.testing.fakes import SessionHarness

DATE = b'"01-Jan-2020 10:00:00 +0000"'


def _copy_read_once(body: bytes) -> tuple[SessionHarness, object, object]:
    """``UID COPY 4 Shared/X`` of a message whose BODY[] is *body*, up to its BODY[] sent to the destination."""
    h, src = _selected(1)
    dst = _across_of_one(h, src, b"c UID COPY 4 Shared/X", len(body))
    assert _take(src).endswith(b"rp4 UID FETCH 4 (UID BODY.PEEK[])\r\n")
    src.dataReceived(b"* 1 FETCH (UID 4 BODY[] {%d}\r\n" % len(body) + body + b")\r\nrp4 OK\r\n")
    sent = b"rp2 APPEND Shared/X () " + DATE + b" {%d+}\r\n" % len(body) + body
    written = _take(dst)
    assert written.startswith(sent)
    dst.transport.io.write(written[len(sent):])  # what came after the body: the test's to see
    return h, src, dst


def test_a_message_holding_nul_bytes_is_sent_again_as_literal8():
    h, src, dst = _copy_read_once(b"a\x80b\x80")
    # Its BODY[] holds 0x80: BINARY[] is read; a NUL there, the same message otherwise: the stored bytes.
    assert _take(src) == b"rp5 UID FETCH 4 (UID BINARY.PEEK[])\r\n"
    src.dataReceived(b"* 1 FETCH (UID 4 BINARY[] ~{4}\r\na\x00b\x80)\r\nrp5 OK\r\n")
    assert _take(dst) == b" CANCEL\r\n"  # before the commit's CRLF: the MULTIAPPEND is refused whole
    dst.dataReceived(b"rp2 BAD Error in IMAP command APPEND: Invalid arguments\r\n")
    assert _take(src) == b"rp6 UID FETCH 4 (UID BINARY.PEEK[])\r\n"
    src.dataReceived(b"* 1 FETCH (UID 4 BINARY[] ~{4}\r\na\x00b\x80)\r\nrp6 OK\r\n")
    assert _take(dst) == b"rp3 APPEND Shared/X () " + DATE + b" ~{4+}\r\na\x00b\x80\r\n"
    dst.dataReceived(b"rp3 OK [APPENDUID 9 5] Append completed.\r\n")
    assert h.to_client() == b"c OK [COPYUID 9 4 5] Copy completed.\r\n"


def test_a_message_whose_binary_is_another_or_refused_is_sent_as_its_body():
    for answer in (b"* 1 FETCH (UID 4 BINARY[] {4}\r\na\x80b\x80)\r\nrp5 OK\r\n",  # 0x80 it is: no NUL
                   b"* 1 FETCH (UID 4 BINARY[] ~{3}\r\na\x00b)\r\nrp5 OK\r\n",  # a part decoded: not its BODY[]
                   b"rp5 NO [PARSE] Invalid data in MIME part\r\n"):  # Dovecot: a base64 part it cannot decode
        h, src, dst = _copy_read_once(b"a\x80b\x80")
        assert _take(src) == b"rp5 UID FETCH 4 (UID BINARY.PEEK[])\r\n"
        src.dataReceived(answer)
        assert _take(dst) == b"\r\n", answer  # committed as read, as before
        dst.dataReceived(b"rp2 OK [APPENDUID 9 5] Append completed.\r\n")
        assert h.to_client() == b"c OK [COPYUID 9 4 5] Copy completed.\r\n"


def test_a_destination_that_takes_the_cancel_gets_nothing_more():
    h, src, dst = _copy_read_once(b"a\x80")
    src.dataReceived(b"* 1 FETCH (UID 4 BINARY[] ~{2}\r\na\x00)\r\nrp5 OK\r\n")
    assert _take(dst) == b" CANCEL\r\n"
    dst.dataReceived(b"rp2 OK [APPENDUID 9 5] Append completed.\r\n")  # no server should
    assert h.to_client().startswith(b"c NO backend b2 did not refuse a cancelled MULTIAPPEND")
    assert _take(src) == b"rp5 UID FETCH 4 (UID BINARY.PEEK[])\r\n" and b"APPEND" not in _take(dst)


def test_no_binary_fetch_for_a_body_without_0x80():
    h, src, dst = _copy_read_once(b"plain \xc3\xa9")
    assert _take(src) == b"" and _take(dst) == b"\r\n"
    dst.dataReceived(b"rp2 OK [APPENDUID 9 5] Append completed.\r\n")
    assert h.to_client() == b"c OK [COPYUID 9 4 5] Copy completed.\r\n"
