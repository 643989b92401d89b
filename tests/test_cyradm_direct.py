"""cyradm (Debian cyrus-admin), a real referral-following IMAP client, against the
Dovecot fleet directly (no proxy): what it sends and how it follows RFC 2193
referrals.  The proxy's own cyradm tests build on what these pin down; see the
docstring of tests/cyradm.py for the recorded transcripts.

The referral tests put a RecordingRelay in front of b1 that makes it look like a
referral server (MAILBOX-REFERRALS announced, RLIST sent on as LIST, chosen
commands answered ``NO [REFERRAL url]`` without reaching b1)."""

from __future__ import annotations

import base64
import os

import pytest
from cyradm import (
    RecordingRelay,
    ReferralRewriter,
    cyradm_available,
    parse_lm,
    quote,
    readline_implementation,
    run_cyradm,
)

USER, PASSWORD = "alice", "secret"
PLAIN_RESPONSE = base64.b64encode(b"\0alice\0secret")


@pytest.fixture(scope="module", autouse=True)
def need_cyradm():
    """Skip (fail under CI) when cyradm cannot be used here."""
    reason = cyradm_available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"cyradm needed in CI (apt-get install cyrus-admin libsasl2-modules): {reason}")
        pytest.skip(reason)


@pytest.fixture
def relays():
    """``relays(target_host, target_port, rewrite=None, **kw) -> RecordingRelay``,
    all stopped at teardown."""
    made: list[RecordingRelay] = []

    def make(host, port, rewrite=None, **kw) -> RecordingRelay:
        relay = RecordingRelay(host, port, rewrite, **kw)
        made.append(relay)
        return relay

    yield make
    for relay in made:
        relay.stop()


def names(backend, user: str = USER) -> set[str]:
    """The mailbox names *user* has on *backend* (imaplib, raw modified UTF-7)."""
    conn = backend.client(user)
    try:
        typ, data = conn.list()
        assert typ == "OK", data
        found = set()
        for item in data:
            if item is None:
                continue
            if isinstance(item, tuple):  # name sent as a literal
                found.add(item[1].decode())
                continue
            name = item.decode().split(' "/" ', 1)[1]
            if name.startswith('"'):
                name = name[1:-1].replace('\\"', '"').replace("\\\\", "\\")
            found.add(name)
        return found
    finally:
        conn.logout()


def create(backend, *mailboxes: str, user: str = USER) -> None:
    conn = backend.client(user)
    try:
        for mbox in mailboxes:
            typ, data = conn.create(f'"{mbox}"' if " " in mbox else mbox)
            assert typ == "OK", (mbox, data)
    finally:
        conn.logout()


def lines(relay: RecordingRelay, connection: int = 0) -> list[bytes]:
    """The command lines the client sent on one connection through *relay*."""
    assert relay.wait_closed(), "cyradm's connection did not end"
    return relay.connections[connection].commands()


def words(line: bytes) -> list[bytes]:
    """A command line without its tag."""
    return line.split(b" ")[1:]


def report(result, *relays: RecordingRelay) -> str:
    text = str(result)
    for i, relay in enumerate(relays, 1):
        relay.wait_closed(2)
        text += f"\n--- relay {i} ({relay.target[0]}:{relay.target[1]}) ---\n{relay.transcript()}"
    return text


# ----------------------------------------------------------------- plain cyradm


def test_lm_lists_alices_mailboxes(clean_mail, relays):
    b1 = clean_mail["b1"]
    create(b1, "Projects", "Projects/2024", "a b", "R&AOk-sum&AOk-")
    relay = relays(b1.host, b1.port)
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["lm"])
    assert result.returncode == 0 and not result.errors, report(result, relay)
    assert result.prompt == "127.0.0.1> "
    listed = parse_lm(result.outputs[0])
    assert set(listed) == {"INBOX", "Projects", "Projects/2024", "a b", "R&AOk-sum&AOk-"}, \
        report(result, relay)
    assert listed["Projects"] == r"\HasChildren"
    assert listed["INBOX"] == r"\HasNoChildren"

    # the whole conversation: no RLIST (Dovecot announces no MAILBOX-REFERRALS)
    sent = lines(relay)
    assert [words(c) for c in sent] == [
        [b"CAPABILITY"], [b"CAPABILITY"], [b"AUTHENTICATE", b"PLAIN"], [b"LIST", b'""', b'"*"'],
    ], report(result, relay)
    assert [c.split(b" ")[0] for c in sent] == [b"1", b"2", b"3", b"4"]
    c2s = relay.client_to_server
    assert b"\r\n" + PLAIN_RESPONSE + b"\r\n" in c2s  # SASL PLAIN, authzid empty
    assert b"LOGOUT" not in c2s  # at EOF it just closes the connection


