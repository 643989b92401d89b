"""Round 14 (attack14a, not collected): a COPY / MOVE of a range across servers while another session
STOREs flags, EXPUNGEs or APPENDs in the source, sent at once (b from 4 steps before a to 4 after).
Judged straight on the backends (mailcheck.contents): every message once (MOVE) or at most once in the
destination (COPY), flags in the destination those of the source before or after the STORE, and
INTERNALDATE carried. ``ROUNDS=18 python3 -m pytest tests/race_copy14.py -s``."""

from __future__ import annotations

import os

import pytest
from imapwire import at_once
from mailcheck import contents
from movecheck import seed
from race_pairs13 import RULES, _sessions, offsets

pytestmark = pytest.mark.usefixtures("clean_mail")

ROUNDS = int(os.environ.get("ROUNDS", "12"))
N = 6
ANSWERED = b"\\Answered"
OTHER = {
    "store": b"s SELECT W#\r\nb UID STORE 1:* +FLAGS (\\Answered)\r\n",
    "expunge": b"s SELECT W#\r\nt UID STORE 1:3 +FLAGS (\\Deleted)\r\nb EXPUNGE\r\n",
    "append": b"s SELECT W#\r\nb APPEND W# (\\Draft) {22+}\r\nSubject: appended #\r\n\r\n\r\n",
    "delete_destination": b"b DELETE Shared/T#\r\n",
}


@pytest.mark.parametrize("verb", ["COPY", "MOVE"])
@pytest.mark.parametrize("other", sorted(OTHER))
def test_range_across_vs_source_changes(proxy_factory, fleet, verb, other):
    for i in range(ROUNDS):
        seed(fleet["b1"], "carol", f"W{i}", [f"w{i}-{k}@t" for k in range(N)])
        seed(fleet["b3"], "carol", f"Shared/T{i}", [])
    before = {i: {h: (f, d) for _u, f, d, h in contents(fleet["b1"], "carol", f"W{i}")} for i in range(ROUNDS)}
    proxy = proxy_factory(rules=RULES)
    sessions = _sessions(proxy)
    bad, answers = [], []
    for i in range(ROUNDS):
        a = b"s SELECT W#\r\na UID %s 1:* Shared/T#\r\n".replace(b"%s", verb.encode()).replace(b"#", b"%d" % i)
        b = OTHER[other].replace(b"#", b"%d" % i)
        ans = at_once(sessions, [a, b], [b"a", b"b"], offsets(i, 0.004))
        answers.append(ans)
        src = contents(fleet["b1"], "carol", f"W{i}")
        dst = contents(fleet["b3"], "carol", f"Shared/T{i}")
        in_src = [h for _u, _f, _d, h in src]
        in_dst = [h for _u, _f, _d, h in dst]
        for h in before[i]:
            n_src, n_dst = in_src.count(h), in_dst.count(h)
            gone_ok = other in ("expunge", "delete_destination")  # (a message moved into a deleted mailbox: gone)
            if other == "delete_destination" and (n_src + n_dst > 1 if verb == "MOVE" else (n_src, n_dst) not in [(1, 0), (1, 1)]
                                                  or (not ans[0].startswith(b"a OK") and n_src != 1)):
                bad.append((i, "delete_destination", n_src, n_dst, ans))
            elif verb == "MOVE" and n_src + n_dst != 1 and not (gone_ok and n_src + n_dst == 0):
                bad.append((i, "count", n_src, n_dst, ans))
            if verb == "COPY" and (n_dst > 1 or (n_src != 1 and not gone_ok)):
                bad.append((i, "copy count", n_src, n_dst, ans))
        for _u, f, d, h in dst:
            if h not in before[i]:
                if f != {b"\\Draft"} or other != "append":
                    bad.append((i, "stranger in destination", f, ans))
                continue
            flags, date = before[i][h]
            if d != date or f not in (flags, flags | {ANSWERED}, flags | {b"\\Deleted"}):
                bad.append((i, "flags/date", sorted(f), sorted(flags), d, date, ans))
        if other == "append" and ans[1].split(b" ")[1] == b"OK":
            n_src = sum(x[3] not in before[i] for x in src)
            n_dst = sum(x[3] not in before[i] for x in dst)
            if (n_src, n_dst) not in ([(1, 0), (1, 1)] if verb == "COPY" else [(1, 0), (0, 1)]):
                bad.append((i, "appended", n_src, n_dst, ans))
    import collections
    print("BAD", len(bad), bad[:5], collections.Counter(tuple(x.split(b" ")[1] for x in ans) for ans in answers))
    assert not bad
