"""The proxy's configuration: a TOML file read once, validated whole, into frozen values.

Every mistake is reported as one ConfigError naming the key, so ``referral-proxy``
can print a single clear line and exit non-zero instead of a traceback.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .imap.reader import Limits

__all__ = [
    "BackendConfig",
    "Config",
    "ConfigError",
    "ConnectionLimits",
    "Limits",
    "LogConfig",
    "MetricsConfig",
    "ProxyConfig",
    "RuleConfig",
    "MapConfig",
    "keep_restart_only",
    "load_config",
    "parse_config",
]


REFERRAL_MODES = ("aware", "always", "never")
# "lower": ASCII letters lower-cased, like Dovecot's default %Lu; "as-is": like %u.
USERNAME_FORMATS = ("lower", "as-is")
# Every client limit is a field of imap.reader.Limits and a [proxy] key of the same name.
_LIMIT_KEYS = ("max_line", "max_literal", "max_command", "max_literals", "max_message", "max_append_messages")
# Every connection limit is a field of ConnectionLimits and a [proxy] key of the same name.
_CONNECTION_KEYS = ("max_connections", "max_connections_per_ip", "max_unauthenticated_per_ip",
                    "max_connections_per_user", "max_commands_in_flight")
TLS_MODES = ("none", "starttls", "implicit")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warn", "error", "critical")


class ConfigError(ValueError):
    """A configuration mistake; str() is one line naming the key."""


@dataclass(frozen=True)
class ConnectionLimits:
    """What clients may hold of the proxy together: connections, logins, commands in flight.

    Each field is a ``[proxy]`` key of the same name (defaults for one small server)."""

    max_connections: int = 1000  # client connections of the whole process (lowered to fit `ulimit -n`)
    max_connections_per_ip: int = 100  # from one address (an IPv6 client is its /64)
    max_unauthenticated_per_ip: int = 20  # of those, not logged in yet
    max_connections_per_user: int = 50  # logged-in sessions of one user, wherever from
    max_commands_in_flight: int = 64  # commands of one session relayed and not answered yet
    login_penalty: float = 15.0  # longest delay (s) before a login after failures (Dovecot's auth penalty); 0 = off


@dataclass(frozen=True)
class ProxyConfig:
    listen: tuple[str, ...]
    hostname: str = "referral-proxy"
    tls_cert: Path | None = None
    tls_key: Path | None = None
    allow_plaintext_login: bool = True
    referrals: str = "aware"
    login_referrals: bool = False
    login_timeout: float = 60.0  # seconds a client may stay unauthenticated
    limits: Limits = field(default_factory=Limits)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    # Upstreams (a load balancer, another proxy) whose ID x-originating-ip/port is believed.
    trusted_networks: tuple[str, ...] = ()
    proxy_ttl: int = 5  # hops a login may still take; sent on to backends as x-proxy-ttl minus one
    workers: int = 1  # proxy processes sharing the listeners ("auto" in the file: one per CPU)
    backend_keepalive: float = 10.0  # seconds a clean backend connection waits for its user's next login; 0 = off


@dataclass(frozen=True)
class BackendConfig:
    name: str
    endpoint: str  # Twisted client endpoint string (plain TCP; TLS is layered per `tls`)
    url: str  # imap://host[:port] as clients reach it directly
    tls: str = "none"
    ca: Path | None = None
    master_user: str | None = None
    master_password: str | None = None
    login_referral: bool = False
    connect_timeout: float = 10.0
    answer_timeout: float = 60.0  # seconds of silence after which a read the proxy waits on is cut (stall.py); 0 = never

    @property
    def url_host(self) -> str:
        """The host clients (and certificate checks) know this backend by."""
        return urlsplit(self.url).hostname or ""


@dataclass(frozen=True)
class RuleConfig:
    mailbox: str
    backends: tuple[str, ...]
    user: str | None = None


@dataclass(frozen=True)
class MapConfig:
    default: str
    store: str | None = None  # "sqlite:/abs/path" after loading, or a postgresql:// URI
    rules: tuple[RuleConfig, ...] = ()
    separator: str = "/"  # the backends' hierarchy separator, for patterns and listings
    username_format: str = "lower"  # how a login name becomes the map's user name (USERNAME_FORMATS)
    master_user_separator: str = ""  # Dovecot's auth_master_user_separator: "bob*admin" logs in as bob, routed as bob
    lease_seconds: float = 60.0  # PostgreSQL: a move whose owner stopped renewing this long is recovered elsewhere
    recovery_check_seconds: float = 2.0  # how often a proxy looks for a move whose owner died (recovery.py)
    move_wait_seconds: float = 10.0  # how long a COPY/MOVE waits for a MOVE across in its way (copywait.py)


@dataclass(frozen=True)
class LogConfig:
    """``[log]``: how events are written (to stderr, or twistd's log file)."""

    format: str = "text"  # text: one readable line an event; json: one JSON object a line
    level: str = "info"  # the least severe level written


@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: the Prometheus endpoint; off without ``listen``."""

    listen: str | None = None  # Twisted server endpoint string: /metrics and /health
    health_interval: float = 10.0  # seconds between two checks (connect + greeting) of every backend


@dataclass(frozen=True)
class Config:
    proxy: ProxyConfig
    backends: dict[str, BackendConfig]
    map: MapConfig
    path: Path | None = None
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    text: str = field(default="", compare=False, repr=False)  # the file as read: what a worker started later runs


def load_config(path: str | Path, *, check_endpoints: Callable[[Config], None] | None = None,
                text: str | None = None) -> Config:
    """Read and validate the TOML file at *path* (or *text*, as read from it before); relative paths
    inside are relative to it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8") if text is None else text
        raw = tomllib.loads(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    config = dataclasses.replace(parse_config(raw, base=path.resolve().parent, path=path), text=text)
    if check_endpoints is not None:
        check_endpoints(config)
    return config


def keep_restart_only(config: Config, running: Config) -> Config:
    """*config* with *running*'s values of what is read at start-up only (README: `listen`, `workers`, `[log]`,
    `[metrics]`, the map's `store`, `username_format`, `separator`): what a reload, or a worker started after
    one, runs (probe c3 of stop 55: a worker restarted after a reload opened the new file's store)."""
    return dataclasses.replace(
        config, log=running.log, metrics=running.metrics,
        proxy=dataclasses.replace(config.proxy, listen=running.proxy.listen, workers=running.proxy.workers),
        map=dataclasses.replace(config.map, store=running.map.store, separator=running.map.separator,
                                username_format=running.map.username_format))


def parse_config(raw: dict[str, Any], *, base: Path, path: Path | None = None) -> Config:
    """Validate an already-decoded TOML document."""
    _only(raw, "", {"proxy", "backends", "map", "log", "metrics"})
    proxy_raw = _table(raw, "proxy", required=True)
    backends_raw = _table(raw, "backends", required=True)
    map_raw = _table(raw, "map", required=True)

    proxy = _parse_proxy(proxy_raw, base)
    if not backends_raw:
        raise ConfigError("backends: at least one backend is required")
    backends = {name: _parse_backend(name, b, base) for name, b in backends_raw.items()}
    map_ = _parse_map(map_raw, base, backends)
    log = _parse_log(_table(raw, "log", required=False))
    metrics = _parse_metrics(_table(raw, "metrics", required=False))
    return Config(proxy=proxy, backends=backends, map=map_, path=path, log=log, metrics=metrics)


def _parse_proxy(raw: dict[str, Any], base: Path) -> ProxyConfig:
    keys = {
        "listen", "hostname", "tls_cert", "tls_key", "allow_plaintext_login",
        "referrals", "login_referrals", "login_timeout", *_LIMIT_KEYS, "trusted_networks", "proxy_ttl",
        "workers", "backend_keepalive",
        *_CONNECTION_KEYS, "login_penalty",
    }
    _only(raw, "proxy", keys)
    listen = _get(raw, "proxy", "listen", list, required=True)
    if not listen or not all(isinstance(s, str) and s for s in listen):
        raise ConfigError("proxy.listen: must be a non-empty list of endpoint strings")
    referrals = _get(raw, "proxy", "referrals", str, default="aware")
    if referrals not in REFERRAL_MODES:
        raise ConfigError(f"proxy.referrals: must be one of {', '.join(REFERRAL_MODES)}, not {referrals!r}")
    cert = _path(raw, "proxy", "tls_cert", base)
    key = _path(raw, "proxy", "tls_key", base)
    if (cert is None) != (key is None):
        raise ConfigError("proxy.tls_cert: tls_cert and tls_key go together")
    limits = Limits(**{key: _positive(raw, "proxy", key, getattr(Limits, key)) for key in _LIMIT_KEYS})
    timeout = _get(raw, "proxy", "login_timeout", (int, float), default=60.0)
    if timeout <= 0:
        raise ConfigError("proxy.login_timeout: must be positive")
    connections = _connection_limits(raw)
    keepalive = _get(raw, "proxy", "backend_keepalive", (int, float), default=10.0)
    if isinstance(keepalive, bool) or not 0 <= keepalive <= 3600:
        raise ConfigError("proxy.backend_keepalive: must be seconds from 0 (off) to 3600")
    trusted = _get(raw, "proxy", "trusted_networks", list, default=[])
    for i, net in enumerate(trusted):
        try:
            if not isinstance(net, str):
                raise TypeError(net)
            ipaddress.ip_network(net, strict=False)
        except (TypeError, ValueError):
            raise ConfigError(f"proxy.trusted_networks[{i}]: not a network (like 10.0.0.0/8 or 192.0.2.1): {net!r}") from None
    return ProxyConfig(
        listen=tuple(listen),
        hostname=_get(raw, "proxy", "hostname", str, default="referral-proxy"),
        tls_cert=cert,
        tls_key=key,
        allow_plaintext_login=_get(raw, "proxy", "allow_plaintext_login", bool, default=True),
        referrals=referrals,
        login_referrals=_get(raw, "proxy", "login_referrals", bool, default=False),
        login_timeout=float(timeout),
        limits=limits,
        connections=connections,
        trusted_networks=tuple(trusted),
        proxy_ttl=_positive(raw, "proxy", "proxy_ttl", 5),
        workers=_workers(raw),
        backend_keepalive=float(keepalive),
    )


MAX_WORKERS = 256


def _workers(raw: dict[str, Any]) -> int:
    """``workers = N`` (1..256) or ``"auto"`` (one per CPU this process may run on)."""
    value = raw.get("workers", 1)
    if value == "auto":
        try:
            return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
        except AttributeError:  # not Linux
            return max(1, min(MAX_WORKERS, os.cpu_count() or 1))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
        raise ConfigError(f'proxy.workers: must be a number of processes from 1 to {MAX_WORKERS}, or "auto"')
    return value


def _connection_limits(raw: dict[str, Any]) -> ConnectionLimits:
    counts = {key: _positive(raw, "proxy", key, getattr(ConnectionLimits, key)) for key in _CONNECTION_KEYS}
    penalty = _get(raw, "proxy", "login_penalty", (int, float), default=ConnectionLimits.login_penalty)
    if not 0 <= penalty <= 3600:
        raise ConfigError("proxy.login_penalty: must be between 0 (off) and 3600 seconds")
    return ConnectionLimits(**counts, login_penalty=float(penalty))


def _parse_backend(name: str, raw: Any, base: Path) -> BackendConfig:
    where = f"backends.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    _only(raw, where, {
        "endpoint", "url", "tls", "ca", "master_user", "master_password",
        "login_referral", "connect_timeout", "answer_timeout",
    })
    endpoint = _get(raw, where, "endpoint", str, required=True)
    url = _get(raw, where, "url", str, required=True)
    parts = urlsplit(url)
    if parts.scheme != "imap" or not parts.hostname:
        raise ConfigError(f"{where}.url: must look like imap://host[:port], not {url!r}")
    try:
        _ = parts.port  # raises on a bad port
    except ValueError:
        raise ConfigError(f"{where}.url: bad port in {url!r}") from None
    tls = _get(raw, where, "tls", str, default="none")
    if tls not in TLS_MODES:
        raise ConfigError(f"{where}.tls: must be one of {', '.join(TLS_MODES)}, not {tls!r}")
    master_user = _get(raw, where, "master_user", str, default=None)
    master_password = _get(raw, where, "master_password", str, default=None)
    if (master_user is None) != (master_password is None):
        raise ConfigError(f"{where}.master_user: master_user and master_password go together")
    timeout = _get(raw, where, "connect_timeout", (int, float), default=10.0)
    answer = _get(raw, where, "answer_timeout", (int, float), default=60.0)
    if isinstance(answer, bool) or not (answer == 0 or 0.1 <= answer <= 3600):
        raise ConfigError(f"{where}.answer_timeout: must be seconds from 0.1 to 3600, or 0 (never)")
    return BackendConfig(
        name=name,
        endpoint=endpoint,
        url=url,
        tls=tls,
        ca=_path(raw, where, "ca", base),
        master_user=master_user,
        master_password=master_password,
        login_referral=_get(raw, where, "login_referral", bool, default=False),
        connect_timeout=float(timeout),
        answer_timeout=float(answer),
    )


