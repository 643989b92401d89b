"""Protocol tests of the client session with in-memory transports and scripted backends."""

from __future__ import annotations

import pytest
from twisted.python.failure import Failure

from referral_proxy.testing.fakes import DOVECOT_CAPS, FakeConnector, SessionHarness, minimal_config

NO_LITERAL_PLUS = [c for c in DOVECOT_CAPS if c != "LITERAL+"]


@pytest.fixture(params=[False, True], ids=["whole", "bytewise"])
def bytewise(request):
    return request.param


def test_greeting_and_nodelay():
    h = SessionHarness()
    assert h.client.nodelay
    assert h.to_client().startswith(b"* OK [CAPABILITY IMAP4rev1 LITERAL+ SASL-IR ID ENABLE IDLE MAILBOX-REFERRALS AUTH=PLAIN] fake.test")


def test_login_passes_credentials_and_filters_capabilities(bytewise):
    h = SessionHarness()
    h.to_client()
    h.send(b'L LOGIN alice "se cret"\r\n', one_byte_at_a_time=bytewise)
    reply = h.to_client()
    assert reply.startswith(b"L OK [CAPABILITY IMAP4rev1 LITERAL+ ID ")
    caps = reply.split(b"]")[0].split()[3:]
    assert b"IDLE" in caps and b"MOVE" in caps and b"UIDPLUS" in caps
    # Never relayed: framing changes, pre-login things, cross-backend events.
    assert not {b"COMPRESS=DEFLATE", b"SASL-IR", b"LOGIN-REFERRALS", b"NOTIFY"} & set(caps)
    assert h.connector.credentials[0].user == "alice"
    assert h.connector.credentials[0].password == "se cret"
    assert h.backend.transport.nodelay


def test_login_refused():
    h = SessionHarness(connector=FakeConnector(refuse=True))
    h.to_client()
    h.send(b"L LOGIN alice bad\r\n")
    assert h.to_client() == b"L NO [AUTHENTICATIONFAILED] Authentication failed.\r\n"
    h.send(b"N NOOP\r\n")
    assert h.to_client() == b"N OK NOOP completed.\r\n"


def test_tag_rewriting_and_raw_relay(bytewise):
    h = SessionHarness()
    h.login()
    h.send(b"a1 SELECT INBOX\r\n", one_byte_at_a_time=bytewise)
    assert h.to_backend() == b"rp1 SELECT INBOX\r\n"
    h.from_backend(b"* 3 EXISTS\r\n* FLAGS (\\Seen)\r\nrp1 OK [READ-WRITE] Select completed.\r\n")
    assert h.to_client() == b"* 3 EXISTS\r\n* FLAGS (\\Seen)\r\na1 OK [READ-WRITE] Select completed.\r\n"
    # A FETCH literal is relayed byte for byte, however it is split.
    h.send(b"a2 FETCH 1 BODY[]\r\n")
    assert h.to_backend() == b"rp2 FETCH 1 BODY[]\r\n"
    response = b"* 1 FETCH (BODY[] {11}\r\nhello\r\nworld)\r\nrp2 OK Fetch completed.\r\n"
    for i in range(len(response)):
        h.from_backend(response[i:i + 1])
    assert h.to_client() == response.replace(b"rp2", b"a2")


def test_capability_after_login_waits_for_earlier_commands():
    h = SessionHarness()
    h.login()
    h.send(b"a1 FETCH 1 BODY[]\r\na2 CAPABILITY\r\n")
    assert h.to_backend() == b"rp1 FETCH 1 BODY[]\r\n"
    assert h.to_client() == b""  # CAPABILITY is not answered in the middle of the FETCH
    h.from_backend(b"* 1 FETCH (BODY[] {3}\r\nabc)\r\n")
    h.from_backend(b"rp1 OK done\r\n")
    out = h.to_client()
    assert out.startswith(b"* 1 FETCH (BODY[] {3}\r\nabc)\r\na1 OK done\r\n* CAPABILITY IMAP4rev1 ")
    assert out.endswith(b"a2 OK Capability completed.\r\n")


