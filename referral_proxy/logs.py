"""The proxy's log: every Twisted log event, as one readable line or one JSON object.

``[log] format = "text" | "json"`` and ``level``. The Observer's own events (session
start and end, login, referral, transfer) carry their fields in ``rp_fields``; any other
event of a session that names it by ``id`` gets that session's user, client address
and backend added, and an event at warn or above is an ``error`` event. Values are
made safe on the way out: mailbox names (bytes) are decoded from modified UTF-7 to
UTF-8 (never a Python ``b'...'`` repr), and control characters are escaped, so a
client cannot write lines of its own into the log.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from typing import IO, Any

from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

from .config import LogConfig
from .imap import mutf7

__all__ = ["LogWriter", "text_value"]

_LEVELS = {"debug": 0, "info": 1, "warn": 2, "error": 3, "critical": 4}
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}
# C1 controls and Unicode's own line breaks: str.splitlines() and many log tools end a line at U+0085,
# U+2028, U+2029; written as JSON's \\uXXXX (valid inside the JSON line's strings, plain text in a text line)
_UNICODE_BREAKS = {c: f"\\u{c:04x}" for c in (*range(0x80, 0xA0), 0x2028, 0x2029)}
_CONTEXT_KEYS = ("session", "user", "client", "backend")
_SIMPLE = re.compile(r"[a-zA-Z0-9.:\-_/\[\]@+,*%&]+")
_SPACE = re.compile(r"\s")


def _name(data: bytes) -> str:
    """A mailbox name (or other protocol bytes) as text: modified UTF-7 decoded if it is
    that, else UTF-8 (8-bit names of UTF8=ACCEPT clients), else escaped."""
    try:
        return mutf7.decode(data)
    except ValueError:
        return data.decode("utf-8", "backslashreplace")


def _plain(value: Any) -> Any:
    """A JSON-ready value: bytes decoded, containers walked, anything else as str()."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return _name(bytes(value))
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def text_value(value: Any) -> str:
    """One value of a text line: as is when plain, JSON-quoted otherwise (spaces, quotes,
    control characters, empty)."""
    if type(value) is int:
        return str(value)
    value = _plain(value)
    if isinstance(value, list):
        value = ",".join(text_value(v) for v in value)
        return value
    text = "" if value is None else str(value)
    if _SIMPLE.fullmatch(text) is not None:
        return text
    return json.dumps(text, ensure_ascii=False)


def _safe_event(event: dict[str, Any], quote_fields: bool = False) -> dict[str, Any]:
    """A copy whose bytes are decoded names and whose strings have no control characters,
    for formatting the message; *quote_fields* (text lines): a value holding a space and "=" (a
    mailbox named ``x user=root result=ok``) JSON-quoted, never read as the line's own key=value pairs."""
    out = dict(event)
    for key, value in event.items():
        if key.startswith("log_") or key in ("rp_fields", "rp_event", "format"):
            continue
        if isinstance(value, (bytes, bytearray)):
            value = _name(bytes(value))
        if isinstance(value, str):
            value = value.translate(_CONTROL)
            if quote_fields and "=" in value and _SPACE.search(value) is not None:
                value = json.dumps(value, ensure_ascii=False)
            out[key] = value
    return out


@implementer(ILogObserver)
class LogWriter:
    """An ILogObserver writing events at or above ``level`` to *stream*, one a line."""

    def __init__(self, config: LogConfig, stream: IO[str], *, context: Callable[[int], dict | None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.json = config.format == "json"
        self.level = _LEVELS[config.level]
        self.stream = stream
        self.context = context  # session id -> its fields (set by the service once it exists)
        self.clock = clock

    def __call__(self, event: dict[str, Any]) -> None:
        level = event.get("log_level", LogLevel.info)
        if _LEVELS.get(level.name, 1) < self.level:
            return
        try:
            # lone surrogates (names decoded with surrogateescape) written as \udcXX, not lost
            line = self._line(event, level)
            if not line.isascii():
                line = line.translate(_UNICODE_BREAKS).encode("utf-8", "backslashreplace").decode("utf-8")
        except Exception as e:  # a log line must never take the proxy down
            line = json.dumps({"level": "error", "message": f"unformattable log event: {type(e).__name__}"})
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def _fields(self, event: dict[str, Any], level: LogLevel) -> tuple[str, dict[str, Any]]:
        """(event name, its fields) of any event."""
        fields = event.get("rp_fields")
        if fields is not None:  # only read: not copied
            return event.get("rp_event", "log"), fields
        name = "error" if level.name in ("warn", "error", "critical") else "log"
        found: dict[str, Any] = {}
        session = event.get("id")
        if self.context is not None and isinstance(session, int) and event.get("log_namespace", "").startswith(
                "referral_proxy"):
            found = self.context(session) or {}
        return name, found

    def _line(self, event: dict[str, Any], level: LogLevel) -> str:
        name, fields = self._fields(event, level)
        fmt = event.get("log_format")
        if type(fmt) is str and "{" not in fmt and "}" not in fmt:  # a fixed text: nothing to format
            # translate() looks each distinct character up (a KeyError each): printable ASCII has nothing to escape
            message = fmt if fmt.isascii() and fmt.isprintable() else fmt.translate(_CONTROL)
        else:
            message = formatEvent(_safe_event(event, not self.json)).translate(_CONTROL)
        failure = event.get("log_failure")
        when = event.get("log_time") or self.clock()
        if self.json:
            record: dict[str, Any] = {
                "time": _iso(when),
                "level": level.name,
                "event": name,
                "namespace": event.get("log_namespace", ""),
                "message": message,
            }
            for key, value in fields.items():
                record.setdefault(key, _plain(value))
            if failure is not None:
                record["error"] = failure.getErrorMessage()
                record["traceback"] = failure.getTraceback()
            return json.dumps(record, ensure_ascii=False)
        pairs = _pairs(fields)
        line = f"{_iso(when)} [{event.get('log_namespace', '-')}#{level.name}] {message}"
        if pairs:
            line += f" [{pairs}]" if name in ("log", "error") and "rp_fields" not in event else f" {pairs}"
        if failure is not None:
            line += "\n" + failure.getTraceback().rstrip("\n")
        return line


def _text(value: Any) -> str:
    """text_value, with the common plain values first (a float's str() is always plain)."""
    kind = type(value)
    if kind is int or kind is float:
        return str(value)
    if kind is str and ((value.isascii() and value.isalnum()) or _SIMPLE.fullmatch(value) is not None):
        return value  # type: ignore[no-any-return]  # (ASCII letters and digits: plain, without the regex)
    return text_value(value)


def _pairs(fields: dict[str, Any]) -> str:
    """The ``key=value`` pairs of a text line, the context keys first, None left out
    (three lines a session: one loop, no intermediate lists of pairs)."""
    parts = []
    get = fields.get
    for key in _CONTEXT_KEYS:
        value = get(key)
        if value is not None:
            parts.append(f"{key}={_text(value)}")
    for key, value in fields.items():
        if value is not None and key not in _CONTEXT_KEYS:
            parts.append(f"{key}={_text(value)}")
    return " ".join(parts)


_SECOND: list[Any] = [None, ""]  # the last second formatted, and its text


def _iso(when: float) -> str:
    second = int(when)
    if _SECOND[0] != second:
        _SECOND[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_SECOND[1]}.{int(when * 1000) % 1000:03d}Z"