def _parse_map(raw: dict[str, Any], base: Path, backends: dict[str, BackendConfig]) -> MapConfig:
    _only(raw, "map", {"default", "store", "rules", "separator", "username_format", "master_user_separator",
                     "lease_seconds", "recovery_check_seconds", "move_wait_seconds"})
    separator = _get(raw, "map", "separator", str, default="/")
    if len(separator) != 1:
        raise ConfigError("map.separator: must be one character")
    username_format = _get(raw, "map", "username_format", str, default="lower")
    if username_format not in USERNAME_FORMATS:
        raise ConfigError(f"map.username_format: must be one of {', '.join(USERNAME_FORMATS)}, not {username_format!r}")
    master_separator = _get(raw, "map", "master_user_separator", str, default="")
    if len(master_separator) > 1 or master_separator.isalnum() or master_separator.isspace():
        raise ConfigError("map.master_user_separator: one character that is not a letter, digit or space (or \"\": none)")
    default = _get(raw, "map", "default", str, required=True)
    if default not in backends:
        raise ConfigError(f"map.default: unknown backend {default!r}")
    store = _get(raw, "map", "store", str, default=None)
    if store is not None:
        scheme, sep, rest = store.partition(":")
        if scheme in ("postgresql", "postgres") and rest.startswith("//"):
            pass  # a libpq URI: postgresql://user@host/db, postgresql:///db?host=/socket/dir
        elif scheme != "sqlite" or not sep or not rest:
            raise ConfigError(f"map.store: must look like sqlite:PATH or postgresql://USER@HOST/DB, not {store!r}")
        else:
            p = Path(rest)
            store = f"sqlite:{p if p.is_absolute() or rest == ':memory:' else base / p}"
    lease_seconds = _get(raw, "map", "lease_seconds", (int, float), default=60)
    if not 1 <= lease_seconds <= 3600:
        raise ConfigError("map.lease_seconds: must be between 1 and 3600")
    check_seconds = _get(raw, "map", "recovery_check_seconds", (int, float), default=2)
    if not 0.1 <= check_seconds <= 3600:
        raise ConfigError("map.recovery_check_seconds: must be between 0.1 and 3600")
    move_wait = _get(raw, "map", "move_wait_seconds", (int, float), default=10)
    if not 0.1 <= move_wait <= 3600:
        raise ConfigError("map.move_wait_seconds: must be between 0.1 and 3600")
    rules_raw = raw.get("rules", [])
    if not isinstance(rules_raw, list):
        raise ConfigError("map.rules: must be an array of tables ([[map.rules]])")
    rules = []
    for i, r in enumerate(rules_raw):
        where = f"map.rules[{i}]"
        if not isinstance(r, dict):
            raise ConfigError(f"{where}: must be a table")
        _only(r, where, {"user", "mailbox", "backend"})
        target = r.get("backend")
        names = (target,) if isinstance(target, str) else tuple(target) if isinstance(target, list) else None
        if not names or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"{where}.backend: must be a backend name or a list of them")
        for n in names:
            if n not in backends:
                raise ConfigError(f"{where}.backend: unknown backend {n!r}")
        if len(set(names)) < len(names):  # a replica named twice is no second copy: a typo
            raise ConfigError(f"{where}.backend: a backend is named twice in {list(names)}")
        rules.append(RuleConfig(
            user=_get(r, where, "user", str, default=None),
            mailbox=_get(r, where, "mailbox", str, default="*"),
            backends=names,
        ))
    return MapConfig(default=default, store=store, rules=tuple(rules), separator=separator,
                     username_format=username_format, master_user_separator=master_separator,
                     lease_seconds=float(lease_seconds),
                     recovery_check_seconds=float(check_seconds), move_wait_seconds=float(move_wait))


