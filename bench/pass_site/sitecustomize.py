"""Loaded by any Python started with this directory on PYTHONPATH (bench_append_passes.py does, for
the proxy): ``PASS_STATS=FILE`` times every loop pass of the proxy's FastLoop (netio.py) by CPU
(``time.thread_time_ns``), from the return of its ``epoll_wait`` to its end: its events and its
end-of-pass writes, apart, by what the pass read (a client's line, a client's literal bytes, a
backend's line), and writes the sums to FILE (JSON) on SIGUSR2, starting them again. Nothing in
the proxy is changed: the loop's pass, poller and flush are wrapped (FastLoop reads a socket
itself since branch ``floor``: wrapping its dispatch alone saw no read). ``RP_TREE=DIR`` imports
the referral_proxy package of DIR."""

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
    _now: dict[str, object] = {"read": 0, "side": "", "polled": 0, "flushed": 0}

    _received = tcp.Connection._dataReceived

    def _data_received(self, data):  # type: ignore[no-untyped-def]
        _now["read"] = len(data)
        _now["side"] = "client" if isinstance(self, tcp.Server) else "backend" if isinstance(self, tcp.Client) else ""
        return _received(self, data)

    tcp.Connection._dataReceived = _data_received

    class _TimedPoller:
        """The loop's poller, noting when the wait ended: the pass's own CPU starts there."""

        def __init__(self, poller):  # type: ignore[no-untyped-def]
            self._poller = poller

        def poll(self, *args):  # type: ignore[no-untyped-def]
            try:
                return self._poller.poll(*args)
            finally:
                _now["read"] = 0
                _now["side"] = ""
                _now["polled"] = _cpu()
                _now["flushed"] = 0

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self._poller, name)

    _init = netio.FastLoop.__init__

    def _loop_init(self, reactor):  # type: ignore[no-untyped-def]
        _init(self, reactor)
        self._poller = _TimedPoller(self._poller)

    # FastLoop.iterate reads a connection's data itself (no dispatch call for a read event
    # alone): the pass is timed from the poll's return to its end, its flush apart.
    _iterate = netio.FastLoop.iterate

    def _timed_iterate(self, timeout):  # type: ignore[no-untyped-def]
        _now["polled"] = 0
        try:
            return _iterate(self, timeout)
        finally:
            c0 = _now["polled"]
            if c0:
                n = _now["read"]
                kind = f"{_now['side'] or 'other'} {'literal' if n >= 1024 else 'line' if n else 'no read'}"
                row = _stats.setdefault(kind, [0, 0, 0])
                row[0] += 1
                row[1] += _cpu() - c0 - _now["flushed"]
                row[2] += _now["flushed"]

    _flush = netio.FastLoop.flush

    def _timed_flush(self):  # type: ignore[no-untyped-def]
        c0 = _cpu()
        try:
            return _flush(self)
        finally:
            spent = _cpu() - c0
            if _now.get("polled"):
                _now["flushed"] += spent
            else:
                _stats.setdefault("timed calls", [0, 0, 0])[2] += spent

    netio.FastLoop.__init__ = _loop_init
    netio.FastLoop.iterate = _timed_iterate
    netio.FastLoop.flush = _timed_flush

    def _write(*_args: object) -> None:
        rows = dict(_stats)
        _stats.clear()
        with open(_path + ".tmp", "w") as f:
            json.dump(rows, f)
        os.replace(_path + ".tmp", _path)

    signal.signal(signal.SIGUSR2, _write)
