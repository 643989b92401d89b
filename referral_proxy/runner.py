"""Run the proxy in the foreground until SIGINT/SIGTERM: the ``referral-proxy --config``
command and the demo (twistd has its own runner, ``tap.py``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from twisted.logger import globalLogBeginner

from .config import ConfigError
from .logs import LogWriter

__all__ = ["run"]


def run(config_path: str, *, on_step: Callable[[Any], None] | None = None) -> int:
    """Load, check, listen, serve; 2 for a configuration error, 1 if it cannot start.

    *on_step*: called after each journal step of a move (tests inject faults with it)."""
    from twisted.internet import reactor

    from .service import ProxyService, load_and_check
    from .tap import install_sighup, install_stop_once

    try:
        config = load_and_check(config_path, reactor)
    except ConfigError as e:
        sys.stderr.write(f"referral-proxy: configuration error: {e}\n")
        return 2
    writer = LogWriter(config.log, sys.stderr)
    globalLogBeginner.beginLoggingTo([writer], redirectStandardIO=False)
    try:
        service = ProxyService(config, reactor, on_step=on_step)
    except ConfigError as e:  # the map store cannot be opened
        sys.stderr.write(f"referral-proxy: configuration error: {e}\n")
        return 2
    service.log_stream = sys.stderr
    writer.context = service.observer.context
    try:
        service.startService()
    except Exception as e:
        sys.stderr.write(f"referral-proxy: cannot start: {e}\n")
        return 1
    install_sighup(reactor, service)
    install_stop_once(reactor)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()
    return 0