def _parse_log(raw: dict[str, Any]) -> LogConfig:
    _only(raw, "log", {"format", "level"})
    fmt = _get(raw, "log", "format", str, default="text")
    if fmt not in LOG_FORMATS:
        raise ConfigError(f"log.format: must be one of {', '.join(LOG_FORMATS)}, not {fmt!r}")
    level = _get(raw, "log", "level", str, default="info").lower()
    level = "warn" if level == "warning" else level
    if level not in LOG_LEVELS:
        raise ConfigError(f"log.level: must be one of {', '.join(LOG_LEVELS)}, not {level!r}")
    return LogConfig(format=fmt, level=level)


def _parse_metrics(raw: dict[str, Any]) -> MetricsConfig:
    _only(raw, "metrics", {"listen", "health_interval"})
    listen = _get(raw, "metrics", "listen", str, default=None)
    if listen is not None and not listen:
        raise ConfigError("metrics.listen: must be an endpoint string like \"tcp:9143:interface=127.0.0.1\"")
    interval = _get(raw, "metrics", "health_interval", (int, float), default=10.0)
    if interval <= 0:
        raise ConfigError("metrics.health_interval: must be positive")
    return MetricsConfig(listen=listen, health_interval=float(interval))


# -- small validators -------------------------------------------------------

