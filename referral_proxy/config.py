"""The proxy's configuration: a TOML file read once, validated whole, into frozen values.

Every mistake is reported as one ConfigError naming the key, so ``referral-proxy``
can print a single clear line and exit non-zero instead of a traceback.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "BackendConfig",
    "Config",
    "ConfigError",
    "Limits",
    "ProxyConfig",
    "RuleConfig",
    "MapConfig",
    "load_config",
    "parse_config",
]

KiB = 1024
MiB = 1024 * KiB

REFERRAL_MODES = ("aware", "always", "never")
# "lower": ASCII letters lower-cased, like Dovecot's default %Lu; "as-is": like %u.
USERNAME_FORMATS = ("lower", "as-is")
TLS_MODES = ("none", "starttls", "implicit")


class ConfigError(ValueError):
    """A configuration mistake; str() is one line naming the key."""


@dataclass(frozen=True)
class Limits:
    """Size limits enforced on what clients send (documented defaults)."""

    max_line: int = 64 * KiB  # one command line (fragment between literals)
    max_literal: int = 64 * KiB  # a literal outside APPEND
    max_message: int = 512 * MiB  # one APPEND message literal
    max_append_messages: int = 10_000  # messages in one (MULTI)APPEND


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
    store: str | None = None  # "sqlite:/abs/path" after loading
    rules: tuple[RuleConfig, ...] = ()
    separator: str = "/"  # the backends' hierarchy separator, for patterns and listings
    username_format: str = "lower"  # how a login name becomes the map's user name (USERNAME_FORMATS)


@dataclass(frozen=True)
class Config:
    proxy: ProxyConfig
    backends: dict[str, BackendConfig]
    map: MapConfig
    path: Path | None = None


def load_config(path: str | Path, *, check_endpoints: Callable[[Config], None] | None = None) -> Config:
    """Read and validate the TOML file at *path*; relative paths inside are relative to it."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    config = parse_config(raw, base=path.resolve().parent, path=path)
    if check_endpoints is not None:
        check_endpoints(config)
    return config


def parse_config(raw: dict[str, Any], *, base: Path, path: Path | None = None) -> Config:
    """Validate an already-decoded TOML document."""
    _only(raw, "", {"proxy", "backends", "map"})
    proxy_raw = _table(raw, "proxy", required=True)
    backends_raw = _table(raw, "backends", required=True)
    map_raw = _table(raw, "map", required=True)

    proxy = _parse_proxy(proxy_raw, base)
    if not backends_raw:
        raise ConfigError("backends: at least one backend is required")
    backends = {name: _parse_backend(name, b, base) for name, b in backends_raw.items()}
    map_ = _parse_map(map_raw, base, backends)
    return Config(proxy=proxy, backends=backends, map=map_, path=path)


def _parse_proxy(raw: dict[str, Any], base: Path) -> ProxyConfig:
    keys = {
        "listen", "hostname", "tls_cert", "tls_key", "allow_plaintext_login",
        "referrals", "login_referrals", "login_timeout", "max_line", "max_literal",
        "max_message", "max_append_messages",
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
    limits = Limits(
        max_line=_positive(raw, "proxy", "max_line", Limits.max_line),
        max_literal=_positive(raw, "proxy", "max_literal", Limits.max_literal),
        max_message=_positive(raw, "proxy", "max_message", Limits.max_message),
        max_append_messages=_positive(raw, "proxy", "max_append_messages", Limits.max_append_messages),
    )
    timeout = _get(raw, "proxy", "login_timeout", (int, float), default=60.0)
    if timeout <= 0:
        raise ConfigError("proxy.login_timeout: must be positive")
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
    )


def _parse_backend(name: str, raw: Any, base: Path) -> BackendConfig:
    where = f"backends.{name}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table")
    _only(raw, where, {
        "endpoint", "url", "tls", "ca", "master_user", "master_password",
        "login_referral", "connect_timeout",
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
    )


def _parse_map(raw: dict[str, Any], base: Path, backends: dict[str, BackendConfig]) -> MapConfig:
    _only(raw, "map", {"default", "store", "rules", "separator", "username_format"})
    separator = _get(raw, "map", "separator", str, default="/")
    if len(separator) != 1:
        raise ConfigError("map.separator: must be one character")
    username_format = _get(raw, "map", "username_format", str, default="lower")
    if username_format not in USERNAME_FORMATS:
        raise ConfigError(f"map.username_format: must be one of {', '.join(USERNAME_FORMATS)}, not {username_format!r}")
    default = _get(raw, "map", "default", str, required=True)
    if default not in backends:
        raise ConfigError(f"map.default: unknown backend {default!r}")
    store = _get(raw, "map", "store", str, default=None)
    if store is not None:
        scheme, sep, rest = store.partition(":")
        if scheme != "sqlite" or not sep or not rest:
            raise ConfigError(f"map.store: must look like sqlite:PATH, not {store!r}")
        p = Path(rest)
        store = f"sqlite:{p if p.is_absolute() or rest == ':memory:' else base / p}"
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
        rules.append(RuleConfig(
            user=_get(r, where, "user", str, default=None),
            mailbox=_get(r, where, "mailbox", str, default="*"),
            backends=names,
        ))
    return MapConfig(default=default, store=store, rules=tuple(rules), separator=separator,
                     username_format=username_format)


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