@pytest.mark.parametrize("perl_rl", ["Stub", "Gnu"])
def test_outputs_with_either_line_editor(clean_mail, perl_rl):
    """cyradm's Term::ReadLine::Gnu echoes every command after its prompt, the Stub
    does not: the outputs read the same either way, even for a mailbox named like
    the command it lists (what 7 tests mistook for a mailbox before)."""
    implementation = readline_implementation({"PERL_RL": perl_rl})
    if implementation != f"Term::ReadLine::{perl_rl}":
        if os.environ.get("CI"):
            pytest.fail(f"Term::ReadLine::{perl_rl} needed in CI (Debian libterm-readline-gnu-perl)")
        pytest.skip(f"Term::ReadLine::{perl_rl} is not installed (got {implementation})")
    b1 = clean_mail["b1"]
    create(b1, "lm", "Work")
    commands = ["lm", "cm cm", "lm lm", "lm"]
    result = run_cyradm(b1.host, b1.port, USER, PASSWORD, commands, env={"PERL_RL": perl_rl})
    assert result.returncode == 0 and not result.errors, str(result)
    assert result.readline == implementation
    echoed = all(f"> {c}\n" in result.stdout for c in commands)
    assert echoed == (perl_rl == "Gnu"), str(result)
    assert len(result.outputs) == 4, str(result)
    assert set(parse_lm(result.outputs[0])) == {"INBOX", "lm", "Work"}
    assert result.outputs[1] == ""
    assert set(parse_lm(result.outputs[2])) == {"lm"}
    assert set(parse_lm(result.outputs[3])) == {"INBOX", "lm", "cm", "Work"}


def test_cm_creates_a_mailbox_on_the_backend(clean_mail, relays):
    b1 = clean_mail["b1"]
    relay = relays(b1.host, b1.port)
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD,
                        ["cm Reports", f"cm {quote('Old mail')}", "lm"])
    assert result.returncode == 0 and not result.errors, report(result, relay)
    assert {"Reports", "Old mail"} <= names(b1)
    assert set(parse_lm(result.outputs[2])) == {"INBOX", "Reports", "Old mail"}
    sent = [words(c) for c in lines(relay)]
    assert [b"CREATE", b"Reports"] in sent
    assert [b"CREATE", b'"Old', b'mail"'] in sent  # quoted string, not a literal


def test_dm_deletes_a_mailbox_on_the_backend(clean_mail, relays):
    b1 = clean_mail["b1"]
    create(b1, "Trash2", "Keep")
    relay = relays(b1.host, b1.port)
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["dm Trash2"])
    assert result.returncode == 0 and not result.errors, report(result, relay)
    assert names(b1) == {"INBOX", "Keep"}
    sent = [words(c) for c in lines(relay)]
    assert sent[-1] == [b"DELETE", b"Trash2"]
    assert not any(c[0] in (b"SETACL", b"GETACL") for c in sent)  # no "sam ... x" needed


def test_failed_commands_go_to_stderr_and_exit_status_stays_zero(clean_mail):
    b1 = clean_mail["b1"]
    result = run_cyradm(b1.host, b1.port, USER, PASSWORD, ["dm Nope", "cm Dup", "cm Dup", "lm"])
    assert result.returncode == 0, report(result)
    assert len(result.errors) == 2, report(result)
    assert result.errors[0].startswith("deletemailbox: [NONEXISTENT]"), report(result)
    assert result.errors[1].startswith("createmailbox: [ALREADYEXISTS]"), report(result)
    assert set(parse_lm(result.outputs[3])) == {"INBOX", "Dup"}  # the shell went on


def test_wrong_password_exits_255(fleet):
    b1 = fleet["b1"]
    result = run_cyradm(b1.host, b1.port, USER, "wrong", ["lm"])
    assert result.returncode == 255, report(result)
    assert "cannot authenticate to server with PLAIN as alice" in result.stderr, report(result)
    assert result.outputs == []


def test_password_with_quotes_and_backslash(fleet, relays):
    b1 = fleet["b1"]
    relay = relays(b1.host, b1.port)
    password = b1.password("dave")
    result = run_cyradm(relay.host, relay.port, "dave", password, ["lm"])
    assert result.returncode == 0 and not result.errors, report(result, relay)
    assert b"\r\n" + base64.b64encode(b"\0dave\0" + password.encode()) + b"\r\n" \
        in relay.client_to_server


