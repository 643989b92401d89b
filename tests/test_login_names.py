"""Login names and passwords of bytes that are not UTF-8, and names Dovecot's ``%Lu`` (ASCII letters
only) keeps apart, through the proxy as directly (attack9b).

Seen on main, against one real Dovecot (``auth_username_chars`` emptied, as a site with 8-bit names has it):

* ``AUTHENTICATE PLAIN`` of ``\\0erin\\0s\\xe9cret`` (a Latin-1 password): Dovecot ``OK``, the proxy
  ``NO [AUTHENTICATIONFAILED]`` (it decoded the SASL message as strict UTF-8: "not PLAIN"); LOGIN was
  mended in c530be4, AUTHENTICATE was not.
* ``LOGIN {3} j\\xe9r secret`` (a Latin-1 name): Dovecot ``OK``, the proxy ``NO``: the name was decoded
  with "replace" and reached Dovecot as ``j\\xef\\xbf\\xbdr``; ``j\\xe9r`` and ``j\\xe8r`` were one map
  entry and one login-penalty record.
* keepalive.py named the user by ``str.lower()``: ``JOSÉ`` (Dovecot: ``josÉ``, a user of his own) and
  ``josé`` were one user there, so a login of one refused ``[LIMIT]`` logged out the other's parked
  connections (and waited for nothing).
"""

from __future__ import annotations

import base64
import re

import pytest
from conftest import dovecot_root
from imapwire import Wire
from test_keepalive import metric, until_parked

from referral_proxy.fleet import Dovecot, free_port
from referral_proxy.imap.url import parse_imap_url


def _raw(data: bytes) -> str:
    """Bytes as the fleet writes them into a passwd file: surrogateescape."""
    return data.decode("utf-8", "surrogateescape")


USERS = {"erin": _raw(b"s\xe9cret"), _raw(b"j\xe9r"): "secret", _raw(b"j\xe8r"): "secret", "jos\u00e9": "secret",
         "jos\u00c9": "secret"}


@pytest.fixture(scope="module")
def names_backend():
    d = Dovecot("a9bnames", "127.0.0.37", dovecot_root() / "a9bnames", users=USERS,
                extra_config="auth_username_chars =\nmail_max_userip_connections = 3\n")
    d.start()
    yield d
    d.stop()


def _proxy(proxy_factory, d: Dovecot, **kw):
    port = free_port()
    proxy = proxy_factory({"backends": {"n1": {"endpoint": d.endpoint, "url": d.url, "tls": "none"}},
                           "map": {"default": "n1"}, "metrics": {"listen": f"tcp:{port}:interface=127.0.0.1"}}, **kw)
    proxy.metrics_port = port
    return proxy


def _plain(authzid: bytes, authcid: bytes, password: bytes) -> bytes:
    return b"AUTHENTICATE PLAIN " + base64.b64encode(b"\0".join((authzid, authcid, password)))


def _login_literal(user: bytes, password: bytes = b"secret") -> tuple[bytes, bytes]:
    return b"LOGIN {%d}" % len(user), user + b" " + password


def _session(host: str, port: int, login: bytes | tuple[bytes, bytes]) -> tuple[Wire, bytes]:
    """A connection and the tagged answer to *login* (a line, or a line and its literal's rest)."""
    w = Wire(host, port)
    head, rest = (login, None) if isinstance(login, bytes) else login
    w.send(b"L " + head + b"\r\n")
    if rest is not None:
        assert w.line().startswith(b"+"), "no continuation"
        w.send(rest + b"\r\n")
    return w, w.until_tagged(b"L")[-1]


