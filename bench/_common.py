"""What the benchmarks in bench/ share: a raw-socket IMAP client, test messages, the
proxy as a subprocess, and one run's life cycle (Dovecot + proxy up, everything
down again on success, error or signal).  Not a benchmark itself; see README.md.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from referral_proxy.fleet import (  # noqa: E402
    Dovecot,
    dovecot_available,
    free_port,
    make_root,
)
from referral_proxy.imap.framing import announced_literal  # noqa: E402
from referral_proxy.testing.proxyproc import ProxyProcess as _ProxyProcess  # noqa: E402
from referral_proxy.testing.proxyproc import die_with_parent as _pdeathsig  # noqa: E402, F401 (peers.py)
from referral_proxy.testing.proxyproc import wait_greeting  # noqa: E402

__all__ = [
    "REPO_ROOT", "BACKEND_HOST", "PROXY_HOST", "USER", "PROXY_START_TIMEOUT", "IO_TIMEOUT",
    "announced_literal", "log", "ProtocolError", "RawIMAP", "quote", "make_message", "ProxyProcess",
    "percentile", "render_table", "wait_greeting", "environment", "suspicious_lines", "apply_pin",
    "install_signal_handlers", "Harness", "run_cli", "Dovecot", "dovecot_available",
]

BACKEND_HOST = "127.0.0.2"
PROXY_HOST = "127.0.0.1"
USER = "alice"
PROXY_START_TIMEOUT = 20.0
IO_TIMEOUT = 60.0



def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- raw client


class ProtocolError(RuntimeError):
    pass


class RawIMAP:
    """A minimal blocking IMAP client on a raw socket: just enough for a benchmark.
    The benchmarks subclass it with their measured operations."""

    def __init__(self, host: str, port: int, label: str) -> None:
        self.label = label
        self.sock = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        # Both sides of the comparison use the same client settings; the client
        # only ever sends one small write per command, so this mostly documents intent.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.recv_buf = bytearray(1 << 20)
        self.recv_view = memoryview(self.recv_buf)
        self.n = 0
        greeting = self._line()
        if not greeting.startswith(b"* OK"):
            raise ProtocolError(f"{label}: unexpected greeting {greeting!r}")

    def close(self) -> None:
        try:
            self.sock.sendall(b"zz LOGOUT\r\n")
        except OSError:
            pass
        self.sock.close()

    def _fill(self) -> None:
        k = self.sock.recv_into(self.recv_buf)
        if not k:
            raise ProtocolError(f"{self.label}: connection closed by the server")
        self.buf += self.recv_view[:k]

    def _line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[: i + 1])
                del self.buf[: i + 1]
                return line
            self._fill()

    def next_tag(self) -> bytes:
        self.n += 1
        return b"t%d" % self.n

    def command(self, text: bytes, *, check: bool = True) -> tuple[bytes, list[bytes]]:
        """Send a command without literals; (tagged line, untagged lines). Literals in
        the answer are skipped.  Raises unless the answer is OK (with *check*)."""
        tag = self.next_tag()
        self.sock.sendall(tag + b" " + text + b"\r\n")
        line, untagged = self.read_tagged(tag)
        if check and not line.startswith(tag + b" OK"):
            raise ProtocolError(f"{self.label}: {text[:40]!r} failed: {line!r}")
        return line, untagged

    def read_tagged(self, tag: bytes) -> tuple[bytes, list[bytes]]:
        """Read to the tagged reply of *tag* (literals in untagged responses skipped)."""
        untagged: list[bytes] = []
        while True:
            line = self._line()
            spec = announced_literal(line)  # the codec's own reading of "{n}" / "{n+}" / "~{n}"
            if spec is not None:
                need = spec.size
                while len(self.buf) < need:
                    self._fill()
                del self.buf[:need]
            if line.startswith(tag + b" "):
                return line, untagged
            untagged.append(line)

    def login(self, user: str, password: str) -> None:
        self.command(b"LOGIN %s %s" % (quote(user), quote(password)))

    def fetch_all(self, command: bytes = b"UID FETCH 1:* BODY.PEEK[]") -> tuple[int, int, int, int]:
        """*command* (``UID FETCH 1:* BODY.PEEK[]``) on the selected mailbox:
        (ns, bytes on the wire, literal bytes, literals).

        Reads with recv_into a 1 MiB buffer; lines are only looked at for a literal
        announcement (whose bytes are then skipped uncopied) or the tag.
        """
        if self.buf:
            raise ProtocolError(f"{self.label}: unexpected pending data {bytes(self.buf[:80])!r}")
        tag = self.next_tag()
        prefix = tag + b" "
        sock = self.sock
        rbuf = self.recv_buf
        view = self.recv_view
        total = literal_bytes = literals = 0
        skip = 0
        partial = b""
        t0 = time.perf_counter_ns()
        sock.sendall(tag + b" " + command + b"\r\n")
        while True:
            n = sock.recv_into(rbuf)
            if not n:
                raise ProtocolError(f"{self.label}: connection closed during FETCH")
            total += n
            pos = 0
            while pos < n:
                if skip:
                    take = skip if skip < n - pos else n - pos
                    skip -= take
                    pos += take
                    continue
                i = rbuf.find(b"\n", pos, n)
                if i < 0:
                    partial += view[pos:n]
                    break
                line = partial + view[pos : i + 1] if partial else bytes(view[pos : i + 1])
                partial = b""
                pos = i + 1
                if line.endswith(b"}\r\n"):
                    spec = announced_literal(line)
                    if spec is not None:
                        skip = spec.size
                        literal_bytes += skip
                        literals += 1
                        continue
                if line.startswith(prefix):
                    t1 = time.perf_counter_ns()
                    if not line.startswith(prefix + b"OK"):
                        raise ProtocolError(f"{self.label}: {command[:40]!r} failed: {line!r}")
                    if pos != n:
                        raise ProtocolError(f"{self.label}: {n - pos} bytes after the tagged reply")
                    return t1 - t0, total, literal_bytes, literals

    def capabilities(self) -> set[str]:
        """What CAPABILITY answers (upper case)."""
        _, untagged = self.command(b"CAPABILITY")
        caps: set[str] = set()
        for line in untagged:
            if line.upper().startswith(b"* CAPABILITY "):
                caps.update(line[len(b"* CAPABILITY "):].decode("ascii", "replace").upper().split())
        return caps


def quote(s: str) -> bytes:
    return b'"' + s.encode().replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# ----------------------------------------------------------------------------- messages


def make_message(i: int, size: int, rng: random.Random) -> bytes:
    """A valid RFC 5322 message of exactly *size* bytes (if size allows): fixed
    headers and a 7bit text body of pseudo-random base64-alphabet lines."""
    headers = (
        f"Date: Mon, 01 Jan 2024 00:{i // 60 % 60:02d}:{i % 60:02d} +0000\r\n"
        f"From: Bench Sender <sender@bench.example>\r\n"
        f"To: Alice <alice@bench.example>\r\n"
        f"Subject: bench message {i}\r\n"
        f"Message-ID: <bench-{i}@bench.example>\r\n"
        f"MIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=us-ascii\r\n"
        f"Content-Transfer-Encoding: 7bit\r\n"
        f"\r\n"
    ).encode()
    body_len = max(0, size - len(headers))
    n_lines = body_len // 78 + 1
    text = base64.b64encode(rng.randbytes(n_lines * 57))  # 76 chars per 57 bytes
    lines = [text[k : k + 76] + b"\r\n" for k in range(0, len(text), 76)]
    body = b"".join(lines)[:body_len]
    if body_len >= 2:
        body = body[:-2] + b"\r\n"  # end on a line break
    return headers + body


# ----------------------------------------------------------------------------- proxy


class ProxyProcess(_ProxyProcess):
    """The proxy as a subprocess (the tests' runner, referral_proxy.testing.proxyproc),
    with a generated TOML configuration, in a process group of its own that dies with
    the benchmark.

    *backends*: one Dovecot (it becomes ``b1``) or a mapping name -> Dovecot.
    *proxy_extra*, *backend_extra*, *map_extra*: TOML lines appended to the
    ``[proxy]`` section, to every ``[backends.NAME]`` section and after the
    ``[map]`` section's ``default`` (``[[map.rules]]`` tables may follow there).
    """

    def __init__(self, workdir: Path, backends: Dovecot | Mapping[str, Dovecot], *,
                 proxy_extra: str = "", backend_extra: str = "", map_extra: str = "") -> None:
        port = free_port(PROXY_HOST)
        log_path = workdir / "proxy.stderr"
        super().__init__(workdir / "proxy.toml", host=PROXY_HOST, port=port, workdir=workdir,
                         stdout_path=log_path, stderr_path=log_path)
        named = {"b1": backends} if isinstance(backends, Dovecot) else dict(backends)
        text = (
            "[proxy]\n"
            f'listen = ["tcp:{self.port}:interface={PROXY_HOST}"]\n'
            'hostname = "bench-proxy"\n'
            "allow_plaintext_login = true\n"
            + proxy_extra
        )
        for name, backend in named.items():
            text += (
                "\n"
                f"[backends.{name}]\n"
                f'endpoint = "{backend.endpoint}"\n'
                f'url = "{backend.url}"\n'
                'tls = "none"\n'
                + backend_extra
            )
        text += "\n[map]\n" f'default = "{next(iter(named))}"\n' + map_extra
        self.config_path.write_text(text)

    def start(self) -> None:  # type: ignore[override]
        # its own group: stopped with its workers; it dies with the benchmark
        super().start(timeout=PROXY_START_TIMEOUT, new_group=True, tied_to_parent=True)

    @property
    def pid(self) -> int | None:  # type: ignore[override]
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def stop(self) -> int | None:  # type: ignore[override]
        status = super().stop()
        if self.process is not None:
            try:  # whatever it forked (workers) goes with it
                os.killpg(self.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return status


def signalled_json(path: Path, pid: int) -> dict:
    """The JSON a process rewrites at *path* when sent SIGUSR2 (a bench site's figures), once rewritten."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    os.kill(pid, signal.SIGUSR2)
    for _ in range(300):
        if path.exists() and path.stat().st_mtime_ns != before:
            break
        time.sleep(0.01)
    return json.loads(path.read_text())


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of process *pid* so far (from /proc; 1/CLK_TCK resolution)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rfind(b")") + 2:].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- statistics, report


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted list."""
    k = max(0, math.ceil(q / 100 * len(sorted_values)) - 1)
    return sorted_values[k]


def render_table(head: Sequence[str], body: Iterable[Sequence[str]], left: Iterable[int] = (0,)) -> list[str]:
    """Fixed-width text table: columns in *left* left-aligned, the others right-aligned,
    two spaces between columns, a dashed line under the head."""
    body = list(body)
    left = set(left)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i in left else c.rjust(w)  # noqa: E731
                              for i, (c, w) in enumerate(zip(r, widths)))
    return [fmt(head), "  ".join("-" * w for w in widths), *map(fmt, body)]


def environment() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dovecot": subprocess.run(["dovecot", "--version"], capture_output=True,
                                  text=True).stdout.strip(),
    }


def suspicious_lines(log_text: str) -> list[str]:
    """Lines of the proxy's log that deserve a look."""
    return [line for line in log_text.splitlines()
            if "Traceback" in line or "[-] Unhandled" in line or "CRITICAL" in line or "error" in line.lower()]


# ----------------------------------------------------------------------------- run life cycle


def apply_pin(ap: argparse.ArgumentParser, text: str | None) -> set[int] | None:
    """--pin: pin this process (and so everything it starts later) to these CPUs."""
    if not text:
        return None
    try:
        pin = {int(c) for c in text.split(",")}
        os.sched_setaffinity(0, pin)  # before anything is started: children inherit it
    except (ValueError, OSError) as e:
        ap.error(f"--pin {text!r}: {e}")
    return pin


def install_signal_handlers() -> None:
    """SIGTERM/SIGHUP: unwind through the cleanup like Ctrl-C does."""
    def _terminate(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)


class Harness:
    """Dovecot instances and the proxy (PROXY_HOST) in front of them, in a new
    temporary directory; a context manager that stops everything on the way out.

    *backends*: (name, host) of each Dovecot, by default one, ``b1`` on BACKEND_HOST;
    the first is the map's default and :attr:`dovecot`, all are in :attr:`dovecots`.
    *proxy_kw*: extra keyword arguments of :class:`ProxyProcess` (configuration text).

    On success (or Ctrl-C/SIGTERM) the directory is removed; after an error it is kept
    without its mail, with the logs, and the proxy log's tail is printed; *keep* keeps
    it whole.  Clients made by :meth:`connect` are closed too.
    """

    def __init__(self, keep: bool = False, backends: Sequence[tuple[str, str]] = (("b1", BACKEND_HOST),),
                 proxy_kw: dict | None = None) -> None:
        self.keep = keep
        self.t_start = time.monotonic()
        self.root = make_root("rp-bench-")
        self.backend_hosts = list(backends)
        self.proxy_kw = dict(proxy_kw or {})
        self.dovecots: dict[str, Dovecot] = {}
        self.dovecot: Dovecot | None = None
        self.proxy: ProxyProcess | None = None
        self.clients: list[RawIMAP] = []
        self.failed = True
        self.interrupted = False

    def start(self) -> None:
        single = len(self.backend_hosts) == 1
        for name, host in self.backend_hosts:
            d = Dovecot("bench" if single else f"bench-{name}", host, self.root / name)
            self.dovecots[name] = d
            if self.dovecot is None:
                self.dovecot = d
            log(f"starting Dovecot {name} on {host}:{d.port} (root {self.root})")
            d.start()
        proxy_dir = self.root / "proxy"
        proxy_dir.mkdir()
        self.proxy = ProxyProcess(proxy_dir, self.dovecots, **self.proxy_kw)
        log(f"starting the proxy on {PROXY_HOST}:{self.proxy.port}")
        self.proxy.start()

    def connect(self, target: str, label: str | None = None, cls: type[RawIMAP] = RawIMAP,
                login: bool = True) -> RawIMAP:
        """A new client of *target* ("direct" = the first Dovecot, a backend's name,
        or "proxy"), logged in as USER."""
        assert self.dovecot is not None and self.proxy is not None
        if target == "proxy":
            host, port = PROXY_HOST, self.proxy.port
        else:
            d = self.dovecot if target == "direct" else self.dovecots[target]
            host, port = d.host, d.port
        client = cls(host, port, label or target)
        self.clients.append(client)
        if login:
            client.login(USER, self.dovecot.password(USER))
        return client

    def close_clients(self) -> None:
        """Log every client out and forget it."""
        for c in self.clients:
            c.close()
        self.clients.clear()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.failed = False
        elif issubclass(exc_type, KeyboardInterrupt):
            self.interrupted = True
        self.stop()

    def stop(self) -> None:
        # Cleanup must not be cut short by a second signal (it takes ~1 s).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for c in self.clients:
            try:
                c.sock.close()
            except OSError:
                pass
        if self.proxy is not None:
            status = self.proxy.stop()
            if self.failed:
                tail = self.proxy.stderr_text()[-3000:]
                if tail:
                    log(f"proxy stderr (tail):\n{tail}")
            if status not in (0, None, -signal.SIGTERM):
                log(f"the proxy exited with status {status}")
        for name, d in self.dovecots.items():
            try:
                d.stop()
            except Exception as e:
                log(f"stopping Dovecot {name}: {e!r}")
        if self.keep:
            log(f"kept {self.root}")
        elif self.failed and not self.interrupted:
            # keep the logs and configuration for a post-mortem, not the mail
            for name in self.dovecots:
                shutil.rmtree(self.root / name / "mail", ignore_errors=True)
            logs = ", ".join(f"{name}/dovecot.log" for name in self.dovecots)
            log(f"kept {self.root} (logs: {logs}, proxy/proxy.stderr)")
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        log(f"total {time.monotonic() - self.t_start:.1f}s")


def run_cli(prog: str, main: Callable[[], int]) -> int:
    """Run *main* as a command: exit statuses and one-line messages for the usual failures."""
    try:
        return main()
    except KeyboardInterrupt as e:
        print(f"{prog}: interrupted ({e or 'SIGINT'})", file=sys.stderr)
        return 130
    except (ProtocolError, RuntimeError, OSError) as e:
        # the proxy's / Dovecot's log tails were printed above
        print(f"{prog}: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def report(results: dict, table: Callable[[dict], str], proxy_stderr: str, json_path: str | None) -> None:
    """The end of every benchmark: the table, a warning for suspicious proxy log lines, the JSON."""
    suspicious = suspicious_lines(proxy_stderr)
    results["proxy_log_suspicious_lines"] = suspicious[:20]
    print(table(results))
    if suspicious:
        print(f"\nwarning: {len(suspicious)} suspicious line(s) in the proxy's log, e.g.: {suspicious[0]}")
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2) + "\n")
        log(f"wrote {json_path}")
