"""Recovery of a move that names a backend no longer configured says so (probe r2, stop 50: "NOT recovered: 'b3'",
a bare KeyError, after a restart with a file whose reload had been refused for that reason)."""

from __future__ import annotations

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from referral_proxy.mailops import NoMasterUser
from referral_proxy.recovery import master_connector
from referral_proxy.testing.fakes import minimal_config


def test_a_backend_not_in_the_configuration_is_named():
    connect = master_connector(MemoryReactorClock(), minimal_config(), "carol")
    d = defer.ensureDeferred(connect("b3"))
    failure = []
    d.addErrback(failure.append)
    (f,) = failure
    assert f.check(NoMasterUser)
    assert str(f.value) == "backend b3 is not in the configuration: a move naming it cannot be recovered until it is put back"


@pytest.mark.parametrize("name", ["b1", "b2"])
def test_a_configured_backend_without_master_user_is_said_so(name):
    connect = master_connector(MemoryReactorClock(), minimal_config(), "carol")
    failure = []
    defer.ensureDeferred(connect(name)).addErrback(failure.append)
    (f,) = failure
    assert "has no master_user" in str(f.value)
