"""The differential corpus, mode "split": direct Dovecot (b2) beside the proxy in front of
b1 and b3 (the user's `Shared/*` mailboxes on b3, the rest on b1).
See diffharness.py for the method and corpus/ for the conversations."""

from __future__ import annotations

import pytest
from diffenv import differential_env, params

MODE = "split"


@pytest.fixture(scope="module")
def env(fleet, tmp_path_factory):
    with differential_env(fleet, tmp_path_factory, MODE) as e:
        yield e


@pytest.mark.parametrize("conv", params(MODE))
def test_conversation(env, conv):
    env.check(conv)
