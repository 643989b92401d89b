"""LIST patterns a hostile client chooses, against real Dovecot through the proxy (the pattern
semantics themselves: tests/test_listmatch.py and the differential corpus)."""

from __future__ import annotations

import pytest
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")


def test_a_pattern_of_many_wildcards_stops_no_session(proxy_factory, fleet):
    """main matched with Python's re, which backtracks: "*a" sixteen times then "*b" over a
    mailbox of forty "a"s ran for hours and every other session of the process hung with it
    (here: the second session's NOOP timed out)."""
    proxy = proxy_factory(rules=[{"mailbox": "Shared/*", "backend": "b3"}])
    name = b"a" * 40
    w, other = Wire(proxy.host, proxy.port, timeout=60), Wire(proxy.host, proxy.port, timeout=60)
    w.login()
    other.login()
    assert w.cmd(b"c", b"CREATE " + name)[-1].startswith(b"c OK")
    assert w.cmd(b"d", b"CREATE Shared/" + name)[-1].startswith(b"d OK")
    for command in (b'LIST "" "%s*b"' % (b"*a" * 16), b'LIST "" "%s%%b"' % (b"%a" * 16),
                    b'LSUB "" "%s%%b"' % (b"*a%" * 16), b'RLIST "Shared/" "%s*b"' % (b"*a" * 16)):
        w.send(b"l " + command + b"\r\n")
        assert other.cmd(b"n", b"NOOP")[-1].startswith(b"n OK")
        assert w.until_tagged(b"l") == [b"l OK %s completed.\r\n" % command.split()[0].lstrip(b"R")]
    reply = w.cmd(b"m", b'LIST "" "%s"' % (b"*a" * 16 + b"*"))
    assert reply[:-1] == [b'* LIST (\\HasNoChildren) "/" "%s"\r\n' % name]
    w.close()
    other.close()


@pytest.mark.parametrize("command, names", [(b'LSUB "Shared/x" ""', {b"Shared/x"}), (b'LSUB "Proj" ""', {b"Proj"}),
                                            (b'LSUB "%" ""', {b"Proj", b"Top"}), (b'RLSUB "Shared/x" ""', {b"Shared/x"}),
                                            (b'LSUB "" ""', None)])
def test_lsub_of_a_reference_and_an_empty_pattern_answers_from_every_backend(proxy_factory, fleet, command, names):
    """Dovecot matches the reference then (``LSUB "%" ""``: the top-level subscriptions, no \\Noselect
    parent); the proxy relayed it to the home only, and the subscriptions on b3 were missing (probe 5,
    stop 48). ``LSUB "" ""`` still asks the home for the hierarchy delimiter."""
    proxy = proxy_factory(rules=[{"mailbox": "Shared/*", "backend": "b3"}, {"mailbox": "Proj", "backend": "b3"}])
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login()
    for name in (b"Shared/x", b"Proj", b"Top"):
        assert w.cmd(b"c", b"CREATE " + name)[-1].startswith(b"c OK")
        assert w.cmd(b"s", b"SUBSCRIBE " + name)[-1].startswith(b"s OK")
    reply = w.cmd(b"l", command)
    assert reply[-1].startswith(b"l OK"), reply
    listed = [line for line in reply if line.startswith(b"* LSUB")]
    if names is None:
        assert listed in ([], [b'* LSUB (\\Noselect) "/" ""\r\n']), listed
    else:
        assert {line.split(b'"/" ')[1].strip().strip(b'"') for line in listed} == names
        assert all(b"\\Noselect" not in line for line in listed), listed
