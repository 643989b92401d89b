"""Hostile clients against the session (scripted backends): nothing smuggled, no wedge, no forged line.

Each test sends what an attacker would, often in one write, and checks the exact
bytes a backend receives: they must parse as exactly the commands the proxy
checked, re-encoded, and nothing else.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from referral_proxy.config import parse_config
from referral_proxy.imap.command import String, parse_arguments, parse_command_start
from referral_proxy.imap.framing import NEED_DATA, Framer, Line, LiteralData, LiteralEnd
from referral_proxy.session import safe_text
from referral_proxy.testing.fakes import DOVECOT_CAPS, FakeConnector, SessionHarness

NO_LITERAL_PLUS = [c for c in DOVECOT_CAPS if c != "LITERAL+"]


def backend_commands(data: bytes) -> list[tuple[bytes, str, list]]:
    """Every whole command in what a backend received: (tag, name, argument tokens)."""
    framer = Framer(1 << 20, auto_accept=True)
    framer.receive_data(data)
    out, fragments, literals, current = [], [], [], None
    while True:
        ev = framer.next_event()
        if ev is NEED_DATA:
            break
        if isinstance(ev, Line):
            fragments.append(ev.data)
            if ev.literal is not None:
                # "CREATE{5+}" is no command at all for a backend: a literal follows a space.
                assert ev.data.endswith((b" ", b"(")), f"no space before a literal: {ev.data!r}"
                current = bytearray()
                continue
            start = parse_command_start(fragments[0])
            out.append((start.tag, start.name, parse_arguments([start.rest] + fragments[1:], literals)))
            fragments, literals = [], []
        elif isinstance(ev, LiteralData):
            current += ev.data
        elif isinstance(ev, LiteralEnd):
            literals.append(bytes(current))
    assert not fragments, f"an unfinished command reached the backend: {fragments!r}"
    return out


def test_noop_then_sync_append_in_one_write_neither_crashes_nor_wedges():
    h = SessionHarness()
    h.login()
    h.send(b"a NOOP\r\nb APPEND INBOX {5}\r\n")
    assert h.to_backend() == b"rp1 NOOP\r\nrp2 APPEND INBOX {5}\r\n"
    h.from_backend(b"rp1 OK NOOP done\r\n")  # the NOOP's answer must not let the literal in
    assert h.to_client() == b"a OK NOOP done\r\n"
    h.from_backend(b"+ go\r\n")
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(b"hello\r\nc NOOP\r\n")
    h.from_backend(b"rp2 OK [APPENDUID 1 1] done\r\nrp3 OK fine\r\n")
    assert h.to_backend() == b"hello\r\nrp3 NOOP\r\n"
    assert h.to_client() == b"b OK [APPENDUID 1 1] done\r\nc OK fine\r\n"


def test_unclosed_flag_list_is_refused_and_the_session_goes_on():
    h = SessionHarness()
    h.login()
    h.send(b"a APPEND INBOX (\\Seen {5}\r\nb NOOP\r\n")
    assert h.to_client() == b"a BAD Invalid arguments: unbalanced parentheses\r\n"
    assert h.to_backend() == b"rp1 NOOP\r\n"


def _idling() -> SessionHarness:
    h = SessionHarness()
    h.login()
    h.send(b"i IDLE\r\n")
    h.from_backend(b"+ idling\r\n")
    assert h.to_client() == b"+ idling\r\n"
    return h


def test_idle_reads_only_done_and_what_follows_is_the_next_command():
    h = _idling()
    h.send(b"DONE\r\nx2 NOOP\r\n")
    assert h.to_backend() == b"rp1 IDLE\r\nDONE\r\nrp2 NOOP\r\n"
    h.from_backend(b"rp1 OK Idle completed.\r\nrp2 OK NOOP completed.\r\n")
    assert h.to_client() == b"i OK Idle completed.\r\nx2 OK NOOP completed.\r\n"


def test_anything_but_done_during_idle_ends_it_and_never_reaches_the_backend():
    h = _idling()
    # The line is text, as Dovecot reads it (its {3+} no literal: probe t2 of stop 51); "abc" is the next line
    h.send(b"S1 CREATE Shared/Ghost {3+}\r\nabc\r\nn NOOP\r\n")
    assert h.to_backend() == b"rp1 IDLE\r\nDONE\r\n"
    h.from_backend(b"rp1 OK Idle completed.\r\n")
    assert h.to_backend() == b"rp2 NOOP\r\n"  # after abc's BAD, which waited for the IDLE's answer
    h.from_backend(b"rp2 OK NOOP completed.\r\n")
    assert h.to_client() == b"i BAD Expected DONE.\r\nabc BAD Invalid command: missing command name\r\nn OK NOOP completed.\r\n"


def test_idle_refused_at_once_leaves_no_line_mode_behind():
    h = SessionHarness()
    h.login()
    h.send(b"i IDLE\r\n")
    h.from_backend(b"rp1 BAD not now\r\n")
    h.send(b"n NOOP\r\n")
    assert h.to_backend() == b"rp1 IDLE\r\nrp2 NOOP\r\n"


@pytest.mark.parametrize("attack", [
    b"N NOOP {25+}\r\n\r\nS1 CREATE Shared/Ghost\r\n\r\n",
    b"N NOOP extra\r\n",
    b'C CREATE "Wor\\k"\r\n',
    b'C CREATE "Shared/\\Z"\r\n',
    b"X FROBNICATE {5+}\r\nhello\r\n",
    b"X XLIST \"\" *\r\n",
    b"L LOGIN bob secret\r\n",
    b"U UID FROB 1\r\n",
])
def test_what_the_proxy_cannot_check_reaches_no_backend(attack):
    h = SessionHarness()
    h.login()
    h.send(attack + b"n NOOP\r\n")
    reply = h.to_client()
    assert reply.split(b" ", 2)[1] == b"BAD", reply
    assert backend_commands(h.to_backend()) == [(b"rp1", "NOOP", [])]


def test_a_first_argument_literal_is_one_argument_and_nothing_more():
    h = SessionHarness()
    h.login()
    evil = b"Evil\r\nX9 CREATE Injected\r\nX10 NOOP"
    h.send(b"c CREATE {%d}\r\n" % len(evil))
    assert h.to_client() == b"+ Ready for literal data\r\n"
    h.send(evil + b"\r\n")
    sent = h.to_backend()
    assert sent == b"rp1 CREATE {%d}\r\n" % len(evil)  # synchronizing: nothing more before the backend's +
    h.from_backend(b"+ OK\r\n")
    assert backend_commands(sent + h.to_backend()) == [(b"rp1", "CREATE", [String(evil, literal=True)])]


def test_proxy_texts_never_carry_a_line_break():
    assert safe_text("[TRYCREATE] Mailbox doesn't exist: a\r\n* BYE forged\r\nC2 OK") == \
        "[TRYCREATE] Mailbox doesn't exist: a??* BYE forged??C2 OK"


def test_cross_server_copy_refusal_does_not_echo_a_forged_line():
    config = parse_config({
        "proxy": {"listen": ["tcp:1143:interface=127.0.0.1"]},
        "backends": {"b1": {"endpoint": "tcp:host=127.0.0.2:port=1", "url": "imap://127.0.0.2:1"},
                     "b2": {"endpoint": "tcp:host=127.0.0.3:port=1", "url": "imap://127.0.0.3:1"}},
        "map": {"default": "b1", "rules": [{"mailbox": "Shared/*", "backend": "b2"}]},
    }, base=Path("."))
    h = SessionHarness(config)
    h.login()
    src = h.backend
    h.send(b"s SELECT INBOX\r\n")
    h.from_backend(b"* 1 EXISTS\r\nrp1 OK [READ-WRITE] done\r\n")
    h.to_client()
    name = b"Shared/x\r\n* BYE forged\r\nC2 OK done"
    h.send(b"c COPY 1 {%d+}\r\n%s\r\n" % (len(name), name))
    src.dataReceived(b"* SEARCH 7\r\nrp2 OK\r\n")
    dst = h.backend
    assert dst is not src
    dst.dataReceived(b"rp1 OK listed\r\n")  # no LIST entry: the destination does not exist
    assert h.to_client() == b""  # its STATUS tells a missing name from a refused one (mailops.refused_target)
    dst.dataReceived(b"rp2 NO [NONEXISTENT] Mailbox doesn't exist: Shared/x\r\n")
    reply = h.to_client()
    assert reply.startswith(b"c NO [TRYCREATE] ") and reply.count(b"\r\n") == 1, reply


def test_create_empty_name_in_a_referral_aware_session_of_a_user_elsewhere():
    config = parse_config({
        "proxy": {"listen": ["tcp:1143:interface=127.0.0.1"], "referrals": "always"},
        "backends": {"b1": {"endpoint": "tcp:host=127.0.0.2:port=1", "url": "imap://127.0.0.2:1"},
                     "b2": {"endpoint": "tcp:host=127.0.0.3:port=1", "url": "imap://127.0.0.3:1"}},
        "map": {"default": "b1", "rules": [{"user": "bob", "mailbox": "INBOX", "backend": "b2"}]},
    }, base=Path("."))
    h = SessionHarness(config)
    h.login(b"bob")  # home b2, where "" would have gone by the rules to the default, b1
    h.send(b'c CREATE ""\r\n')
    assert h.to_backend() == b'rp1 CREATE ""\r\n'  # bob's home answers it
    h.from_backend(b"rp1 NO Invalid mailbox name\r\n")
    assert h.to_client() == b"c NO Invalid mailbox name\r\n"


def test_pipelining_before_login_and_after():
    h = SessionHarness()
    h.to_client()
    h.send(b"a CAPABILITY\r\nb NOOP\r\nc LOGIN alice secret\r\nd NOOP\r\ne SELECT INBOX\r\nf FETCH 1 FLAGS\r\n")
    out = h.to_client()
    assert [line.split(b" ")[0] for line in out.split(b"\r\n") if line and not line.startswith(b"*")] == [
        b"a", b"b", b"c"]
    assert h.to_backend() == b"rp1 NOOP\r\nrp2 SELECT INBOX\r\nrp3 FETCH 1 FLAGS\r\n"


def test_esearch_tags_are_the_clients_both_ways():
    h = SessionHarness()
    h.login()
    h.send(b"s SELECT INBOX\r\na1 SEARCH RETURN (ALL) ALL\r\na3 SEARCH RETURN (UPDATE) ALL\r\n")
    assert h.to_backend() == b"rp1 SELECT INBOX\r\nrp2 SEARCH RETURN (ALL) ALL\r\nrp3 SEARCH RETURN (UPDATE) ALL\r\n"
    h.from_backend(b"rp1 OK selected\r\n* ESEARCH (TAG \"rp2\") ALL 1:6\r\nrp2 OK done\r\n"
                   b"* ESEARCH (TAG \"rp3\")\r\nrp3 OK done\r\n")
    assert h.to_client() == (b"s OK selected\r\n* ESEARCH (TAG \"a1\") ALL 1:6\r\na1 OK done\r\n"
                             b"* ESEARCH (TAG \"a3\")\r\na3 OK done\r\n")
    # A CONTEXT=SEARCH update arrives later, in another command's time.
    h.send(b"n NOOP\r\n")
    h.from_backend(b"* 7 EXISTS\r\n* ESEARCH (TAG \"rp3\") UID ADDTO (7 77)\r\nrp4 OK\r\n")
    assert h.to_client() == b"* 7 EXISTS\r\n* ESEARCH (TAG \"a3\") UID ADDTO (7 77)\r\nn OK\r\n"
    h.send(b'a4 CANCELUPDATE "a3"\r\n')
    assert h.to_backend() == b'rp4 NOOP\r\nrp5 CANCELUPDATE "rp3"\r\n'
    h.from_backend(b"rp5 OK cancelled\r\n")
    assert h.to_client() == b"a4 OK cancelled\r\n"



def test_a_search_with_updates_past_the_limit_is_refused_and_the_others_keep_the_clients_tags():
    """Probe v4 (stop 52): after 70 ``RETURN (UPDATE)`` searches the proxy forgot the six oldest: their updates
    came as ``(TAG "rp4")``, the proxy's own tag, and ``CANCELUPDATE "u0"`` went to Dovecot as it was (NO
    Unknown tag): u0's updates never stopped. One past relay.MAX_UPDATES is refused now (RFC 5267 NOUPDATE)."""
    from referral_proxy.relay import MAX_UPDATES

    h = SessionHarness()
    h.login()
    h.send(b"s SELECT INBOX\r\n")
    h.from_backend(h.to_backend().split(b" ")[0] + b" OK selected\r\n")
    for i in range(MAX_UPDATES + 1):
        h.send(b"u%d UID SEARCH RETURN (UPDATE) SEEN\r\n" % i)
        ptag = h.to_backend().split(b" ")[0]
        if i < MAX_UPDATES:
            h.from_backend(b"%s OK done\r\n" % ptag)
    out = h.to_client()
    assert out.endswith(b'u%d OK done\r\nu%d NO [NOUPDATE "u%d"] Too many searches with updates; CANCELUPDATE one '
                        b"first\r\n" % (MAX_UPDATES - 1, MAX_UPDATES, MAX_UPDATES)), out[-200:]
    assert ptag == b""  # the refused one never went
    h.send(b"n NOOP\r\n")
    h.from_backend(b'* ESEARCH (TAG "rp2") UID ADDTO (0 3)\r\n' + h.to_backend().split(b" ")[0] + b" OK\r\n")
    assert h.to_client() == b'* ESEARCH (TAG "u0") UID ADDTO (0 3)\r\nn OK\r\n'  # the first still the client's
    h.send(b'c CANCELUPDATE "u0"\r\n')
    assert h.to_backend().endswith(b'CANCELUPDATE "rp2"\r\n')


