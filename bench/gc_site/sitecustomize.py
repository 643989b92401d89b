"""Loaded by any Python started with this directory on PYTHONPATH (bench_gc.py does, for the proxy):
``GC_STATS=DIR`` times every garbage collection (``gc.callbacks``) and rewrites
``DIR/gc.<pid>.json`` at most once a second and on SIGUSR2 (per generation: collections, their
wall and CPU seconds, the longest pause, the objects collected; the process's CPU times; with
``GC_GARBAGE=1`` the types of what was collected, which is then kept: not for timing); ``GC_THRESHOLD=a,b,c`` replaces every
``gc.set_threshold`` the process makes (the proxy's own tune_gc included); ``RP_TREE=DIR`` imports
the referral_proxy package of the checkout DIR (a build before a change)."""

import gc
import json
import os
import signal
import sys
import time

if os.environ.get("RP_TREE"):  # another checkout's referral_proxy, before the one PYTHONPATH names
    sys.path.insert(0, os.environ["RP_TREE"])

_threshold = os.environ.get("GC_THRESHOLD")
if _threshold:
    _wanted = tuple(int(x) for x in _threshold.split(","))
    _set = gc.set_threshold
    gc.set_threshold = lambda *_args: _set(*_wanted)
    _set(*_wanted)

_dir = os.environ.get("GC_STATS")
if _dir:
    _stats: dict = {"collections": [0, 0, 0], "seconds": [0.0, 0.0, 0.0], "longest": [0.0, 0.0, 0.0],
                    "cpu_seconds": [0.0, 0.0, 0.0], "collected": [0, 0, 0]}
    _clock = {"start": 0.0, "cpu": 0.0, "written": 0.0}

    if os.environ.get("GC_GARBAGE"):  # what the collector frees, by type (kept, so slower: not for timing)
        gc.set_debug(gc.DEBUG_SAVEALL)

    def _write(*_args: object) -> None:
        if gc.garbage:
            from collections import Counter
            counts = Counter(_stats.get("garbage", {}))
            counts.update(type(o).__qualname__ for o in gc.garbage)
            _stats["garbage"] = dict(counts.most_common(60))
            gc.garbage.clear()
        _stats["cpu"] = list(os.times()[:2])
        _stats["threshold"] = list(gc.get_threshold())
        _stats["frozen"] = gc.get_freeze_count()
        path = os.path.join(_dir, f"gc.{os.getpid()}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(_stats, f)
        os.replace(path + ".tmp", path)

    def _timed(phase: str, info: dict) -> None:
        now, cpu = time.perf_counter(), time.thread_time()
        if phase == "start":
            _clock["start"], _clock["cpu"] = now, cpu
            return
        g, took = info["generation"], now - _clock["start"]
        _stats["collections"][g] += 1
        _stats["cpu_seconds"][g] += cpu - _clock["cpu"]
        _stats["collected"][g] += info["collected"]
        _stats["seconds"][g] += took
        _stats["longest"][g] = max(_stats["longest"][g], took)
        if now - _clock["written"] > 1.0:
            _clock["written"] = now
            _write()

    gc.callbacks.append(_timed)
    signal.signal(signal.SIGUSR2, _write)