def _only(raw: dict[str, Any], where: str, allowed: set[str]) -> None:
    for key in raw:
        if key not in allowed:
            name = f"{where}.{key}" if where else key
            raise ConfigError(f"{name}: unknown key")


def _table(raw: dict[str, Any], key: str, *, required: bool) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        if required:
            raise ConfigError(f"{key}: missing table [{key}]")
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table")
    return value


def _get(raw: dict[str, Any], where: str, key: str, kind: Any, *, required: bool = False, default: Any = None) -> Any:
    if key not in raw:
        if required:
            raise ConfigError(f"{where}.{key}: missing")
        return default
    value = raw[key]
    # TOML booleans are ints in Python; keep them apart.
    if isinstance(value, bool) and kind is not bool and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ConfigError(f"{where}.{key}: wrong type {type(value).__name__}")
    if not isinstance(value, kind):
        raise ConfigError(f"{where}.{key}: wrong type {type(value).__name__}")
    return value


def _positive(raw: dict[str, Any], where: str, key: str, default: int) -> int:
    value = _get(raw, where, key, int, default=default)
    if value <= 0:
        raise ConfigError(f"{where}.{key}: must be positive")
    return value


def _path(raw: dict[str, Any], where: str, key: str, base: Path) -> Path | None:
    value = _get(raw, where, key, str, default=None)
    if value is None:
        return None
    p = Path(value)
    p = p if p.is_absolute() else base / p
    if not p.is_file():
        raise ConfigError(f"{where}.{key}: no such file {str(p)!r}")
    return p
