"""twistd glue: ``twistd -n referral-proxy --config proxy.toml``."""

from __future__ import annotations

import signal
import sys
from typing import IO, Any

from twisted.internet.error import ReactorNotRunning
from twisted.python import usage
from twisted.python.logfile import LogFile

from .config import ConfigError
from .logs import LogWriter
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

    try:
        service = ProxyService(options.config, reactor)
    except ConfigError as e:  # the map store cannot be opened
        sys.stderr.write(f"referral-proxy: configuration error: {e}\n")
        raise SystemExit(2) from None
    install_sighup(reactor, service)
    stream = _twistd_log_stream(getattr(options, "parent", None))
    if stream is not None:
        # twistd takes the application's ILogObserver: [log] format and level apply under twistd too.
        service.log_observer = LogWriter(options.config.log, stream, context=service.observer.context)
        service.log_stream = stream
    return service


def _twistd_log_stream(twistd: Any) -> IO[str] | None:
    """Where twistd would write its log (stdout with -n, else --logfile or twistd.log);
    None where twistd must decide itself (syslog, or a daemon told to log to stdout)."""
    if twistd is None or twistd.get("syslog"):
        return None
    name, nodaemon = twistd.get("logfile"), twistd.get("nodaemon")
    if name == "-" and not nodaemon:
        return None
    if name == "-" or (nodaemon and not name):
        return sys.stdout
    return LogFile.fromFullPath(name or "twistd.log")


def install_sighup(reactor, service: ProxyService) -> None:
    """Reload the map rules on SIGHUP, from the reactor thread."""
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, lambda *_: reactor.callFromThread(service.reload))


def install_stop_once(reactor) -> None:
    """Once the reactor runs (its own handlers installed): SIGTERM/SIGINT stop it, a second one while it stops
    does nothing (Twisted's raised ReactorNotRunning, logged as a critical error: probe h3 of stop 58)."""
    def stop() -> None:
        try:
            reactor.stop()
        except ReactorNotRunning:
            pass

    def install() -> None:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda *_: reactor.callFromThread(stop))

    reactor.callWhenRunning(install)