def test_unknown_commands_are_refused_before_running_cyradm():
    # cyradm would hand them to /bin/sh (and a failed exec leaves a second shell)
    with pytest.raises(ValueError):
        run_cyradm("127.0.0.1", 1, USER, PASSWORD, ["lm; rm -rf /tmp/x"])
    with pytest.raises(ValueError):
        run_cyradm("127.0.0.1", 1, USER, PASSWORD, ["ls"])


# ------------------------------------------------- as seen by a referral server


def referral_relay(relays, backend, referrals: dict[bytes, str], capabilities=("MAILBOX-REFERRALS",)):
    """A relay in front of *backend* announcing *capabilities*, that answers the
    commands in *referrals* (``b"CREATE Foo"`` = command name and first argument)
    with ``NO [REFERRAL <urls>] Remote mailbox``."""

    def refer(line: bytes) -> bytes | None:
        key = b" ".join(words(line)[:2])
        for wanted, urls in referrals.items():
            if key.upper() == wanted.upper():
                return f"NO [REFERRAL {urls}] Remote mailbox".encode()
        return None

    rewriter = ReferralRewriter(refer, capabilities)
    relay = relays(backend.host, backend.port, rewriter.rewrite,
                   rewrite_client=rewriter.rewrite_client)
    relay.rewriter = rewriter
    return relay


def url(host: str, port: int, mailbox: str, user: str = USER) -> str:
    return f"imap://{user};AUTH=*@{host}:{port}/{mailbox}"


def test_refused_rlist_means_cyradm_cannot_log_in(fleet, relays):
    b1 = fleet["b1"]
    rewriter = ReferralRewriter()  # announces MAILBOX-REFERRALS, but RLIST reaches Dovecot
    relay = relays(b1.host, b1.port, rewriter.rewrite)
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["lm"])
    assert result.returncode == 255, report(result, relay)
    assert "cannot authenticate to server" in result.stderr
    sent = [words(c) for c in lines(relay)]
    assert sent[2:] == [[b"AUTHENTICATE", b"PLAIN"], [b"RLIST", b'""', b'""']], report(result, relay)
    assert b"BAD" in relay.server_to_client.splitlines()[-1]


def test_lm_uses_rlist_when_referrals_are_announced(clean_mail, relays):
    b1 = clean_mail["b1"]
    create(b1, "Projects")
    relay = referral_relay(relays, b1, {})
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["lm", "lm --subscribed"])
    assert result.returncode == 0 and not result.errors, report(result, relay)
    assert set(parse_lm(result.outputs[0])) == {"INBOX", "Projects"}
    sent = [words(c) for c in lines(relay)]
    assert sent[2:] == [[b"AUTHENTICATE", b"PLAIN"],
                        [b"RLIST", b'""', b'""'],       # right after login
                        [b"RLIST", b'""', b'"*"'],      # lm
                        [b"RLSUB", b'"*"', b'"*"']], report(result, relay)  # lm --subscribed


def test_lm_uses_list_remote_with_list_extended_before_login(clean_mail, relays):
    b1 = clean_mail["b1"]
    relay = referral_relay(relays, b1, {}, capabilities=("MAILBOX-REFERRALS", "LIST-EXTENDED"))
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["lm"])
    assert result.returncode == 0 and not result.errors, report(result, relay)
    assert set(parse_lm(result.outputs[0])) == {"INBOX"}
    assert [words(c) for c in lines(relay)][-1] == \
        [b"LIST", b"(REMOTE)", b'""', b'"*"', b"RETURN", b"(SUBSCRIBED)"], report(result, relay)


def test_follows_a_create_referral_to_another_backend(clean_mail, relays):
    b1, b2 = clean_mail["b1"], clean_mail["b2"]
    to_b2 = relays(b2.host, b2.port)  # records the referred connection
    relay = referral_relay(relays, b1, {b"CREATE Moved": url(to_b2.host, to_b2.port, "Moved")})
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["cm Moved"])
    assert result.returncode == 0 and not result.errors, report(result, relay, to_b2)

    assert "Moved" in names(b2), report(result, relay, to_b2)
    assert "Moved" not in names(b1)  # b1 never saw the CREATE (it got a NOOP)
    assert relay.rewriter.referred == [b"5 CREATE Moved"]
    # a new connection to b2, the same credentials and mechanism, the url's mailbox
    assert len(to_b2.connections) == 1
    referred = [words(c) for c in lines(to_b2)]
    assert referred == [[b"CAPABILITY"], [b"CAPABILITY"], [b"AUTHENTICATE", b"PLAIN"],
                        [b"CREATE", b"Moved"]], report(result, relay, to_b2)
    assert b"\r\n" + PLAIN_RESPONSE + b"\r\n" in to_b2.client_to_server
    assert b"LOGOUT" not in to_b2.client_to_server