def _inbox_subjects(host: str, port: int, login) -> list[bytes]:
    """The Subject lines of the INBOX this login reaches."""
    w, answer = _session(host, port, login)
    assert answer.startswith(b"L OK"), answer
    assert w.cmd(b"E", b"EXAMINE INBOX")[-1].startswith(b"E OK")
    lines = w.cmd(b"F", b"FETCH 1:* (BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    w.cmd(b"Z", b"LOGOUT")
    w.close()
    return sorted(line.strip() for line in lines if line.startswith(b"Subject:"))


LOGINS = {
    "plain-latin1-password": _plain(b"", b"erin", b"s\xe9cret"),
    "plain-latin1-password-authzid": _plain(b"erin", b"erin", b"s\xe9cret"),
    "plain-latin1-password-capitals": _plain(b"", b"ERIN", b"s\xe9cret"),
    "plain-latin1-password-authzid-other-case": _plain(b"ERIN", b"Erin", b"s\xe9cret"),  # Dovecot: NO
    "login-latin1-name": _login_literal(b"j\xe9r"),
    "login-latin1-name-capitals": _login_literal(b"J\xe9R"),
    "login-latin1-name-quoted": b'LOGIN "j\xe8r" secret',
    "plain-latin1-name": _plain(b"", b"j\xe8r", b"secret"),
    "plain-latin1-name-authzid": _plain(b"j\xe9r", b"J\xe9r", b"secret"),
}


@pytest.mark.parametrize("login", LOGINS.values(), ids=LOGINS.keys())
def test_8bit_names_and_passwords_log_in_as_directly(proxy_factory, names_backend, login):
    d = names_backend
    direct, d_answer = _session(d.host, d.port, login)
    direct.close()
    proxy = _proxy(proxy_factory, d)
    w, answer = _session(proxy.host, proxy.port, login)
    w.close()
    assert answer.split(b" ")[:2] == d_answer.split(b" ")[:2], (d_answer, answer)
    assert d_answer.startswith(b"L OK") == (login != LOGINS["plain-latin1-password-authzid-other-case"]), d_answer


def test_two_latin1_names_are_two_users_through_the_proxy(proxy_factory, names_backend):
    """Census: each user's message lands in that user's INBOX only (read directly from Dovecot)."""
    d = names_backend
    proxy = _proxy(proxy_factory, d, backend_keepalive=60)
    for name, subject in ((b"j\xe9r", b"for e-acute"), (b"j\xe8r", b"for e-grave")):
        w, answer = _session(proxy.host, proxy.port, _login_literal(name))
        assert answer.startswith(b"L OK"), answer
        body = b"Subject: %s\r\n\r\nx\r\n" % subject
        assert w.cmd(b"A", b"APPEND INBOX {%d+}\r\n%s" % (len(body), body))[-1].startswith(b"A OK")
        w.cmd(b"Z", b"LOGOUT")
        w.close()
    assert _inbox_subjects(d.host, d.port, _login_literal(b"j\xe9r")) == [b"Subject: for e-acute"]
    assert _inbox_subjects(d.host, d.port, _login_literal(b"j\xe8r")) == [b"Subject: for e-grave"]


def test_a_limit_of_one_user_never_logs_out_the_parked_connections_of_another(proxy_factory, names_backend):
    """josé and JOSÉ (Dovecot's %Lu: josÉ) are two users; josÉ at his connection limit is refused
    [LIMIT], and josé's parked connection stays parked."""
    d = names_backend
    proxy = _proxy(proxy_factory, d, backend_keepalive=60)
    jose = _login_literal("josé".encode())
    w, answer = _session(proxy.host, proxy.port, jose)
    assert answer.startswith(b"L OK"), answer
    w.cmd(b"Z", b"LOGOUT")
    w.close()
    until_parked(proxy, 1)
    upper = _login_literal("JOSÉ".encode())
    held = []
    for _ in range(3):  # josÉ's three slots (mail_max_userip_connections = 3), held by live sessions
        w, answer = _session(proxy.host, proxy.port, upper)
        assert answer.startswith(b"L OK"), answer
        assert w.cmd(b"N", b"NOOP")[-1].startswith(b"N OK")
        held.append(w)
    w, answer = _session(proxy.host, proxy.port, upper)
    w.close()
    assert answer.startswith(b"L NO [LIMIT]"), answer
    assert metric(proxy.metrics_port, "referral_proxy_backend_parked") == 1, "josé's parked connection was logged out"
    for w in held:
        w.close()


def test_referrals_of_a_latin1_name_name_its_bytes_and_are_followed(proxy_factory, names_backend):
    """The login referral (RFC 2221) and a mailbox referral (RFC 2193) of ``j\\xe9r`` carry ``j%E9r``:
    a strict RFC 5092 parse gives the bytes back, and a LOGIN with them works where the URL points."""
    d = names_backend
    direct, answer = _session(d.host, d.port, _login_literal(b"j\xe9r"))
    assert direct.cmd(b"C", b"CREATE Shared/Box")[-1].startswith(b"C OK")
    direct.close()
    config = {"backends": {"n1": {"endpoint": d.endpoint, "url": d.url, "tls": "none", "login_referral": True},
                           "n2": {"endpoint": d.endpoint, "url": d.url, "tls": "none"}},
              "map": {"default": "n1", "rules": [{"mailbox": "Shared/*", "backend": "n2"}]}}
    proxy = proxy_factory(config, login_referrals=True)
    w, answer = _session(proxy.host, proxy.port, _login_literal(b"J\xe9R"))
    assert _url(rb"L OK \[REFERRAL (\S+)\]", answer) == (_raw(b"j\xe9r"), d.host, d.port, None)
    w.cmd(b"r", b'RLIST "" "*"')
    mailbox_url = _url(rb"s NO \[REFERRAL (\S+)\] Remote mailbox", w.cmd(b"s", b"SELECT Shared/Box")[-1])
    w.close()
    assert mailbox_url == (_raw(b"j\xe9r"), d.host, d.port, "Shared/Box")
    followed, answer = _session(d.host, d.port, _login_literal(mailbox_url[0].encode("utf-8", "surrogateescape")))
    assert answer.startswith(b"L OK"), answer
    assert followed.cmd(b"x", b"EXAMINE Shared/Box")[-1].startswith(b"x OK")
    followed.close()


def _url(pattern: bytes, line: bytes) -> tuple:
    """The parts of the one referral URL in *line*, parsed strictly (RFC 5092)."""
    m = re.match(pattern, line)
    assert m, line
    return parse_imap_url(m.group(1).decode("ascii"))
