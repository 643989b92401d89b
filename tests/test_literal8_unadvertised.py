"""A literal8 (``~{n}``, RFC 3516) as an APPEND message where the proxy does not advertise BINARY:
``BAD``, nothing of the command appended (census of the backend), and the session in step (the next
command answered next). RFC 3502's grammar has no literal8; RFC 3516 gives it to a client only when
BINARY is announced. Where BINARY is announced (the home backend has it) it is relayed as before.

Seen on main (attack9b), a backend announcing no BINARY, with and without MULTIAPPEND:
``a APPEND INBOX {5+} hello ~{5+} world`` -> ``a OK [APPENDUID v 1:2]``, two messages appended, and
``a APPEND INBOX ~{5}`` -> ``+ Ready for literal data``.
"""

from __future__ import annotations

import pytest
from conftest import dovecot_root
from imapwire import Wire
from mailcheck import contents

from referral_proxy.fleet import Dovecot

pytestmark = pytest.mark.usefixtures("clean_mail")

_CAPS = {"relayed": "IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ UIDPLUS UNSELECT NAMESPACE CHILDREN MOVE MULTIAPPEND",
         "staged": "IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ UIDPLUS UNSELECT NAMESPACE CHILDREN MOVE"}


@pytest.fixture(scope="module", params=sorted(_CAPS))
def no_binary(request):
    name = f"a9b-nobinary-{request.param}"
    d = Dovecot(name, "127.0.0.38", dovecot_root() / name,
                extra_config="protocol imap {\n  imap_capability = %s\n}\n" % _CAPS[request.param])
    d.start()
    yield d
    d.stop()


#: (what the client writes first, what it writes after a continuation request if it gets one)
SCRIPTS = {
    "literal8-plus": (b"a APPEND INBOX ~{5+}\r\nhello\r\n", None),
    "literal8-sync": (b"a APPEND INBOX (\\Seen) ~{5}\r\n", b"hello\r\n"),
    "second-literal8-plus": (b"a APPEND INBOX {5+}\r\nhello ~{5+}\r\nworld\r\n", None),
    "second-literal8-sync": (b"a APPEND INBOX {5+}\r\nhello ~{5}\r\n", b"world\r\n"),
    "third-literal8": (b'a APPEND INBOX {1+}\r\nx "01-Feb-2021 10:00:00 +0000" {1+}\r\ny ~{1+}\r\nz\r\n', None),
    "literal-mailbox-then-literal8": (b"a APPEND {5+}\r\nINBOX ~{5+}\r\nhello\r\n", None),
}


def _run(host: str, port: int, script: tuple[bytes, bytes | None]) -> list[bytes]:
    """The responses to the APPEND, then to a NOOP sent after its answer."""
    w = Wire(host, port)
    w.login("quota")
    first, after_continuation = script
    w.send(first)
    out = [w.line()]
    if out[-1].startswith(b"+") and after_continuation is not None:
        w.send(after_continuation)
        out.append(w.line())
    while not out[-1].startswith(b"a "):
        out.append(w.line())
    out += w.cmd(b"n", b"NOOP")
    w.close()
    return out


@pytest.mark.parametrize("script", SCRIPTS.values(), ids=SCRIPTS.keys())
def test_a_literal8_message_without_binary_is_bad_and_appends_nothing(proxy_factory, no_binary, script):
    no_binary.reset_mail("quota")
    proxy = proxy_factory({"backends": {"x": {"endpoint": no_binary.endpoint, "url": no_binary.url}},
                           "map": {"default": "x"}})
    w = Wire(proxy.host, proxy.port)
    w.login("quota")
    assert b" BINARY" not in w.cmd(b"c", b"CAPABILITY")[0]
    w.close()
    out = _run(proxy.host, proxy.port, script)
    assert not any(line.startswith(b"+") for line in out), out  # no literal8 is asked for
    assert out[0].startswith(b"a BAD "), out
    assert len(out) == 2 and out[1].startswith(b"n OK NOOP completed"), out  # in step: the NOOP's answer next
    assert contents(no_binary, "quota", "INBOX") == []  # census: nothing of the command


def test_where_binary_is_announced_a_literal8_message_is_appended(proxy_factory, fleet):
    fleet["b1"].reset_mail("quota")
    proxy = proxy_factory()
    out = _run(proxy.host, proxy.port, SCRIPTS["second-literal8-plus"])
    assert out[0].startswith(b"a OK [APPENDUID "), out
    assert len(contents(fleet["b1"], "quota", "INBOX")) == 2
