"""``python -m referral_proxy``: the same as the ``referral-proxy`` command."""

from .cli import main

raise SystemExit(main())
