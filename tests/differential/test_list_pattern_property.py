"""LIST patterns, as hypothesis writes them, to direct Dovecot and through the proxy.

The proxy lists every backend with ``LIST "" "*"`` and applies the client's reference and pattern
itself (listing.select): it must match what Dovecot matches, on the names' characters, not on
their modified UTF-7 (``*O*`` is no match for ``Caf&AOk-``, ``&AOk-*`` and the same in 8-bit
UTF-8 match ``&AOkA6Q-``), INBOX's letters in any case when the pattern may match INBOX (``inbox*``,
``i*``, ``*n*`` list INBOX), ``%`` stopping at the separator."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from imapwire import Wire

pytestmark = pytest.mark.usefixtures("clean_mail")

NAMES = [b"Caf&AOk-", b"&AOkA6Q-", b"Caf&AOk-/Sub", b"a&-b", b"Work", b"Work/Archive", b"inbox/x", b"Old-Mail"]
# No 8-bit piece: a pattern mixing 8-bit UTF-8 and shifts ("&AOk-\xc3\xa9") is read by Dovecot in a
# way of its own (left alone: no client writes one); 8-bit alone is in the references and examples.
_PIECES = st.sampled_from(["*", "%", "/", "C", "a", "f", "&AOk-", "&AOkA6Q-", "&-", "&", "-", "O", "k",
                           "I", "n", "b", "x", "W", "o", "r", "S", "u", "i", "N", "B", "X"])
_PATTERN = st.lists(_PIECES, max_size=5).map("".join)
_ENTRY = re.compile(rb'\* LIST \([^)]*\) (?:"."|NIL) "?(.*?)"?\r\n')


def _listed(w: Wire, tag: bytes, reference: bytes, pattern: bytes) -> set[bytes]:
    lines = w.cmd(tag, b'LIST "%s" "%s"' % (reference, pattern))
    assert lines[-1].startswith(tag + b" OK"), lines
    return {m.group(1) for line in lines if (m := _ENTRY.match(line))}


def test_list_patterns_match_what_dovecot_matches(proxy_factory, fleet):
    proxy = proxy_factory()
    direct, proxied = Wire(fleet["b2"].host, fleet["b2"].port), Wire(proxy.host, proxy.port)
    for w in (direct, proxied):
        w.login("carol", "secret")
        for i, name in enumerate(NAMES):
            assert w.cmd(b"C%d" % i, b'CREATE "%s"' % name)[-1].startswith(b"C%d OK" % i)
    numbers = itertools.count()

    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(["", "Caf&AOk-/", "Work", "\xe9"]), _PATTERN)
    @example("", "*O*")  # the base64 of a shift is no character of the name
    @example("", "*-")
    @example("", "&AOk-*")
    @example("", "\xe9*")  # 8-bit UTF-8, as Dovecot reads a pattern
    @example("Caf\xe9/", "%")
    @example("", "inbox*")  # INBOX's letters in any case, as the pattern may match INBOX
    @example("", "i*")
    @example("", "*n*")
    @example("inbox", "/%")
    def check(reference: str, pattern: str) -> None:
        tag = b"L%d" % next(numbers)
        ref, pat = reference.encode(), pattern.encode()
        assert _listed(proxied, tag, ref, pat) == _listed(direct, tag, ref, pat), (reference, pattern)

    try:
        check()
    finally:
        direct.close()
        proxied.close()
