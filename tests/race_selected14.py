"""Round 14 (attack14a, not collected): a RENAME across of W<i> while another session has W<i> selected
and FETCHes (pipelined, again and again) or IDLEs; the renaming session then CREATEs W<i> again and
APPENDs a new message to it. The selected session must never see the new mailbox's message under the
old mailbox's UIDs (it may see the old messages, a BYE, or NO); every message once on the backends.
``ROUNDS=18 python3 -m pytest tests/race_selected14.py -s``."""

from __future__ import annotations

import os
import re
import time

import pytest
from imapwire import Wire
from movecheck import census, seed
from race_pairs13 import RULES, _sessions

pytestmark = pytest.mark.usefixtures("clean_mail")

ROUNDS = int(os.environ.get("ROUNDS", "12"))
N = 4


def _new(i: int) -> bytes:
    return b"Message-Id: <new-%d@t>\r\nSubject: new\r\n\r\nnew\r\n" % i


def _read_all(w: Wire, seen: list[bytes], until: bytes, deadline: float) -> bytes:
    """Lines (literals read whole) until the tagged *until* or the connection's end; every Message-Id seen kept."""
    while time.monotonic() < deadline:
        try:
            line = w.line()
        except (ConnectionError, OSError):
            return b"closed"
        m = re.search(rb"\{(\d+)\}\r\n$", line)
        if m:
            data = w.read_exact(int(m.group(1)))
            seen += re.findall(rb"<([^>]+)>", data)
        if line.startswith(b"* BYE"):
            seen.append(b"BYE")
        if line.startswith(until + b" "):
            return line
    return b"timeout"


@pytest.mark.parametrize("how", ["fetch", "idle"])
def test_selected_source_renamed_across(proxy_factory, fleet, how):
    for i in range(ROUNDS):
        seed(fleet["b1"], "carol", f"W{i}", [f"w{i}-{k}@t" for k in range(N)])
    proxy = proxy_factory(rules=RULES)
    (a,) = _sessions(proxy, 1)
    bad, log = [], []
    for i in range(ROUNDS):
        b = Wire(proxy.host, proxy.port, timeout=60)
        b.login("carol")
        assert b.cmd(b"s", b"SELECT W%d" % i)[-1].startswith(b"s OK")
        seen: list[bytes] = []
        if how == "idle":
            b.send(b"i IDLE\r\n")
            assert b.line().startswith(b"+")
        new = _new(i)
        script = (b"a RENAME W%d Shared/R%d\r\nc CREATE W%d\r\nd APPEND W%d {%d+}\r\n%s\r\n"
                  % (i, i, i, i, len(new), new))
        a.send(script)
        if how == "fetch":
            for k in range(12):
                try:
                    b.send(b"f%d UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])\r\n" % k)
                except OSError:
                    break
                if _read_all(b, seen, b"f%d" % k, time.monotonic() + 30) in (b"closed", b"timeout"):
                    break
        else:
            time.sleep(0.3 + 0.05 * (i % 5))
            try:
                b.send(b"DONE\r\n")
                if _read_all(b, seen, b"i", time.monotonic() + 30) not in (b"closed", b"timeout"):
                    b.send(b"f UID FETCH 1:* (BODY.PEEK[HEADER.FIELDS (MESSAGE-ID)])\r\n")
                    _read_all(b, seen, b"f", time.monotonic() + 30)
            except OSError:
                pass
        answer = a.until_tagged(b"d")[-1]
        b.close()
        strangers = [s for s in seen if s != b"BYE" and not s.startswith(b"w%d-" % i)]
        if strangers or not answer.startswith(b"d OK"):
            bad.append((i, strangers, answer))
        log.append((i, b"BYE" in seen, len(seen)))
    counts, where = census(fleet, "carol")
    twice = {m: where[m] for m, n in counts.items() if n != 1}
    missing = [f"w{i}-{k}@t" for i in range(ROUNDS) for k in range(N) if counts[f"w{i}-{k}@t"] != 1]
    print("BAD", len(bad), bad[:5], "twice", twice, "missing", missing, "log", log)
    assert not bad and not twice and not missing
