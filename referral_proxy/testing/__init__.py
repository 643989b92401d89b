"""What the tests use besides real Dovecot: ``fakes`` (in-memory transports, scripted backends).

The Dovecot fleet runner moved to :mod:`referral_proxy.fleet` (the demo ships it);
``referral_proxy.testing.dovecot`` stays importable as another name for it, for test
code written against the old place.
"""

import sys

from .. import fleet as _fleet

sys.modules[__name__ + ".dovecot"] = _fleet
dovecot = _fleet