def test_follows_a_create_referral_to_the_backend_address_itself(clean_mail, relays):
    b1, b3 = clean_mail["b1"], clean_mail["b3"]
    relay = referral_relay(relays, b1, {b"CREATE Elsewhere": url(b3.host, b3.port, "Elsewhere")})
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["cm Elsewhere", "lm"])
    assert result.returncode == 0 and not result.errors, report(result, relay)
    assert "Elsewhere" in names(b3)
    assert "Elsewhere" not in names(b1)
    # lm (RLIST on b1) does not show it: listing is the server's job, not cyradm's
    assert set(parse_lm(result.outputs[1])) == {"INBOX"}


def test_the_user_in_the_url_is_ignored_and_the_mailbox_is_decoded(clean_mail, relays):
    b1, b2 = clean_mail["b1"], clean_mail["b2"]
    to_b2 = relays(b2.host, b2.port)
    relay = referral_relay(relays, b1, {
        b"CREATE Resume": url(to_b2.host, to_b2.port, "R%C3%A9sum%C3%A9", user="bob"),
    })
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["cm Resume"])
    assert result.returncode == 0 and not result.errors, report(result, relay, to_b2)
    # percent-encoded UTF-8 in the url -> modified UTF-7 on the wire, in alice's account
    assert [words(c) for c in lines(to_b2)][-1] == [b"CREATE", b"R&AOk-sum&AOk-"]
    assert b"\r\n" + PLAIN_RESPONSE + b"\r\n" in to_b2.client_to_server
    assert "R&AOk-sum&AOk-" in names(b2)
    assert names(b2, "bob") == {"INBOX"}


def test_follows_a_delete_referral(clean_mail, relays):
    b1, b2 = clean_mail["b1"], clean_mail["b2"]
    create(b2, "Gone")
    create(b1, "Gone")  # must survive: b1 never sees the DELETE
    to_b2 = relays(b2.host, b2.port)
    relay = referral_relay(relays, b1, {b"DELETE Gone": url(to_b2.host, to_b2.port, "Gone")})
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["dm Gone"])
    assert result.returncode == 0 and not result.errors, report(result, relay, to_b2)
    assert "Gone" not in names(b2)
    assert "Gone" in names(b1)
    assert [words(c) for c in lines(to_b2)][-1] == [b"DELETE", b"Gone"]


def test_a_referral_with_several_urls_is_not_followed(clean_mail, relays):
    b1, b2, b3 = clean_mail["b1"], clean_mail["b2"], clean_mail["b3"]
    to_b2, to_b3 = relays(b2.host, b2.port), relays(b3.host, b3.port)
    urls = f"{url(to_b2.host, to_b2.port, 'Twice')} {url(to_b3.host, to_b3.port, 'Twice')}"
    relay = referral_relay(relays, b1, {b"CREATE Twice": urls})
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["cm Twice"])
    assert result.returncode == 0, report(result)
    assert result.errors == [f"createmailbox: [REFERRAL {urls}] Remote mailbox"], report(result, relay)
    assert not to_b2.connections and not to_b3.connections
    assert all("Twice" not in names(b) for b in (b1, b2, b3))


def test_rename_referrals_are_a_pair_and_cyradm_mangles_them(clean_mail, relays):
    b1, b2, b3 = clean_mail["b1"], clean_mail["b2"], clean_mail["b3"]
    create(b2, "Old")
    to_b2 = relays(b2.host, b2.port)
    relay = referral_relay(relays, b1, {
        # both urls on one server: cyradm sends "RENAME Old Old New" there
        b"RENAME Old": f"{url(to_b2.host, to_b2.port, 'Old')} {url(to_b2.host, to_b2.port, 'New')}",
        # on two servers: nothing is done, and cyradm reports no error
        b"RENAME Other": f"{url(to_b2.host, to_b2.port, 'Old')} {url(b3.host, b3.port, 'New')}",
    })
    result = run_cyradm(relay.host, relay.port, USER, PASSWORD, ["renm Other New", "renm Old New"])
    assert result.returncode == 0, report(result)
    assert len(to_b2.connections) == 1, report(result, relay, to_b2)
    assert [words(c) for c in lines(to_b2)][-1] == [b"RENAME", b"Old", b"Old", b"New"]
    # the failure of the second is reported with the (stale) error text of the first
    assert result.errors == ["renamemailbox: Inter-server referral.  Not implemented."], \
        report(result, relay, to_b2)
    assert names(b2) == {"INBOX", "Old"} and names(b3) == {"INBOX"} and names(b1) == {"INBOX"}
