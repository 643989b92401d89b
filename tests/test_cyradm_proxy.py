"""cyradm, a real referral-following client, through the proxy in front of three Dovecots.

It lists with RLIST (so the session turns referral-aware), and follows CREATE /
DELETE referrals by connecting to the referred backend itself.
"""

from __future__ import annotations

import os

import pytest
from cyradm import RecordingRelay, cyradm_available, parse_lm, run_cyradm

RULES = [{"mailbox": "Shared/*", "backend": "b3"}, {"user": "bob", "mailbox": "*", "backend": "b2"}]


@pytest.fixture(scope="module", autouse=True)
def need_cyradm():
    reason = cyradm_available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"cyradm needed in CI: {reason}")
        pytest.skip(reason)


def _names(backend, user="alice"):
    with backend.client(user) as m:
        return {line.rsplit(b" ", 1)[1].strip(b'"').decode() for line in m.list('""', "*")[1] if line}


def test_cyradm_lists_remote_mailboxes_with_rlist(proxy_factory, fleet, clean_mail):
    with fleet["b1"].client("alice") as m:
        m.create("Work")
    with fleet["b3"].client("alice") as m:
        m.create("Shared/Projects")
        m.create("Stray")  # not b3's per the map: hidden
    proxy = proxy_factory(rules=RULES)
    relay = RecordingRelay(proxy.host, proxy.port)
    try:
        result = run_cyradm(relay.host, relay.port, "alice", "secret", ["lm"])
        assert relay.wait_closed()
        sent = [c.split(b" ", 1)[1] for c in relay.connections[0].commands() if b" " in c]
    finally:
        relay.stop()
    assert result.returncode == 0 and not result.errors, result
    assert b'RLIST "" ""' in sent and b'RLIST "" "*"' in sent, sent
    listed = parse_lm(result.outputs[0])
    assert set(listed) == {"INBOX", "Work", "Shared", "Shared/Projects"}, result


def test_cyradm_follows_create_and_delete_referrals(proxy_factory, fleet, clean_mail):
    proxy = proxy_factory(rules=RULES)
    result = run_cyradm(proxy.host, proxy.port, "alice", "secret",
                        ["cm Shared/Team", "cm Local", "lm"])
    assert result.returncode == 0 and not result.errors, result
    # Each mailbox was created where the map says, and only there.
    assert "Shared/Team" in _names(fleet["b3"]) and "Shared/Team" not in _names(fleet["b1"])
    assert "Local" in _names(fleet["b1"]) and "Local" not in _names(fleet["b3"])
    assert {"Shared/Team", "Local"} <= set(parse_lm(result.outputs[2]))
    result = run_cyradm(proxy.host, proxy.port, "alice", "secret", ["dm Shared/Team", "dm Local"])
    assert result.returncode == 0 and not result.errors, result
    assert "Shared/Team" not in _names(fleet["b3"]) and "Local" not in _names(fleet["b1"])


def test_cyradm_bob_home_on_b2(proxy_factory, fleet, clean_mail):
    proxy = proxy_factory(rules=RULES)
    result = run_cyradm(proxy.host, proxy.port, "bob", "secret", ["cm Notes", "cm Shared/Plans", "lm"])
    assert result.returncode == 0 and not result.errors, result
    assert "Notes" in _names(fleet["b2"], "bob") and "Notes" not in _names(fleet["b1"], "bob")
    assert "Shared/Plans" in _names(fleet["b3"], "bob")
    assert {"INBOX", "Notes", "Shared/Plans"} <= set(parse_lm(result.outputs[2]))
