"""A RENAME that meets names another RENAME holds only for its check waits for them (holds.py).

On main a RENAME across whose source does not exist held its names while it connected and
looked (tens of ms), and a valid RENAME of one of them from another session got ``NO [INUSE]``
where Dovecot alone answers OK: ``RENAME A Shared/B`` (A absent) against ``RENAME Shared/B C``
in 12 of 27 rounds, and a swap (A -> Shared/X against Shared/B -> A) in 14 of 27. The session
meeting a check now waits for it; one meeting a move under way is still refused at once. Judged
by each valid RENAME's answer and a census of every backend (every message once, reachable)."""

from __future__ import annotations

import os

import pytest
from imapwire import at_once
from movecheck import seed
from race_pairs13 import RULES, _judge, _sessions, offsets

pytestmark = pytest.mark.usefixtures("clean_mail")

ROUNDS = int(os.environ.get("ROUNDS", "18"))


def _tagged(answer: bytes) -> bytes:
    return b" ".join(answer.split(b" ")[:2])


def _play(sessions, a: bytes, b: bytes, valid: int) -> list:
    """Each round: *a* and *b* (# the round) on sessions a and b at once; the *valid* side (0: a, 1: b)
    must be answered OK in every round, as Dovecot alone answers it."""
    answers = [at_once(sessions, [a.replace(b"#", b"%d" % i), b.replace(b"#", b"%d" % i)], [b"a", b"b"],
                       offsets(i, 0.01)) for i in range(ROUNDS)]
    refused = [(i, ans) for i, ans in enumerate(answers) if _tagged(ans[valid]) != b"ab"[valid:valid + 1] + b" OK"]
    assert not refused, f"{len(refused)} of {ROUNDS} valid commands refused: {refused}"
    return answers


def _shared_b(fleet) -> list[str]:
    for i in range(ROUNDS):
        seed(fleet["b3"], "carol", f"Shared/B{i}", [f"sb-{i}@t"])
    return [f"sb-{i}@t" for i in range(ROUNDS)]


ABSENT = b"a RENAME A# Shared/B#\r\n"  # A<i> never exists: its check fails (NONEXISTENT)

# What session b does to Shared/B<i> (it exists, on b3) while session a's RENAME A<i> Shared/B<i>
# (A<i> absent) holds it for its check: Dovecot alone answers each OK.
BESIDE = {
    "rename": b"b RENAME Shared/B# C#\r\n",
    "create_child": b"b CREATE Shared/B#/kid\r\n",
    "delete": b"b DELETE Shared/B#\r\n",
    "subscribe": b"b SUBSCRIBE Shared/B#\r\n",
}


@pytest.mark.parametrize("case", sorted(BESIDE))
def test_beside_an_absent_source(proxy_factory, fleet, case):
    """a: RENAME A<i> Shared/B<i>, A<i> absent; b: BESIDE[case]: always OK; a always NO."""
    ids = _shared_b(fleet)
    proxy = proxy_factory(rules=RULES)
    answers = _play(_sessions(proxy), ABSENT, BESIDE[case], 1)
    assert all(_tagged(ans[0]) == b"a NO" for ans in answers), answers
    deleted = case == "delete"
    assert not _judge(fleet, proxy, [] if deleted else ids, ids if deleted else [], answers)


def test_rename_beside_an_absent_source_on_two_workers(proxy_factory, fleet):
    """BESIDE["rename"], each session on its own worker ([proxy] workers = 2): the holds seen through the store."""
    from test_workers import one_on_each
    ids = _shared_b(fleet)
    proxy = proxy_factory(rules=RULES, workers=2)
    answers = _play(list(one_on_each(proxy, proxy.pid, "carol").values()), ABSENT, BESIDE["rename"], 1)
    assert not _judge(fleet, proxy, ids, [], answers)


def test_rename_swap_valid_side(proxy_factory, fleet):
    """a: RENAME A<i> Shared/X<i> (valid whatever b does); b: RENAME Shared/B<i> A<i> (its check fails
    while A<i> exists): a is always OK."""
    ids = _shared_b(fleet)
    for i in range(ROUNDS):
        seed(fleet["b1"], "carol", f"A{i}", [f"a-{i}@t"])
    proxy = proxy_factory(rules=RULES)
    answers = _play(_sessions(proxy), b"a RENAME A# Shared/X#\r\n", b"b RENAME Shared/B# A#\r\n", 0)
    assert not _judge(fleet, proxy, ids + [f"a-{i}@t" for i in range(ROUNDS)], [], answers)
