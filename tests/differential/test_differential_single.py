"""The differential corpus, mode "single": direct Dovecot (b2) beside the proxy in front of
b1 alone (every mailbox of the user on one backend).
See diffharness.py for the method and corpus/ for the conversations."""

from __future__ import annotations

import pytest
from diffenv import differential_env, params

MODE = "single"


@pytest.fixture(scope="module")
def env(fleet, tmp_path_factory):
    with differential_env(fleet, tmp_path_factory, MODE) as e:
        yield e


@pytest.mark.parametrize("conv", params(MODE))
def test_conversation(env, conv):
    env.check(conv)
