"""The log writer ([log] format and level) and the [log] / [metrics] / loop-guard settings."""

from __future__ import annotations

import io
import json
import shlex
from pathlib import Path

import pytest
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from referral_proxy.config import ConfigError, LogConfig, load_config, parse_config
from referral_proxy.logs import LogWriter

BASE = {
    "proxy": {"listen": ["tcp:1143:interface=127.0.0.1"]},
    "backends": {"b1": {"endpoint": "tcp:host=127.0.0.2:port=1", "url": "imap://127.0.0.2:1"}},
    "map": {"default": "b1"},
}


def writer(fmt="json", level="info", context=None):
    out = io.StringIO()
    w = LogWriter(LogConfig(format=fmt, level=level), out, context=context, clock=lambda: 0.0)
    return w, out, Logger(namespace="referral_proxy.session", observer=w)


def test_json_lines_parse_and_carry_the_session_fields():
    contexts = {3: {"session": 3, "user": "alice", "client": "192.0.2.7:4000", "backend": "b1"}}
    w, out, log = writer(context=contexts.get)
    log.warn("session {id}: backend {name} connection lost: {why}", id=3, name="b1", why="gone")
    log.info("unrelated {id}", id=99)
    events = Logger(namespace="referral_proxy.events", observer=w)
    events.emit(LogLevel.info, "transfer", rp_event="transfer",
                rp_fields={"session": 3, "user": "alice", "client": "192.0.2.7:4000", "backend": "b1",
                           "mailbox": b"Shared/Caf&AOk-", "bytes": 12})
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert lines[0] | {"time": None} == {
        "time": None, "level": "warn", "event": "error", "namespace": "referral_proxy.session",
        "message": "session 3: backend b1 connection lost: gone",
        "session": 3, "user": "alice", "client": "192.0.2.7:4000", "backend": "b1"}
    assert lines[1]["event"] == "log" and "user" not in lines[1]
    assert lines[2]["event"] == "transfer" and lines[2]["mailbox"] == "Shared/Café" and lines[2]["bytes"] == 12


def test_text_lines_decode_names_and_escape_control_characters():
    w, out, log = writer("text")
    log.info("moved {box} to {utf8} for {user}", box=b"Caf&AOk-", utf8=b"\xc3\xa9t\xc3\xa9\xff",
             user="eve\r\n2030-01-01 FAKE LINE")
    events = Logger(namespace="referral_proxy.events", observer=w)
    events.emit(LogLevel.info, "login", rp_event="login",
                rp_fields={"session": 1, "user": "a b\nc", "client": "192.0.2.7:1", "backend": "b1", "result": "ok"})
    text = out.getvalue()
    lines = text.splitlines()
    assert len(lines) == 2, text
    assert "moved Café to été\\xff for eve\\x0d\\x0a2030-01-01 FAKE LINE" in lines[0]
    assert "b'" not in text
    assert lines[1].endswith('login session=1 user="a b\\nc" client=192.0.2.7:1 backend=b1 result=ok')


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_unicode_line_breaks_cannot_start_a_line(fmt):
    """U+0085 (NEL), U+2028, U+2029 end a line for str.splitlines() and many log tools: a login name or
    mailbox holding one forged a whole line (hostile probe 4); escaped, and JSON still reads them back."""
    w, out, log = writer(fmt)
    fake = "2026-12-05t10:00:00.000z [referral_proxy.events#info] login session=99 user=root result=ok"
    log.info("moved {box} for {user}", box="A\u2028" + fake, user="eve\u0085" + fake)
    events = Logger(namespace="referral_proxy.events", observer=w)
    events.emit(LogLevel.info, "login", rp_event="login",
                rp_fields={"session": 1, "user": "x\u2029" + fake + "\x9b", "client": "192.0.2.7:1", "result": "ok"})
    text = out.getvalue()
    assert len(text.splitlines()) == 2, text
    assert not [c for c in text if 0x80 <= ord(c) < 0xA0 or c in "\u2028\u2029"], text
    if fmt == "json":
        first, second = (json.loads(line) for line in text.splitlines())
        assert first["message"] == "moved A\u2028" + fake + " for eve\u0085" + fake
        assert second["user"] == "x\u2029" + fake + "\x9b"


def test_a_name_holding_key_value_pairs_is_quoted_in_a_text_line():
    """A mailbox named ``Par/k user=root ... result=ok`` in a message's text (hierarchy.py's refusal, with no
    context pairs of its own) read as the line's fields by a key=value parser (hostile probe 4)."""
    w, out, log = writer("text")
    name = "Par/k user=root client=x backend=b9 result=ok"
    log.info("RENAME of {user}'s {old} refused: e.g. {name} on {b}", user="carol", old="Par", name=name, b="b3")
    line = out.getvalue().rstrip("\n")
    assert line.endswith('RENAME of carol\'s Par refused: e.g. "%s" on b3' % name), line
    assert not [t for t in shlex.split(line.replace("'", "")) if t.startswith(("user=", "result="))], line
    w, out, log = writer("json")
    log.info("RENAME of {user}'s {old} refused: e.g. {name} on {b}", user="carol", old="Par", name=name, b="b3")
    assert json.loads(out.getvalue())["message"].endswith("e.g. %s on b3" % name)


def test_undecodable_text_is_written_not_lost():
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8")  # as stderr: a lone surrogate cannot be encoded
    w = LogWriter(LogConfig(format="json"), stream)
    Logger(namespace="referral_proxy.session", observer=w).info(
        "moved {old}", old=b"\xff\xfe".decode("utf-8", "surrogateescape"))
    line = raw.getvalue().decode("utf-8")
    assert json.loads(line)["message"] == "moved \udcff\udcfe"  # the same text, escaped in JSON


