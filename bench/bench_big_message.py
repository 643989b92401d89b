#!/usr/bin/env python3
"""Big messages across backends: the proxy's peak RSS while it copies/moves them.

Two real Dovecots (b1 default, ``Archive/*`` on b2) and the proxy; one message of --mb
MB (or --count messages of --mb MB in all) is appended directly to alice's INBOX on b1, then through the proxy ``UID COPY`` and
``UID MOVE`` of 1:* to ``Archive/Big`` (on b2). psutil samples the proxy's RSS every
10 ms; the census checks b2 holds 2 x count messages and b1's INBOX none. The proxy's
memory should stay flat (streamed), not grow by the message's size. See bench/README.md.
``--nul``: each line holds a NUL (APPENDed as a literal8: copied by BINARY.PEEK[], copystream.py);
``--dash``: an em dash (its 0x80 makes BODY[] suspect; BINARY.PEEK[] is read once and finds no NUL).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import Harness, RawIMAP, log, quote  # noqa: E402

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER  # noqa: E402


def sizes(c: RawIMAP, box: str) -> list[int]:
    c.command(b"EXAMINE " + quote(box))
    _, got = c.command(b"FETCH 1:* (RFC822.SIZE)", check=False)
    c.command(b"UNSELECT")
    return [int(ln.split(b"RFC822.SIZE ")[1].split(b")")[0]) for ln in got if b"RFC822.SIZE" in ln]


def main() -> int:
    mb = int(sys.argv[sys.argv.index("--mb") + 1]) if "--mb" in sys.argv else 100
    count = int(sys.argv[sys.argv.index("--count") + 1]) if "--count" in sys.argv else 1  # --mb / count each
    proxy_kw = {"backend_extra": f'master_user = "{MASTER_USER}"\nmaster_password = "{MASTER_PASSWORD}"\n',
                "map_extra": 'store = "sqlite:map.sqlite3"\n\n[[map.rules]]\nmailbox = "Archive/*"\nbackend = "b2"\n'}
    with Harness(backends=(("b1", "127.0.0.2"), ("b2", "127.0.0.3")), proxy_kw=proxy_kw) as h:
        h.start()
        assert h.proxy is not None and h.proxy.pid is not None
        ps = psutil.Process(h.proxy.pid)
        c1 = h.connect("b1", "b1")
        lead = b"\x00" if "--nul" in sys.argv else "\u2014".encode() if "--dash" in sys.argv else b""
        line = lead + b"x" * (998 - len(lead)) + b"\r\n"
        literal = b" ~{%d+}\r\n" if "--nul" in sys.argv else b" {%d+}\r\n"
        tag = c1.next_tag()
        c1.sock.sendall(tag + b" APPEND INBOX")
        for i in range(count):
            body = b"From: a@example.org\r\nSubject: big %d\r\n\r\n" % i + line * max(1, mb * 1000 // count)
            c1.sock.sendall(literal % len(body) + body)
        c1.sock.sendall(b"\r\n")
        c1.read_tagged(tag)
        c2 = h.connect("b2", "b2")
        c2.command(b"CREATE Archive/Big")
        p = h.connect("proxy", "proxy")
        p.command(b"SELECT INBOX")
        out: dict[str, dict] = {}
        for cmd in (b"UID COPY 1:* Archive/Big", b"UID MOVE 1:* Archive/Big"):
            base = ps.memory_info().rss
            peak = [base]
            done = threading.Event()

            def sample(peak: list[int] = peak, done: threading.Event = done) -> None:
                while not done.is_set():
                    peak[0] = max(peak[0], ps.memory_info().rss)
                    time.sleep(0.01)

            t = threading.Thread(target=sample, daemon=True)
            t.start()
            t0 = time.monotonic()
            answer, _ = p.command(cmd, check=False)
            secs = time.monotonic() - t0
            done.set()
            t.join()
            name = cmd.split()[1].decode()
            out[name] = {"seconds": round(secs, 2), "rss_before_mb": round(base / 2**20, 1),
                         "rss_peak_growth_mb": round((peak[0] - base) / 2**20, 1), "answer": answer[:60].decode()}
            log(f"{cmd.decode()}: {out[name]}")
        out["census_b2_sizes"] = {"n": len(sizes(c2, "Archive/Big"))}
        out["census_b1_inbox"] = {"n": len(sizes(c1, "INBOX"))}
        fill = "nul" if "--nul" in sys.argv else "dash" if "--dash" in sys.argv else "x"
        print(json.dumps({"mb": mb, "count": count, "fill": fill, **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
