"""twistd glue: ``twistd -n referral-proxy --config proxy.toml``."""

from __future__ import annotations

import signal
import sys

from twisted.python import usage

from .config import ConfigError
from .service import ProxyService, load_and_check

__all__ = ["Options", "makeService"]


class Options(usage.Options):
    synopsis = "--config proxy.toml"
    longdesc = "An IMAP4rev1 proxy: refers (RFC 2193) or proxies each mailbox to its backend."
    optParameters = [["config", "c", "proxy.toml", "The TOML configuration file."]]

    def postOptions(self) -> None:
        from twisted.internet import reactor

        try:
            self.config = load_and_check(self["config"], reactor)
        except ConfigError as e:
            # One clear line and a non-zero exit, not twistd's usage text or a traceback.
            sys.stderr.write(f"referral-proxy: configuration error: {e}\n")
            raise SystemExit(2) from None


def makeService(options: Options) -> ProxyService:
    from twisted.internet import reactor

    service = ProxyService(options.config, reactor)
    install_sighup(reactor, service)
    return service


def install_sighup(reactor, service: ProxyService) -> None:
    """Reload the map rules on SIGHUP, from the reactor thread."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(service.reload))
