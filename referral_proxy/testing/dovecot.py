"""The Dovecot fleet runner now lives in :mod:`referral_proxy.fleet` (shipped code, the
demo, uses it); this name stays for test code written against the old one."""

from ..fleet import *  # noqa: F403
from ..fleet import __all__  # noqa: F401
