"""The differential corpus (corpus/*.imapc), each conversation in two modes: direct
Dovecot (b2) beside the proxy in front of b1 alone ("single": every mailbox of the
user on one backend), and in front of b1 and b3 ("split": the user's ``Shared/*`` on
b3). One proxy per mode. See diffharness.py for the method."""

from __future__ import annotations

import pytest
from diffenv import differential_env
from diffharness import MODES, load_corpus

from referral_proxy.commands import relayable

CORPUS = load_corpus()


@pytest.fixture(scope="module", params=MODES)
def env(request, fleet, tmp_path_factory):
    with differential_env(fleet, tmp_path_factory, request.param) as e:
        yield e


@pytest.mark.parametrize("conv", CORPUS, ids=[c.name for c in CORPUS])
def test_conversation(env, conv, request):
    if conv.only not in (None, env.mode):
        pytest.skip(f"only in mode {conv.only}")
    missing = [cap for cap in conv.relayed if not relayable(cap)]
    if missing:
        pytest.skip(f"the proxy does not relay {', '.join(missing)} (referral_proxy/commands.py NOT_RELAYED)")
    reason = conv.xfail_reason(env.mode)
    if reason:  # a proxy bug: the fix turns this into an XPASS failure (remove the @xfail then)
        request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    env.check(conv)
