"""A mailbox name sent as a literal whose quoted form is longer than a backend line (hostile round h1).

``a APPEND {33000}`` + 33000 ``"`` (or ``\\``) + `` {n+}`` + message: the client's literal is well
within the proxy's limits, and direct Dovecot refuses the name (NO) and drains the message. The
proxy wrote the name again as a quoted string, each ``"`` escaped: 66002 bytes, longer than
Dovecot's line (``BAD Error in IMAP command APPEND: Too long argument``), after which Dovecot read
the LITERAL+ message as commands: a body's ``x9 CREATE Injected`` made a mailbox on the backend.
No message body may ever run as a command (docs/design.md, RFC 3502). Judged on the backends,
beside direct Dovecot."""

from __future__ import annotations

import pytest
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")

BODY = b"Message-Id: <long-name@t>\r\n\r\nx9 CREATE Injected\r\nx10 CREATE Injected2\r\n"


def _append(host: str, port: int, name: bytes, sync_name: bool) -> tuple[bytes, bytes]:
    """The APPEND's answer and the next NOOP's."""
    w = Wire(host, port, timeout=30)
    w.login("alice")
    if sync_name:
        w.send(b"a APPEND {%d}\r\n" % len(name))
        assert w.line().startswith(b"+")
        w.send(name)
    else:
        w.send(b"a APPEND {%d+}\r\n" % len(name) + name)
    w.send(b" (\\Seen) {%d+}\r\n" % len(BODY) + BODY + b"\r\n")
    answer = w.until_tagged(b"a")[-1]
    rest = w.cmd(b"n", b"NOOP")[-1]
    w.close()
    return answer, rest


def _names(backend, user: str) -> set[bytes]:
    with backend.client(user) as m:
        return {line.rsplit(b" ", 1)[-1].strip(b'"') for line in m.list()[1] if line}


@pytest.mark.parametrize("char", [b'"', b"\\"], ids=["quote", "backslash"])
@pytest.mark.parametrize("sync_name", [True, False], ids=["sync", "literal+"])
def test_a_long_escaped_name_never_runs_the_message_as_commands(proxy_factory, fleet, char, sync_name):
    proxy = proxy_factory()
    name = char * 33000  # within max_literal (64 KiB); twice that once quoted
    for host, port in ((fleet["b1"].host, fleet["b1"].port), (proxy.host, proxy.port)):
        answer, rest = _append(host, port, name, sync_name)
        assert answer.startswith(b"a NO "), answer  # as direct Dovecot: the name is refused
        assert rest.startswith(b"n OK"), rest
        for backend in fleet.backends.values():
            names = _names(backend, "alice")
            assert b"Injected" not in names and b"Injected2" not in names, (backend.name, host, names)


INJECTED = b"\r\nx9 CREATE Injected\r\n"  # a second argument's literal: its bytes, run as a command, make a mailbox


@pytest.mark.parametrize("command", [b"RENAME", b"LIST", b"STATUS"])
def test_a_long_escaped_name_relayed_never_runs_a_later_literal_as_commands(proxy_factory, fleet, command):
    """The same for a relayed command: ``RENAME {33000+}`` + 33000 ``"`` + `` {n+}`` + a second name
    holding ``x9 CREATE Injected``; written again quoted (66002 bytes), Dovecot said BAD Too long
    argument and ran the second literal's line: the mailbox Injected was made on b1. Now the name goes
    as a literal (grammar.QUOTED_NAME_MAX): answered as directly, nothing made."""
    proxy = proxy_factory()
    name = b'"' * 33000
    second = b" {%d+}\r\n" % len(INJECTED) + INJECTED
    line = {b"RENAME": b"a RENAME {%d+}\r\n" % len(name) + name + second + b"\r\n",
            b"LIST": b"a LIST {%d+}\r\n" % len(name) + name + second + b"\r\n",
            b"STATUS": b"a STATUS {%d+}\r\n" % len(name) + name + b" (MESSAGES)\r\n"}[command]
    answers = []
    for host, port in ((fleet["b1"].host, fleet["b1"].port), (proxy.host, proxy.port)):
        w = Wire(host, port, timeout=30)
        w.login("alice")
        w.send(line)
        answers.append(w.until_tagged(b"a")[-1].split(b" ")[1])  # OK, NO or BAD
        assert w.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
        w.close()
        for backend in fleet.backends.values():
            assert b"Injected" not in _names(backend, "alice"), (backend.name, host, answers)
    assert answers[0] == answers[1], answers  # as directly (a merged LIST words its OK its own way)
