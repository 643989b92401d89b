"""The proxy as a subprocess, for the tests and the benchmarks alike.

Started from this checkout as ``python -m referral_proxy --config FILE`` (the
checkout first on PYTHONPATH, a caller's *env* applied last), waited for until it
greets, stopped with SIGTERM and, after a grace, SIGKILL. ``wait_greeting`` serves
any IMAP server a benchmark starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["REPO_ROOT", "StartError", "ProxyProcess", "wait_greeting", "die_with_parent"]

REPO_ROOT = Path(__file__).resolve().parents[2]


class StartError(RuntimeError):
    """A server did not come up; the message says why, with the tail of its log."""


def die_with_parent() -> None:
    """In a child between fork and exec: SIGTERM when the parent dies (nothing left behind)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def wait_greeting(host: str, port: int, proc: subprocess.Popen | None, what: str,
                  diagnostics: Callable[[], str], timeout: float, *, implicit_tls: bool = False) -> None:
    """Until *host*:*port* sends ``* OK``; StartError (with *diagnostics()*) if *proc* exits
    first or nothing greets within *timeout* s. With *implicit_tls* only readiness is checked,
    not the certificate."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise StartError(f"{what} exited with status {proc.returncode} during start-up{diagnostics()}")
        try:
            with socket.create_connection((host, port), timeout=2.0) as raw:
                sock: socket.socket = raw
                if implicit_tls:
                    ctx = ssl.create_default_context()
                    ctx.check_hostname = False
                    ctx.verify_mode = ssl.CERT_NONE
                    sock = ctx.wrap_socket(raw)
                sock.settimeout(max(0.5, min(5.0, deadline - time.monotonic())))
                data = b""
                while b"\n" not in data and len(data) < 8192:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            if data.startswith(b"* OK") and (proc is None or _listener_is(proc.pid, port)):
                return
            last = data if not data.startswith(b"* OK") else f"{data!r}, from another process listening there"
        except OSError as e:
            last = e
        if time.monotonic() > deadline:
            raise StartError(f"{what} did not greet with '* OK' on {host}:{port} within {timeout}s "
                             f"(last: {last!r}){diagnostics()}")
        time.sleep(0.05)


def _listener_is(pid: int, port: int) -> bool:
    """Whether the socket listening on *port* is *pid*'s or one of its children's. A greeting alone
    does not say: another test's server may hold the port (picked free by both) while ours starts."""
    try:
        import psutil
    except ImportError:
        return True  # (cannot tell: take the greeting as ours)
    try:
        root = psutil.Process(pid)
        for p in (root, *root.children(recursive=True)):
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port:
                    return True
    except psutil.Error:
        return False  # (gone meanwhile: the next look says why)
    return False


def _preexec(tied_to_parent: bool, preexec: Callable[[], None] | None) -> Callable[[], None] | None:
    if not tied_to_parent:
        return preexec
    if preexec is None:
        return die_with_parent

    def both() -> None:
        die_with_parent()
        preexec()

    return both


class ProxyProcess:
    """``python -m referral_proxy --config CONFIG_PATH`` in *workdir* (its cwd)."""

    def __init__(self, config_path: Path, *, host: str, port: int, workdir: Path | None = None,
                 stdout_path: Path | None = None, stderr_path: Path | None = None,
                 implicit_tls: bool = False) -> None:
        self.config_path = Path(config_path)
        self.host = host
        self.port = port
        self.workdir = workdir if workdir is not None else self.config_path.parent
        self.stdout_path = stdout_path if stdout_path is not None else self.workdir / "stdout.log"
        self.stderr_path = stderr_path if stderr_path is not None else self.workdir / "stderr.log"
        self.implicit_tls = implicit_tls  # the first listener is "ssl:"
        self.process: subprocess.Popen | None = None

    def start(self, *, args: Sequence[str] = (), env: Mapping[str, str] | None = None, timeout: float = 60.0,
              wait: bool = True, new_group: bool = False, tied_to_parent: bool = False,
              command: Sequence[str] | None = None, preexec: Callable[[], None] | None = None) -> None:
        """Start it; with *wait*, return once it greets (else StartError, the process killed).
        *command*: what runs instead of ``python -m referral_proxy`` (e.g. tests/faultproxy.py ... --).
        *preexec* runs in the child before the exec (resource limits: ``ulimit -n``)."""
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.setdefault("PYTHONFAULTHANDLER", "1")
        child_env.update(env or {})
        with contextlib.ExitStack() as files:
            out = files.enter_context(open(self.stdout_path, "ab"))
            err = out if self.stderr_path == self.stdout_path else files.enter_context(open(self.stderr_path, "ab"))
            self.process = subprocess.Popen(
                [*(command or [sys.executable, "-m", "referral_proxy"]), "--config", str(self.config_path), *args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=self.workdir, env=child_env,
                preexec_fn=_preexec(tied_to_parent, preexec), start_new_session=new_group)
        if wait:
            try:
                self.wait_greeting(timeout)
            except BaseException:
                self.kill()
                raise

    def wait_greeting(self, timeout: float) -> None:
        wait_greeting(self.host, self.port, self.process, "the proxy", self._diagnostics, timeout,
                      implicit_tls=self.implicit_tls)

    def _diagnostics(self) -> str:
        return (f" (config {self.config_path})\n--- stderr ---\n{self.stderr_text()[-8000:]}"
                f"\n--- stdout ---\n{self.stdout_text()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stderr_text(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stdout_text(self) -> str:
        try:
            return self.stdout_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def send_signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after *timeout* s; the exit status. Idempotent."""
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return p.returncode

    def kill(self) -> int | None:
        p = self.process
        if p is None:
            return None
        if p.poll() is None:
            p.kill()
        return p.wait()
