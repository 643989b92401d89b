"""Hostile logins: credentials no backend reads, SASL responses that are no base64.

Dovecot's login process reads at most 8191 bytes of base64 in AUTHENTICATE PLAIN's
initial response and closes the connection without a word on more: the proxy answered
such a password (8 KB in a LOGIN literal) ``NO [UNAVAILABLE] Mail server temporarily
unavailable``, counted and logged it as the backend failing. Dovecot direct reads
``" <base64>"`` or ``" *"`` as invalid base64; the proxy stripped the line first and
logged the client in (or cancelled).
"""

from __future__ import annotations

import base64

import pytest
from imapwire import Wire

from referral_proxy.auth import MAX_PLAIN_BASE64
from referral_proxy.testing.fakes import SessionHarness

PLAIN = base64.b64encode(b"\0alice\0secret")
#: The longest password whose PLAIN message (b"\0alice\0" + it) is 8191 bytes of base64.
LONGEST = MAX_PLAIN_BASE64 // 4 * 3 - len(b"\0alice\0")


def _long_login(kind: str, password: bytes) -> bytes:
    if kind == "login-literal":
        return b"c LOGIN alice {%d+}\r\n%s\r\n" % (len(password), password)
    blob = base64.b64encode(b"\0alice\0" + password)
    if kind == "sasl-ir":
        return b"c AUTHENTICATE PLAIN %s\r\n" % blob
    return b"c AUTHENTICATE PLAIN\r\n%s\r\n" % blob


@pytest.mark.parametrize("kind", ["login-literal", "sasl-ir", "sasl-continued"])
def test_credentials_no_backend_reads_are_a_failed_login_and_reach_no_backend(kind):
    h = SessionHarness()
    h.to_client()
    h.send(_long_login(kind, b"x" * (LONGEST + 1)))
    out = h.to_client()
    assert out.endswith(b"c NO [AUTHENTICATIONFAILED] Credentials too long\r\n"), out
    assert h.connector.credentials == []  # main: sent to the backend, which hung up: NO [UNAVAILABLE]
    h.reactor.advance(20)  # the failed login's penalty
    h.send(b"d LOGIN alice secret\r\n")
    h.reactor.advance(20)
    assert h.to_client().startswith(b"d OK [CAPABILITY ")


def test_the_longest_credentials_a_backend_reads_are_tried():
    h = SessionHarness()
    h.to_client()
    h.send(_long_login("sasl-ir", b"x" * LONGEST))
    assert h.to_client().startswith(b"c OK [CAPABILITY ")
    assert len(h.connector.credentials[0].password) == LONGEST


@pytest.mark.parametrize("response", [b" " + PLAIN, PLAIN + b" ", b"\t" + PLAIN, PLAIN[:4] + b" " + PLAIN[4:]])
def test_a_sasl_response_with_blanks_is_no_base64(response):
    h = SessionHarness()
    h.to_client()
    h.send(b"c AUTHENTICATE PLAIN\r\n")
    assert h.to_client() == b"+ \r\n"
    h.send(response + b"\r\nd NOOP\r\n")
    # main stripped the line and logged alice in (Dovecot: NO [ALERT] Invalid base64 in response)
    assert h.to_client() == b"c BAD Invalid SASL PLAIN response\r\nd OK NOOP completed.\r\n"
    assert h.connector.credentials == []


@pytest.mark.parametrize("response", [b" *", b"* ", b"**"])
def test_only_a_lone_star_cancels(response):
    h = SessionHarness()
    h.to_client()
    h.send(b"c AUTHENTICATE PLAIN\r\n")
    h.to_client()
    h.send(response + b"\r\n")
    assert h.to_client() == b"c BAD Invalid SASL PLAIN response\r\n"
    h.send(b"d AUTHENTICATE PLAIN\r\n*\r\n")
    assert h.to_client() == b"+ \r\nd BAD Authentication cancelled\r\n"


def test_a_password_dovecot_cannot_read_is_not_the_backend_unavailable(proxy_factory):
    proxy = proxy_factory({"proxy": {"login_penalty": 0}})
    w = Wire(proxy.host, proxy.port)
    w.send(_long_login("login-literal", b"x" * 8200))
    reply = w.until_tagged(b"c")
    assert reply[-1] == b"c NO [AUTHENTICATIONFAILED] Credentials too long\r\n", reply  # main: NO [UNAVAILABLE]
    w.login()
    assert w.cmd(b"s", b"STATUS INBOX (MESSAGES)")[-1].startswith(b"s OK")
    w.close()


@pytest.mark.parametrize("initial", [b'"%s"' % PLAIN, b"{%d+}\r\n%s" % (len(PLAIN), PLAIN)])
def test_an_initial_response_is_base64_not_a_string(initial):
    h = SessionHarness()
    h.to_client()
    # RFC 4959: initial-resp = base64 / "=". Main took a quoted string or a literal and logged
    # alice in; Dovecot answers BAD Invalid base64 data in initial response.
    h.send(b"c AUTHENTICATE PLAIN %s\r\nd NOOP\r\n" % initial)
    out = h.to_client()
    assert out.startswith(b"c BAD Invalid arguments: ") and out.endswith(b"\r\nd OK NOOP completed.\r\n"), out
    assert h.connector.credentials == []
