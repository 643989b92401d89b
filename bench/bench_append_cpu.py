#!/usr/bin/env python3
"""Instructions a real proxy process spends per appended message, exactly (callgrind).

One Dovecot, one proxy run under valgrind's callgrind (user space of the whole process:
the reactor, Twisted, the proxy; not the kernel), bench_append's client: after 20
messages to warm up (the target known to take messages), the counters are zeroed, N/5
messages appended and counted, then the same with N; instructions per message =
the difference / (N - N/5), so that the warm-up and the login cancel out. Unlike CPU time
on a shared machine, this does not depend on the load (it moves by well under 1 %).
``--tree`` measures another checkout, e.g. main before a change:

    python bench/bench_append_cpu.py --tests c,e,a
    python bench/bench_append_cpu.py --tree /tmp/before --tests c

Tests as in bench_ab.py: ``c`` APPENDs one by one with sync literals, ``d`` the same in
two writes (c-client), ``e`` one MULTIAPPEND with sync literals, ``a`` with LITERAL+;
and ``n``: N NOOPs one after the other (per NOOP: the fast path, the reactor's loop
passes, the end-of-pass writes; ``--messages`` NOOPs).
About a minute per test (valgrind slows the proxy ~50 times).
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    PROXY_HOST,
    USER,
    Dovecot,
    ProxyProcess,
    _ProxyProcess,
    install_signal_handlers,
    make_message,
    make_root,
)
from bench_append import AppendClient, Control, check_replies, one_run  # noqa: E402
from bench_relay import RawIMAP  # noqa: E402


class Client(RawIMAP, AppendClient):
    """bench_append's APPENDs and bench_relay's NOOP round trip."""


def noops(c: Client, count: int) -> tuple[int, list[bytes], int]:
    for _ in range(count):
        c.noop_rtt_ns()
    return 0, [], 0


def _counted(pid: int, out: Path, label: str) -> int:
    """Dump callgrind's counters (since the last zeroing) and read their total."""
    subprocess.run(["callgrind_control", "-d", label, str(pid)], capture_output=True, check=True)
    time.sleep(0.3)
    dump = max(glob.glob(f"{out}*"), key=os.path.getmtime)
    m = re.search(r"^(?:summary|totals): (\d+)", Path(dump).read_text(), re.M)
    if m is None:
        raise SystemExit(f"no total in {dump}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", default=str(Path(__file__).resolve().parent.parent), help="checkout to measure")
    ap.add_argument("--tests", default="c", help="comma-separated subset of c,d,e,a")
    ap.add_argument("--messages", type=int, default=200, help="N (200)")
    ap.add_argument("--size", type=int, default=20480, help="bytes per message (20480)")
    args = ap.parse_args()
    install_signal_handlers()
    root = make_root("rp-appcpu-")
    d = Dovecot("appcpu", "127.0.0.2", root / "b1")
    out = root / "callgrind.out"
    p: ProxyProcess | None = None
    try:
        d.start()
        (root / "p").mkdir()
        p = ProxyProcess(root / "p", d)
        _ProxyProcess.start(p, timeout=300, new_group=True, tied_to_parent=True,
                            env={"PYTHONPATH": str(Path(args.tree).resolve())},
                            command=["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                                     os.path.realpath(sys.executable), "-m", "referral_proxy"])
        assert p.process is not None
        rng = random.Random(20240101)
        n = args.messages
        msgs = [make_message(i, args.size, rng) for i in range(1, n + 1)]
        crlf = [m + b"\r\n" for m in msgs]
        control = Control(d.host, d.port, "control")
        control.login(USER, d.password(USER))
        for test in args.tests.split(","):
            counts = []
            for k, count in enumerate((n // 5, n)):
                control.reset()
                c = Client(PROXY_HOST, p.port, "proxy")
                c.login(USER, d.password(USER))
                if test == "n":
                    noops(c, 20)
                    subprocess.run(["callgrind_control", "-z", str(p.process.pid)], capture_output=True, check=True)
                    noops(c, count)
                    counts.append(_counted(p.process.pid, out, f"{test}{k}"))
                    c.close()
                    continue
                one_run(test, c, msgs[:20], crlf[:20])
                control.reset()
                subprocess.run(["callgrind_control", "-z", str(p.process.pid)], capture_output=True, check=True)
                _ns, replies, _sent = one_run(test, c, msgs[:count], crlf[:count])
                counts.append(_counted(p.process.pid, out, f"{test}{k}"))
                check_replies("proxy", test, replies, count)
                assert control.count() == count
                c.close()
            per = (counts[1] - counts[0]) / (n - n // 5)
            what = "NOOP" if test == "n" else "message"
            print(f"{test}: {per / 1000:.1f}k instructions per {what} ({args.tree})", flush=True)
    finally:
        if p is not None:
            p.stop()
        d.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
