"""Loaded by any Python started with this directory on PYTHONPATH (bench_append_passes.py does, for
the proxy): ``PASS_STATS=FILE`` times every loop pass of the proxy's FastLoop (netio.py) by CPU
(``time.thread_time_ns``): its event dispatch and its end-of-pass writes, apart, by what the pass
read (a client's line, a client's literal bytes, a backend's line), and writes the sums to FILE
(JSON) on SIGUSR2, starting them again. Nothing in the proxy is changed: the loop's own
dispatch and flush are wrapped. ``RP_TREE=DIR`` imports the referral_proxy package of DIR."""

import json
import os
import signal
import sys
import time

if os.environ.get("RP_TREE"):  # another checkout's referral_proxy, before the one PYTHONPATH names
    sys.path.insert(0, os.environ["RP_TREE"])

_path = os.environ.get("PASS_STATS")
if _path:
    from twisted.internet import tcp

    from referral_proxy import netio

    _cpu = time.thread_time_ns
    _stats: dict[str, list[int]] = {}  # kind -> [passes, dispatch ns, flush ns]
    _now = {"kind": "", "read": 0}

    _received = tcp.Connection._dataReceived

    def _data_received(self, data):  # type: ignore[no-untyped-def]
        _now["read"] = len(data)
        return _received(self, data)

    tcp.Connection._dataReceived = _data_received

    _init = netio.FastLoop.__init__

    def _loop_init(self, reactor):  # type: ignore[no-untyped-def]
        _init(self, reactor)
        dispatch = self._dispatch

        def timed(selectable, fd, event):  # type: ignore[no-untyped-def]
            _now["read"] = 0
            c0 = _cpu()
            try:
                return dispatch(selectable, fd, event)
            finally:
                side = "client" if isinstance(selectable, tcp.Server) else "backend" if isinstance(
                    selectable, tcp.Client) else "other"
                n = _now["read"]
                kind = f"{side} {'literal' if n >= 1024 else 'line' if n else 'no read'}"
                row = _stats.setdefault(kind, [0, 0, 0])
                row[0] += 1
                row[1] += _cpu() - c0
                _now["kind"] = kind

        self._dispatch = timed

    _flush = netio.FastLoop.flush

    def _timed_flush(self):  # type: ignore[no-untyped-def]
        c0 = _cpu()
        try:
            return _flush(self)
        finally:
            kind, _now["kind"] = _now["kind"], ""
            _stats.setdefault(kind or "timed calls", [0, 0, 0])[2] += _cpu() - c0

    netio.FastLoop.__init__ = _loop_init
    netio.FastLoop.flush = _timed_flush

    def _write(*_args: object) -> None:
        rows = dict(_stats)
        _stats.clear()
        with open(_path + ".tmp", "w") as f:
            json.dump(rows, f)
        os.replace(_path + ".tmp", _path)

    signal.signal(signal.SIGUSR2, _write)