# -- literals in every position, toward backends with and without LITERAL+ ---------------------

_value = st.one_of(st.binary(max_size=8), st.sampled_from([b"", b"\r\n", b"\x00", b"a\r\nb NOOP\r\n", b"}"]))


def _client_command(parts: list[tuple[str, bytes]]) -> bytes:
    """``t SEARCH`` and each argument as an atom, a quoted string, a sync or a {n+} literal."""
    out = b"t SEARCH"
    for kind, value in parts:
        if kind == "atom":
            out += b" " + value
        elif kind == "quoted":
            out += b' "' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
        else:
            out += b" {%d%s}\r\n" % (len(value), b"+" if kind == "plus" else b"") + value
    return out + b"\r\n"


_argument = st.one_of(
    st.tuples(st.just("atom"), st.sampled_from([b"TEXT", b"OR", b"1:*", b"UID", b"$"])),
    st.tuples(st.just("quoted"), st.binary(max_size=6).filter(lambda v: not set(v) & {0, 10, 13})),
    st.tuples(st.sampled_from(["sync", "plus"]), _value),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_argument, min_size=1, max_size=5), st.booleans())
def test_the_backend_receives_exactly_the_arguments_and_nothing_after(parts, literal_plus):
    caps = DOVECOT_CAPS if literal_plus else NO_LITERAL_PLUS
    h = SessionHarness(connector=FakeConnector(capabilities=caps))
    h.login()
    h.send(_client_command(parts) + b"n NOOP\r\n")
    received = b""
    for _ in range(len(parts) + 2):  # answer every "+" the backend is asked for
        chunk = h.to_backend()
        received += chunk
        if chunk.endswith(b"}\r\n"):
            h.from_backend(b"+ go\r\n")
    commands = backend_commands(received)
    assert [(tag, name) for tag, name, _ in commands] == [(b"rp1", "SEARCH"), (b"rp2", "NOOP")]
    sent = [(b"atom", v) if k == "atom" else (b"string", v) for k, v in parts]
    got = [(b"string" if isinstance(t, String) else b"atom", t.value) for t in commands[0][2]]
    assert got == sent