def test_level_filters_and_failures_keep_their_traceback():
    w, out, log = writer("json", "warn")
    log.info("not shown")
    log.debug("not shown either")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.failure("session {id}: command failed", Failure(), id=5)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == 1
    assert lines[0]["level"] == "critical" and lines[0]["error"] == "boom" and "RuntimeError" in lines[0]["traceback"]


def test_log_and_metrics_settings():
    config = parse_config(BASE | {"log": {"format": "json", "level": "WARNING"},
                                  "metrics": {"listen": "tcp:9143:interface=127.0.0.1", "health_interval": 2}},
                          base=Path("."))
    assert config.log.format == "json" and config.log.level == "warn"
    assert config.metrics.listen == "tcp:9143:interface=127.0.0.1" and config.metrics.health_interval == 2.0
    plain = parse_config(BASE, base=Path("."))
    assert plain.metrics.listen is None and plain.log.format == "text" and plain.proxy.proxy_ttl == 5


@pytest.mark.parametrize("extra, message", [
    ({"log": {"format": "xml"}}, "log.format: must be one of text, json"),
    ({"log": {"level": "loud"}}, "log.level: must be one of"),
    ({"log": {"colour": True}}, "log.colour: unknown key"),
    ({"metrics": {"listen": ""}}, "metrics.listen: must be an endpoint string"),
    ({"metrics": {"health_interval": 0}}, "metrics.health_interval: must be positive"),
    ({"proxy": {"listen": ["tcp:1"], "trusted_networks": ["10.0.0.0/33"]}}, "proxy.trusted_networks[0]: not a network"),
    ({"proxy": {"listen": ["tcp:1"], "trusted_networks": [10]}}, "proxy.trusted_networks[0]: not a network"),
    ({"proxy": {"listen": ["tcp:1"], "proxy_ttl": 0}}, "proxy.proxy_ttl: must be positive"),
])
def test_bad_settings_are_one_clear_error(extra, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(BASE | extra, base=Path("."))


def test_bad_metrics_endpoint_is_refused_at_load(tmp_path):
    from twisted.internet import reactor

    from referral_proxy.service import check_endpoints

    path = tmp_path / "p.toml"
    path.write_text('[proxy]\nlisten = ["tcp:1143"]\n[backends.b1]\nendpoint = "tcp:host=h:port=1"\n'
                    'url = "imap://h"\n[map]\ndefault = "b1"\n[metrics]\nlisten = "tcp:nope"\n')
    with pytest.raises(ConfigError, match="metrics.listen: bad endpoint 'tcp:nope'"):
        load_config(path, check_endpoints=lambda c: check_endpoints(c, reactor))


def test_twistd_writes_the_configured_json_log(tmp_path):
    """Under ``twistd -n`` too, [log] format applies: every line on stdout is one JSON event."""
    import signal
    import socket
    import subprocess
    import sys
    import time

    from referral_proxy.fleet import free_port

    port = free_port()
    path = tmp_path / "p.toml"
    path.write_text(f'[proxy]\nlisten = ["tcp:{port}:interface=127.0.0.1"]\n[backends.b1]\n'
                    'endpoint = "tcp:host=127.0.0.2:port=1"\nurl = "imap://127.0.0.2:1"\n[map]\ndefault = "b1"\n'
                    '[log]\nformat = "json"\n')
    env = dict(__import__("os").environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    twistd = subprocess.Popen(
        [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "--pidfile=", "-n", "referral-proxy", "--config", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    assert s.recv(100).startswith(b"* OK")
                    s.sendall(b"a LOGOUT\r\n")
                    while s.recv(100):
                        pass
                break
            except ConnectionRefusedError:
                assert twistd.poll() is None and time.monotonic() < deadline
                time.sleep(0.05)
        time.sleep(0.3)
    finally:
        twistd.send_signal(signal.SIGTERM)
        out, err = twistd.communicate(timeout=30)
    events = [json.loads(line) for line in out.decode().splitlines()]
    assert any(e["event"] == "session_start" and e["client"].startswith("127.0.0.1:") for e in events), events
    assert any(e["event"] == "session_end" and e["outcome"] == "logout" for e in events), events
    assert not err.strip(), err


def test_fixed_texts_and_plain_values_are_escaped_and_quoted_as_before_their_shortcuts():
    """A message with no field to format skips the escaping only when it is printable ASCII, and a
    value skips the plain-text regex only when it is ASCII letters and digits (logs.py's shortcuts)."""
    from referral_proxy.logs import _text, text_value

    w, out, _log = writer("text")
    events = Logger(namespace="referral_proxy.events", observer=w)
    for message in ("session start", "caf\u00e9 \x1b[2J\x7f end", "tab\there"):
        events.emit(LogLevel.info, message, rp_event="x", rp_fields={"session": 1})
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] session start session=1")
    assert "] caf\u00e9 \\x1b[2J\\x7f end session=1" in lines[1] and "tab\\x09here" in lines[2]
    for value in ("alice", "b1", "ok", "127.0.0.1:40000", "", "jos\u00e9", "\u216b", "\u0661\u0662", "a b", "x\ny", 'q"'):
        assert _text(value) == text_value(value), value
    assert _text("jos\u00e9") == '"jos\u00e9"' and _text("\u0661\u0662") == '"\u0661\u0662"'