def test_what_the_proxy_carries_out_itself_waits_for_the_answers_before_it():
    """A command of the proxy's own (session.run) says nothing until the relayed command before it is answered
    (probe h3 of stop 58: ``y NO Mailbox doesn't exist`` of a STATUS answered from a move's view came before
    the relayed ``x STATUS`` sent before it); a refusal read meanwhile waits behind it."""
    h = SessionHarness()
    h.login()
    h.send(b"a1 NOOP\r\n")
    assert h.to_backend() == b"rp1 NOOP\r\n"
    ran = []

    async def work() -> None:
        ran.append(True)
        h.session.tagged(b"a2", "NO", "mine")

    h.session.run(b"a2", work())
    assert ran == [] and h.to_client() == b""  # not even begun
    h.from_backend(b"rp1 OK NOOP completed.\r\n")
    assert ran == [True] and h.to_client() == b"a1 OK NOOP completed.\r\na2 NO mine\r\n"
    h.send(b"a3 NOOP\r\n")  # read again once it is done
    assert h.to_backend() == b"rp2 NOOP\r\n"


def test_collected_literal_to_backend_with_literal_plus():
    """Synchronizing even so: a backend that refuses what comes before the literal (its
    tokenizer stricter than the proxy's grammar) must never read the literal as commands."""
    h = SessionHarness()
    h.login()
    h.send(b"s1 SEARCH TEXT {5}\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"hello\r\nn NOOP\r\n")
    assert h.to_backend() == b"rp1 SEARCH TEXT {5}\r\n"
    h.from_backend(b"+ OK\r\n")
    assert h.to_backend() == b"hello\r\nrp2 NOOP\r\n"


def test_a_literal_the_backend_refuses_before_is_never_sent():
    h = SessionHarness()
    h.login()
    smuggled = b"\r\nS1 CREATE Ghost\r\n"
    h.send(b"t SEARCH \xffx {%d+}\r\n%s\r\nn NOOP\r\n" % (len(smuggled), smuggled))
    assert h.to_backend() == b"rp1 SEARCH \xffx {%d}\r\n" % len(smuggled)
    h.from_backend(b"rp1 BAD Error in IMAP command SEARCH: 8bit data in atom\r\n")
    assert h.to_backend() == b"rp2 NOOP\r\n"  # the literal's bytes never went
    assert h.to_client() == b"t BAD Error in IMAP command SEARCH: 8bit data in atom\r\n"


def test_collected_literal_to_backend_without_literal_plus():
    h = SessionHarness(connector=FakeConnector(capabilities=NO_LITERAL_PLUS))
    h.login()
    h.send(b"s1 SEARCH TEXT {5+}\r\nhello SUBJECT {2+}\r\nhi\r\nn NOOP\r\n")
    assert h.to_backend() == b"rp1 SEARCH TEXT {5}\r\n"
    h.from_backend(b"+ OK\r\n")
    assert h.to_backend() == b"hello SUBJECT {2}\r\n"
    h.from_backend(b"+ OK\r\n")
    assert h.to_backend() == b"hi\r\nrp2 NOOP\r\n"  # the pipelined NOOP waited its turn


def test_append_refused_before_literal_without_literal_plus():
    """The client sees the backend's NO before sending its synchronizing literal."""
    h = SessionHarness(connector=FakeConnector(capabilities=NO_LITERAL_PLUS))
    h.login()
    h.send(b"a1 APPEND Nowhere (\\Seen) {5}\r\n")
    assert h.to_backend() == b"rp1 APPEND Nowhere (\\Seen) {5}\r\n"
    assert h.to_client() == b""
    assert h.client.producerState == "paused"
    h.from_backend(b"rp1 NO [TRYCREATE] Mailbox doesn't exist: Nowhere\r\n")
    assert h.to_client() == b"a1 NO [TRYCREATE] Mailbox doesn't exist: Nowhere\r\n"
    assert h.client.producerState == "producing"
    h.send(b"a2 NOOP\r\n")
    assert h.to_backend() == b"rp2 NOOP\r\n"


def test_append_nonsync_literal_to_backend_without_literal_plus_is_drained_when_refused():
    h = SessionHarness(connector=FakeConnector(capabilities=NO_LITERAL_PLUS))
    h.login()
    h.send(b"a1 APPEND Nowhere {5+}\r\nhello\r\na2 NOOP\r\n")
    assert h.to_backend() == b"rp1 APPEND Nowhere {5}\r\n"
    h.from_backend(b"rp1 NO [TRYCREATE] no\r\n")
    assert h.to_client() == b"a1 NO [TRYCREATE] no\r\n"
    assert h.to_backend() == b"rp2 NOOP\r\n"  # "hello" never reached the backend


def test_append_first_sync_literal_asks_the_backend_later_small_ones_are_taken_at_once(bytewise):
    h = SessionHarness()
    h.login()
    h.send(b"a1 APPEND INBOX {5}\r\n", one_byte_at_a_time=bytewise)
    # The first message: the backend may refuse (TRYCREATE, quota) before the data.
    assert h.to_backend() == b"rp1 APPEND INBOX {5}\r\n"
    assert h.to_client() == b""
    h.from_backend(b"+ OK\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"hello (\\Seen) {3}\r\n", one_byte_at_a_time=bytewise)
    # A small later one is accepted at once and sent non-synchronizing.
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"abc\r\n", one_byte_at_a_time=bytewise)
    assert h.to_backend() == b"hello (\\Seen) {3+}\r\nabc\r\n"
    h.from_backend(b"rp1 OK [APPENDUID 1 1:2] Append completed.\r\n")
    assert h.to_client() == b"a1 OK [APPENDUID 1 1:2] Append completed.\r\n"


def test_large_sync_append_literal_waits_for_the_backend():
    h = SessionHarness()
    h.login()
    h.send(b"a1 APPEND INBOX {100000}\r\n")
    assert h.to_backend() == b"rp1 APPEND INBOX {100000}\r\n"
    assert h.to_client() == b""
    h.from_backend(b"+ OK\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"x" * 100000 + b"\r\n")
    assert h.to_backend() == b"x" * 100000 + b"\r\n"


def test_too_big_second_message_cancels_the_whole_append():
    config = minimal_config(max_message=10)
    h = SessionHarness(config)
    h.login()
    h.send(b"a1 APPEND INBOX {5+}\r\nhello {11}\r\n")
    # The backend is told to append nothing (RFC 3502 zero-length literal).
    assert h.to_backend() == b"rp1 APPEND INBOX {5+}\r\nhello {0+}\r\n\r\n"
    assert h.to_client() == b""
    h.from_backend(b"rp1 NO Zero-length literal\r\n")
    assert h.to_client() == b"a1 NO [TOOBIG] Message too large (limit 10 bytes); nothing was appended\r\n"
    h.send(b"a2 NOOP\r\n")
    assert h.to_backend() == b"rp2 NOOP\r\n"


@pytest.mark.parametrize("said, then", [
    (b"* 1 FETCH (BODY[] {100}\r\npartial", b""),  # mid-literal: nothing after its bytes
    (b"* 1 FETCH (BODY[] {7}\r\npartial)\r\n", b"* BYE Mail server connection lost\r\n"),  # between responses
], ids=["mid-literal", "between"])
def test_backend_death_closes_with_a_bye_unless_mid_response(said, then):
    """A BYE (or any answer) written after a cut literal is read by the client as the message's own bytes
    (hostile probe 5: ``...body of bigf* BYE Mail server connection lost``): the connection just closes
    there, as when Dovecot itself dies mid-literal."""
    h = SessionHarness()
    h.login()
    h.send(b"a1 FETCH 1 BODY[]\r\n")
    h.from_backend(said)
    h.backend.connectionLost(Failure(ConnectionError("gone")))
    out = h.to_client()
    assert out.endswith(said + then), out
    assert h.client.disconnecting


def test_client_drop_logs_backend_out():
    h = SessionHarness()
    h.login()
    h.session.connectionLost(Failure(ConnectionError("client gone")))
    assert h.to_backend() == b"rp1 LOGOUT\r\n"
    assert h.backend.transport.disconnecting


def test_client_drop_mid_append_closes_without_logout():
    h = SessionHarness()
    h.login()
    h.send(b"a1 APPEND INBOX {10+}\r\nhalf")
    assert h.to_backend() == b"rp1 APPEND INBOX {10+}\r\nhalf"
    h.session.connectionLost(Failure(ConnectionError("client gone")))
    # No LOGOUT inside a literal: the backend sees the connection close and saves nothing.
    assert h.to_backend() == b""
    assert h.backend.transport.disconnecting


def test_idle_relay():
    h = SessionHarness()
    h.login()
    h.send(b"i1 IDLE\r\n")
    assert h.to_backend() == b"rp1 IDLE\r\n"
    h.from_backend(b"+ idling\r\n* 4 EXISTS\r\n")
    assert h.to_client() == b"+ idling\r\n* 4 EXISTS\r\n"
    h.send(b"DONE\r\n")
    assert h.to_backend() == b"DONE\r\n"
    h.from_backend(b"rp1 OK Idle completed.\r\n")
    assert h.to_client() == b"i1 OK Idle completed.\r\n"
    h.send(b"n NOOP\r\n")
    assert h.to_backend() == b"rp2 NOOP\r\n"


def test_backpressure_pauses_the_other_side():
    h = SessionHarness()
    h.login()
    backend_transport = h.backend.transport
    # The backend's socket is full: stop reading from the client.
    backend_transport.producer.pauseProducing()
    assert h.client.producerState == "paused"
    backend_transport.producer.resumeProducing()
    assert h.client.producerState == "producing"
    # The client is slow: stop reading from the backend.
    h.client.producer.pauseProducing()
    assert backend_transport.producerState == "paused"
    h.client.producer.resumeProducing()
    assert backend_transport.producerState == "producing"


def test_starttls_discards_pipelined_plaintext():
    h = SessionHarness(minimal_config(), server_tls=object())
    h.to_client()
    h.send(b"t STARTTLS\r\nx LOGIN alice secret\r\n")
    assert h.to_client() == b"t OK Begin TLS negotiation now.\r\n"
    assert h.client.tls_started is not None
    assert h.connector.credentials == []  # the injected LOGIN was dropped


def test_plaintext_login_refused_without_tls():
    h = SessionHarness(minimal_config(allow_plaintext_login=False), server_tls=object())
    greeting = h.to_client()
    assert b"LOGINDISABLED" in greeting and b"STARTTLS" in greeting and b"AUTH=PLAIN" not in greeting
    h.send(b"l LOGIN alice secret\r\n")
    assert h.to_client() == b"l NO [PRIVACYREQUIRED] Plaintext login is disabled; use STARTTLS first\r\n"
    assert h.connector.credentials == []


def test_login_timeout():
    h = SessionHarness(minimal_config(login_timeout=5))
    h.to_client()
    h.reactor.advance(6)
    assert h.to_client() == b"* BYE Autologout; no login in time\r\n"
    assert h.client.disconnecting


def test_bad_syntax_and_wrong_state():
    h = SessionHarness()
    h.to_client()
    h.send(b"\r\n+bad NOOP\r\na1 SELECT INBOX\r\na2 LOGIN {5}\r\n")
    out = h.to_client()
    assert out.startswith(b"* BAD Invalid command: ")
    assert b"a1 BAD SELECT is not allowed before login\r\n" in out
    assert out.endswith(b"+ Ready for literal data\r\n")
    h.send(b"alice\r\n")
    assert h.to_client() == b"a2 BAD Invalid arguments: missing astring argument\r\n"


class _Source:
    def __init__(self):
        from twisted.internet.testing import StringTransport

        self.transport = StringTransport()
        self.closed = False


def test_output_keeps_responses_whole_and_pauses_the_backend_that_waits():
    from referral_proxy.flow import Output as _Output

    written = []
    out = _Output(written.append)
    a, b = _Source(), _Source()
    out.write(a, b"* 1 FETCH (BODY[] {3}\r\n", end=False)
    out.write(b, b"* 2 EXISTS\r\n")
    out.write(b, b"* 3 EXISTS\r\n")
    assert written == [b"* 1 FETCH (BODY[] {3}\r\n"]
    assert b.transport.producerState == "paused" and a.transport.producerState == "producing"
    out.write(a, b"abc)\r\n")
    assert written[1:] == [b"abc)\r\n", b"* 2 EXISTS\r\n", b"* 3 EXISTS\r\n"]
    assert b.transport.producerState == "producing"


def test_too_big_first_message_sends_nothing_to_the_backend():
    h = SessionHarness(minimal_config(max_message=10))
    h.login()
    h.send(b"a1 APPEND INBOX {11}\r\na2 NOOP\r\n")
    assert h.to_client() == b"a1 NO [TOOBIG] Message too large (limit 10 bytes); nothing was appended\r\n"
    sent = h.to_backend()
    assert b"APPEND" not in sent and sent.endswith(b" NOOP\r\n")


def test_never_mode_announces_no_mailbox_referrals():
    h = SessionHarness(minimal_config(referrals="never"))
    assert b"MAILBOX-REFERRALS" not in h.to_client()
    h.send(b"L LOGIN alice secret\r\n")
    assert b"MAILBOX-REFERRALS" not in h.to_client()
    h2 = SessionHarness()
    h2.login()
    h2.send(b"c CAPABILITY\r\n")
    assert b" MAILBOX-REFERRALS " in h2.to_client()


def test_enable_relays_only_what_the_proxy_announces():
    """ENABLE IMAP4rev2 would switch a backend that has it (Dovecot 2.4) into a protocol the proxy
    does not speak, and its `* ENABLED` would name a capability the proxy never announced."""
    h = SessionHarness()
    h.login()
    h.send(b"E ENABLE IMAP4rev2 CONDSTORE UTF8=ONLY NOTIFY X-FOO\r\n")
    sent = h.to_backend()
    assert sent.endswith(b" ENABLE CONDSTORE\r\n"), sent
    h.from_backend(b"* ENABLED CONDSTORE\r\n" + sent.split()[0] + b" OK Enabled.\r\n")
    assert h.to_client() == b"* ENABLED CONDSTORE\r\nE OK Enabled.\r\n"
    h.send(b"F ENABLE IMAP4rev2\r\n")
    sent = h.to_backend()
    assert sent.endswith(b" ENABLE\r\n"), sent  # RFC 5161 ignores what it does not know: so does the proxy


@pytest.mark.parametrize("after", [b"b NOOP\r\n", b"b FETCH 1 (UID MODSEQ)\r\n", b"b NAMESPACE\r\n", b"b ID NIL\r\n"])
def test_a_command_pipelined_after_enable_leaves_its_enabled_line_to_the_client(bytewise, after):
    """Probe C (this stop): ``a ENABLE CONDSTORE`` and ``b NOOP`` in one write lost ``* ENABLED``: the
    NOOP went after a replay of the ENABLE (remembered before it was answered), whose capture took the
    ENABLE's untagged lines. Replayed only once answered OK; the NOOP follows the ENABLE as it is."""
    h = SessionHarness()
    h.login()
    h.send(b"s SELECT INBOX\r\n")
    h.from_backend(b"* 3 EXISTS\r\n" + h.to_backend().split()[0] + b" OK [READ-WRITE] Selected.\r\n")
    h.to_client()
    h.send(b"a ENABLE CONDSTORE\r\n" + after, one_byte_at_a_time=bytewise)
    sent = h.to_backend()
    assert sent.count(b" ENABLE ") == 1 and sent.endswith(after[1:]), sent
    first, second = (line.split()[0] for line in sent.splitlines())
    h.from_backend(b"* OK [HIGHESTMODSEQ 6] Highest\r\n* ENABLED CONDSTORE\r\n" + first + b" OK Enabled.\r\n")
    h.from_backend(second + b" OK Done.\r\n")
    assert h.to_client() == (b"* OK [HIGHESTMODSEQ 6] Highest\r\n* ENABLED CONDSTORE\r\na OK Enabled.\r\n"
                             b"b OK Done.\r\n")
    h.send(b"c NOOP\r\n")
    assert h.to_backend().endswith(b" NOOP\r\n")  # enabled there: nothing replayed


# -- RFC 6855: APPEND's UTF8 (~{n}...) streamed to a backend that announced UTF8=ACCEPT ----------------

UTF8_CAPS = [*DOVECOT_CAPS, "UTF8=ACCEPT"]


def test_a_utf8_multiappend_is_streamed_to_a_backend_with_utf8_accept(bytewise):
    """Dovecot 2.3 does not announce UTF8=ACCEPT (a scripted backend stands for one that does):
    the wrapping is relayed around each literal8, a plain message between them, one command."""
    h = SessionHarness(connector=FakeConnector(capabilities=UTF8_CAPS))
    h.login()
    h.send(b"e ENABLE UTF8=ACCEPT\r\n")
    assert h.to_backend() == b"rp1 ENABLE UTF8=ACCEPT\r\n"
    h.from_backend(b"* ENABLED UTF8=ACCEPT\r\nrp1 OK Enabled.\r\n")
    h.to_client()
    h.send(b"a1 APPEND INBOX (\\Seen) UTF8 (~{5+}\r\nh\xc3\xa9!!) {2+}\r\nhi UTF8 (~{3}\r\n", one_byte_at_a_time=bytewise)
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"abc)\r\n", one_byte_at_a_time=bytewise)
    assert h.to_backend() == (b"rp2 APPEND INBOX (\\Seen) UTF8 (~{5+}\r\nh\xc3\xa9!!) {2+}\r\nhi UTF8 (~{3+}\r\nabc)\r\n")
    h.from_backend(b"rp2 OK [APPENDUID 7 1:3] Append completed.\r\n")
    assert h.to_client() == b"a1 OK [APPENDUID 7 1:3] Append completed.\r\n"


def test_a_utf8_message_to_a_backend_without_utf8_accept_is_bad_and_nothing_is_appended():
    """As such a backend answers it (Dovecot 2.3: BAD); the messages before it are cancelled with
    RFC 3502's zero-length literal, the rest of the command is dropped unread."""
    h = SessionHarness()
    h.login()
    h.send(b"a1 APPEND INBOX {5+}\r\nhello UTF8 (~{17+}\r\nx1 CREATE Smuggle) {3+}\r\nabc\r\na2 NOOP\r\n")
    assert h.to_backend() == b"rp1 APPEND INBOX {5+}\r\nhello {0+}\r\n\r\nrp2 NOOP\r\n"  # nothing of the rest
    h.from_backend(b"rp1 NO Zero-length literal\r\nrp2 OK NOOP completed.\r\n")
    assert h.to_client() == (b"a1 BAD Invalid arguments: UTF8 message data (RFC 6855) is not taken by this mail server\r\n"
                             b"a2 OK NOOP completed.\r\n")


def test_a_refusal_naming_a_private_mailbox_leaves_the_name_out():
    """Probe l3: Dovecot's SELECT of one mailbox, while a move renamed another aside, said `NO Mailbox doesn't exist:
    referral-proxy-aside-1b574d03` (its list index mid-rename): the proxy's private name reached the client."""
    h = SessionHarness()
    h.login()
    said = []
    for tag, line, named in ((b"s", b'SELECT "Sh\\"q"', b"referral-proxy-aside-1b574d03"), (b"t", b"STATUS Work (MESSAGES)", b"Work")):
        h.send(tag + b" " + line + b"\r\n")
        ptag = h.to_backend().split(b" ")[0]
        h.from_backend(ptag + b" NO Mailbox doesn't exist: " + named + b" (0.001 + 0.000 secs).\r\n")
        said.append(h.to_client())
    assert said == [b"s NO Mailbox doesn't exist (0.001 + 0.000 secs).\r\n",
                    b"t NO Mailbox doesn't exist: Work (0.001 + 0.000 secs).\r\n"]  # a name of the client's: kept
