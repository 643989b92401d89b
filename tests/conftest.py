"""Shared pytest fixtures: real Dovecot backends and the proxy as a subprocess.

* ``fleet`` (session): three real Dovecot instances, b1 on 127.0.0.2, b2 on
  127.0.0.3, b3 on 127.0.0.4 (see referral_proxy.fleet), with one
  throwaway CA; plain IMAP with STARTTLS on ``.port``, IMAPS on ``.imaps_port``.
* ``clean_mail`` (function, opt-in): every user's mail deleted on every backend.
* ``proxy_factory`` (function): starts ``python -m referral_proxy --config
  <file>`` in front of the fleet and stops it at teardown.

When a test that uses the fleet fails, the Dovecot log lines written during
the test and the stderr of its proxies are added to the report.
"""

from __future__ import annotations

import copy
import imaplib
import math
import os
import re
import shutil
import tempfile
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from referral_proxy.fleet import (
    DEFAULT_USERS,
    Fleet,
    dovecot_available,
    free_port,
    make_root,
)
from referral_proxy.testing.proxyproc import REPO_ROOT, ProxyProcess, StartError  # noqa: F401 (REPO_ROOT: for tests)

# Hypothesis: no per-example deadline (default 200 ms) nor too_slow health check by default, as most
# property tests here already say: both are timings, and a loaded CI machine stalls a process that
# long now and then (test_mutf7, test_url, test_imap_data, test_framing: 160-200 s under load here).
settings.register_profile("referral-proxy", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("referral-proxy")

PROXY_START_TIMEOUT = 60.0  # a bound, not a measurement: 20 s ran out once under load (no stderr yet)


# --------------------------------------------------------------------------- TOML


_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.match(key) else _toml_string(key)


def _toml_string(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _toml_string(v)
    if isinstance(v, os.PathLike):
        return _toml_string(os.fspath(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):  # inline table (only inside arrays of scalars' siblings)
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}"
                              for k, x in v.items() if x is not None) + "}"
    raise TypeError(f"cannot write {v!r} ({type(v).__name__}) as TOML")


def _is_table_array(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) > 0 and all(isinstance(x, Mapping) for x in v)


def toml_dumps(data: Mapping[str, Any]) -> str:
    """Serialize *data* as TOML: strings, bools, ints, floats, paths, lists of
    scalars, tables (dicts) and arrays of tables (lists of dicts).  Keys whose
    value is None are left out (so an override can delete a key)."""
    lines: list[str] = []

    def emit_table(table: Mapping[str, Any], path: list[str], header: str | None) -> None:
        scalars = [(k, v) for k, v in table.items()
                   if v is not None and not isinstance(v, Mapping) and not _is_table_array(v)]
        subtables = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        arrays = [(k, v) for k, v in table.items() if _is_table_array(v)]
        if header is not None and (scalars or not (subtables or arrays)):
            if lines:
                lines.append("")
            lines.append(header)
        for k, v in scalars:
            lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for k, v in subtables:
            sub = path + [k]
            emit_table(v, sub, "[" + ".".join(_toml_key(p) for p in sub) + "]")
        for k, items in arrays:
            sub = path + [k]
            for item in items:
                if lines:
                    lines.append("")
                lines.append("[[" + ".".join(_toml_key(p) for p in sub) + "]]")
                emit_table(item, sub, None)

    emit_table(data, [], None)
    return "\n".join(lines) + "\n"


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of *base* with *override* merged in: dicts recursively, everything
    else (lists included) replaced; a None value deletes the key."""
    result = copy.deepcopy(dict(base))
    for k, v in override.items():
        if v is None:
            result.pop(k, None)
        elif isinstance(v, Mapping) and isinstance(result.get(k), Mapping):
            result[k] = deep_merge(result[k], v)
        else:
            result[k] = copy.deepcopy(v)
    return result


def parse_listen(endpoint: str) -> tuple[str, int]:
    """(host, port) to connect to for a Twisted server endpoint string such as
    ``tcp:1143:interface=127.0.0.1`` or ``ssl:port=993:privateKey=...``."""
    parts = re.split(r"(?<!\\):", endpoint)
    kind, args = parts[0], parts[1:]
    if kind not in ("tcp", "tcp6", "ssl", "tls"):
        raise ValueError(f"cannot find a port in listen endpoint {endpoint!r}")
    positional = [a for a in args if "=" not in a]
    kw = dict(a.split("=", 1) for a in args if "=" in a)
    port = kw.get("port") or (positional[0] if positional else None)
    if port is None:
        raise ValueError(f"no port in listen endpoint {endpoint!r}")
    host = kw.get("interface", "").replace("\\:", ":")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, int(port)


# ----------------------------------------------------------------------- fleet


_session_root: Path | None = None


def dovecot_root() -> Path:
    """A new, empty, world-traversable (0755) directory for a Dovecot instance
    root (``Dovecot(name, host, dovecot_root() / name)``).  pytest's tmp_path is
    0700, which Dovecot's unprivileged processes cannot enter.  Everything made
    here is deleted at the end of the session (kept if RP_KEEP_DOVECOT is set)."""
    global _session_root
    if _session_root is None or not _session_root.is_dir():
        _session_root = make_root("rp-dovecot-tests-")
    path = Path(tempfile.mkdtemp(dir=_session_root))
    os.chmod(path, 0o755)
    return path


def pytest_sessionfinish(session, exitstatus):
    if _session_root is not None and not os.environ.get("RP_KEEP_DOVECOT"):
        shutil.rmtree(_session_root, ignore_errors=True)


def require_dovecot() -> None:
    """Skip (fail under CI) when real Dovecot instances cannot run here."""
    reason = dovecot_available()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"real Dovecot needed in CI: {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def fleet():
    """Three real Dovecot backends (b1 127.0.0.2, b2 127.0.0.3, b3 127.0.0.4)."""
    require_dovecot()
    fleet = None
    try:
        fleet = Fleet.start_default(dovecot_root() / "fleet")
        yield fleet
    finally:
        if fleet is not None:
            fleet.stop()


@pytest.fixture
def clean_mail(fleet):
    """Every user's mail deleted on every backend before the test."""
    fleet.reset_mail()
    return fleet


# ----------------------------------------------------------------------- proxy


ProxyStartError = StartError  # the proxy did not come up (its stderr's tail in the message)


class RunningProxy(ProxyProcess):
    """A proxy subprocess of a test, with the configuration it was given and helpers to reach it."""

    def __init__(self, *, host: str, port: int, config_path: Path, workdir: Path, stdout_path: Path,
                 stderr_path: Path, config: dict[str, Any] | None = None, users: dict[str, str] | None = None,
                 implicit_tls: bool = False) -> None:
        super().__init__(config_path, host=host, port=port, workdir=workdir, stdout_path=stdout_path,
                         stderr_path=stderr_path, implicit_tls=implicit_tls)
        self.config = config  # None when raw text was given
        self.users = dict(users if users is not None else DEFAULT_USERS)

    @property
    def endpoint(self) -> str:
        return f"tcp:host={self.host}:port={self.port}"

    @property
    def url(self) -> str:
        return f"imap://{self.host}:{self.port}"

    def imaplib(self, timeout: float | None = 30.0) -> imaplib.IMAP4:
        """A new imaplib connection to the proxy (greeted, not logged in)."""
        return imaplib.IMAP4(self.host, self.port, timeout=timeout)

    def login(self, user: str, timeout: float | None = 30.0) -> imaplib.IMAP4:
        """A new imaplib connection to the proxy, logged in as *user*."""
        conn = self.imaplib(timeout=timeout)
        conn.login(user, self.users[user])
        return conn

    def imapclient(self, **kw):
        """A new imapclient.IMAPClient connection to the proxy (not logged in)."""
        import imapclient
        kw.setdefault("ssl", False)
        kw.setdefault("timeout", 30)
        return imapclient.IMAPClient(self.host, port=self.port, **kw)


def default_proxy_config(fleet: Fleet, port: int, rules=()) -> dict[str, Any]:
    config: dict[str, Any] = {
        "proxy": {
            "listen": [f"tcp:{port}:interface=127.0.0.1"],
            "hostname": "proxy.test",
            "allow_plaintext_login": True,
        },
        "backends": {
            name: {"endpoint": d.endpoint, "url": d.url, "tls": "none"}
            for name, d in fleet.backends.items()
        },
        "map": {
            "default": "b1",
            "store": "sqlite:map.sqlite3",
        },
    }
    if rules:
        config["map"]["rules"] = [dict(r) for r in rules]
    return config


@pytest.fixture
def proxy_factory(fleet, tmp_path, request) -> Callable[..., RunningProxy]:
    """``proxy_factory(config_text_or_dict=None, **kw) -> RunningProxy``.

    * None: the default config (listen on a free port of 127.0.0.1, hostname
      "proxy.test", plaintext login allowed, backends b1/b2/b3 with tls "none",
      ``[map] default = "b1"``, ``store = "sqlite:map.sqlite3"``).
    * a dict: deep-merged into the default (None deletes a key), e.g.
      ``{"backends": {"b1": {"tls": "starttls", "ca": str(fleet.tls.ca_cert)}}}``.
    * a str: the config file's text, used verbatim (its first listen endpoint
      tells where to connect).

    Keywords: ``rules=[{"user": "bob", "mailbox": "*", "backend": "b2"}, ...]``
    (the ``[[map.rules]]``), ``args=[...]`` (extra command-line arguments),
    ``env={...}``, ``timeout=60.0`` (start-up), ``wait=True`` (wait for the
    greeting), ``command=[...]`` (instead of ``python -m referral_proxy``, e.g.
    ``tests/faultproxy.py`` with its options and ``--``), ``preexec=f`` (run in
    the child before its exec: resource limits); any other keyword goes into the
    ``[proxy]`` table, e.g. ``referrals="aware"``.  Each proxy runs in its own
    directory (its cwd, where the config file and a relative sqlite store live).
    ``RP_TEST_STORE=postgresql`` puts the default store in a PostgreSQL database of
    the test's own instead (tests that open the SQLite file themselves then fail:
    they read the wrong store).
    """
    started: list[RunningProxy] = []
    counter = [0]

    def factory(config_text_or_dict: str | Mapping[str, Any] | None = None, *,
                rules=(), args=(), env: Mapping[str, str] | None = None,
                timeout: float = PROXY_START_TIMEOUT, wait: bool = True,
                command: list[str] | None = None, preexec=None, **proxy_options) -> RunningProxy:
        # The listen port is picked free, then bound by the child a second later: another process
        # (a client's outgoing connection, another test run on the machine) may take it meanwhile.
        # The proxy then exits "Address already in use": a port of our own choosing is picked again.
        for attempt in range(1, 4):
            try:
                return start_one(config_text_or_dict, rules, args, env, timeout, wait, command, preexec,
                                 proxy_options)
            except StartError as e:
                if attempt == 3 or not getattr(e, "port_was_ours", False):
                    raise

    def start_one(config_text_or_dict, rules, args, env, timeout, wait, command, preexec,
                  proxy_options) -> RunningProxy:
        counter[0] += 1
        workdir = tmp_path / f"proxy-{counter[0]}"
        workdir.mkdir()
        config: dict[str, Any] | None
        if isinstance(config_text_or_dict, str):
            if rules or proxy_options:
                raise TypeError("rules/proxy options cannot be combined with raw config text")
            text = config_text_or_dict
            parsed = tomllib.loads(text)
            config = None
        else:
            config = default_proxy_config(fleet, free_port("127.0.0.1"), rules)
            ours = config["proxy"]["listen"]
            if config_text_or_dict is not None:
                config = deep_merge(config, config_text_or_dict)
            if proxy_options:
                config = deep_merge(config, {"proxy": proxy_options})
            text = toml_dumps(config)
            parsed = tomllib.loads(text)  # our own output must round-trip
        listen = parsed.get("proxy", {}).get("listen")
        if isinstance(listen, str):
            listen = [listen]
        if not listen:
            raise ValueError("the proxy config has no [proxy] listen endpoint")
        if (config is not None and os.environ.get("RP_TEST_STORE") == "postgresql"
                and config.get("map", {}).get("store") == "sqlite:map.sqlite3"):
            # the same tests on the shared store: one database per test (its proxies share it)
            config["map"]["store"] = request.getfixturevalue("pg_dsn")
            text = toml_dumps(config)
        host, port = parse_listen(listen[0])
        config_path = workdir / "proxy.toml"
        config_path.write_text(text)

        proxy = RunningProxy(host=host, port=port, config_path=config_path, workdir=workdir,
                             stdout_path=workdir / "stdout.log", stderr_path=workdir / "stderr.log",
                             config=config, implicit_tls=listen[0].startswith("ssl:"))
        started.append(proxy)
        try:
            proxy.start(args=args, env=env, timeout=timeout, wait=wait, command=command, preexec=preexec)
        except StartError as e:
            e.port_was_ours = (config is not None and config["proxy"]["listen"] == ours  # type: ignore[attr-defined]
                               and f"{host}:{port}: [Errno 98]" in str(e))
            raise
        return proxy

    factory.default_config = lambda rules=(): default_proxy_config(  # type: ignore[attr-defined]
        fleet, free_port("127.0.0.1"), rules)
    factory.toml = toml_dumps  # type: ignore[attr-defined]
    factory.started = started  # type: ignore[attr-defined]
    request.node._rp_proxies = started
    try:
        yield factory
    finally:
        errors = []
        for proxy in started:
            try:
                proxy.stop()
            except Exception as e:
                errors.append(e)
        if errors:
            raise errors[0]


# -------------------------------------------- diagnostics in failure reports


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    fleet_ = item.funcargs.get("fleet") if hasattr(item, "funcargs") else None
    if isinstance(fleet_, Fleet):
        offsets = {}
        for name, d in fleet_.backends.items():
            try:
                offsets[name] = d.log_path.stat().st_size
            except OSError:
                offsets[name] = 0
        item._rp_log_offsets = offsets
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    fleet_ = getattr(item, "funcargs", {}).get("fleet")
    offsets = getattr(item, "_rp_log_offsets", None)
    if isinstance(fleet_, Fleet) and offsets is not None:
        for name, d in fleet_.backends.items():
            try:
                with open(d.log_path, "rb") as f:
                    f.seek(offsets.get(name, 0))
                    text = f.read().decode(errors="replace")
            except OSError:
                continue
            if text.strip():
                report.sections.append((f"dovecot {name} log", text[-6000:]))
    for i, proxy in enumerate(getattr(item, "_rp_proxies", []) or [], 1):
        text = proxy.stderr_text()
        p = proxy.process
        state = "not started" if p is None else "running" if p.poll() is None else f"exited {p.returncode}"
        report.sections.append((f"proxy {i} stderr ({state})", text[-8000:] if text.strip() else "(empty)"))


@pytest.fixture
def spare_backend(fleet):
    """A fourth real Dovecot (127.0.0.6), not in the default config, that a test may kill."""
    from referral_proxy.fleet import Dovecot

    d = Dovecot("spare", "127.0.0.6", dovecot_root() / "spare")
    d.start()
    yield d
    d.stop()


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def postgres():
    """A PostgreSQL server of its own (initdb + pg_ctl, Unix socket, trust), for the whole session."""
    from referral_proxy.testing.pg import PostgresServer

    root = Path(tempfile.mkdtemp(prefix="rp-pg-"))
    server = PostgresServer(root)
    server.init()
    server.start()
    yield server
    try:
        server.stop()
    except Exception:
        pass
    shutil.rmtree(root, ignore_errors=True)


_PG_DBS = [0]


@pytest.fixture
def pg_dsn(postgres):
    """A fresh, migrated database on the session's server: its URI."""
    from referral_proxy.pgstore import migrate

    _PG_DBS[0] += 1
    dsn = postgres.create_db(f"map{_PG_DBS[0]}")
    migrate(dsn)
    return dsn
