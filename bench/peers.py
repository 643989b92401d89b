"""The proxies measured beside referral-proxy, and what /proc says about a process tree.

Each target is something an IMAP client connects to on loopback, in front of one
backend Dovecot: the backend itself ("direct"), referral-proxy, Dovecot in proxy
mode (a second Dovecot whose passdb answers ``proxy=y host= port=``), Perdition,
and nginx's mail proxy with bench/auth_http.py answering its ``auth_http``.  Every
process is started in a process group of its own and killed with its group (the
proxies' forked children too); :func:`missing_peers` says what to install.
Used by bench_peers.py and profile_proxy.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from _common import PROXY_HOST, REPO_ROOT, ProxyProcess, _pdeathsig, log, wait_greeting

from referral_proxy.fleet import Dovecot, free_port
from referral_proxy.fleet.procs import process_group

NGINX_MAIL_MODULE = Path("/usr/lib/nginx/modules/ngx_mail_module.so")
PERDITION = "perdition.imap4"
# Debian packages of each peer, for the message when one is missing
PACKAGES = {"dovecot": "dovecot-imapd", "perdition": "perdition", "nginx": "nginx-light libnginx-mod-mail"}
START_TIMEOUT = 20.0


def missing_peers(names: Iterable[str]) -> dict[str, str]:
    """name -> why it cannot run here (with the apt-get line), for the peers in *names*."""
    out = {}
    for name in names:
        if name == "perdition" and shutil.which(PERDITION) is None:
            out[name] = f"{PERDITION} is not installed: apt-get install -y {PACKAGES['perdition']}"
        elif name == "nginx" and (shutil.which("nginx") is None or not NGINX_MAIL_MODULE.exists()):
            out[name] = f"nginx with its mail module is not installed: apt-get install -y {PACKAGES['nginx']}"
    return out


# ----------------------------------------------------------------------------- /proc


def _stat_fields(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()  # [0] = field 3 (state)


def descendants(root: int) -> list[int]:
    """*root* and every live process below it (by parent pid, from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            f = _stat_fields(int(entry.name))
            if f is not None:
                children.setdefault(int(f[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu_user_system(root: int) -> tuple[float, float]:
    """(user, system) CPU seconds of *root*'s process tree so far, the children it reaped
    included (cutime/cstime): a delta of two calls is the tree's CPU in between."""
    user = system = 0
    for pid in descendants(root):
        f = _stat_fields(pid)
        if f is not None:
            user += int(f[11]) + int(f[13])
            system += int(f[12]) + int(f[14])
    return user / _TICK, system / _TICK


def tree_cpu_seconds(root: int | None) -> float | None:
    """User + system CPU seconds of *root*'s process tree so far (None for no root)."""
    if root is None:
        return None
    return sum(tree_cpu_user_system(root))


def tree_pss_bytes(root: int) -> int:
    """Proportional set size of *root*'s tree (shared pages split between sharers)."""
    total = 0
    for pid in descendants(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


def set_affinity(roots: Iterable[int], cpus: set[int]) -> None:
    """Pin every thread of every process of the trees at *roots* to *cpus*."""
    for root in roots:
        for pid in descendants(root):
            try:
                tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
            except OSError:
                continue
            for tid in tids:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(tid, cpus)


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / _TICK, sum(fields[:8]) / _TICK


# ----------------------------------------------------------------------------- processes


def _tail(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        return f"\n--- {path} (tail) ---\n" + path.read_text(errors="replace")[-3000:]
    except OSError:
        return ""


def kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM *proc*'s process group, SIGKILL what is left after *grace* s; wait until it is empty."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if proc.poll() is not None and not process_group(pgid):
            return
        time.sleep(0.05)
    deadline = time.monotonic() + 10.0
    while True:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(0.05)
        left = process_group(pgid)
        if proc.poll() is not None and not left:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes of group {pgid} would not die: {left}")


class Daemon:
    """A foreground server process in its own process group, its output in a log file."""

    def __init__(self, name: str, argv: list[str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.cwd = cwd
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.process = subprocess.Popen(self.argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=out,
                                            stderr=out, start_new_session=True, preexec_fn=_pdeathsig)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def stop(self) -> None:
        if self.process is not None:
            kill_group(self.process)


# ----------------------------------------------------------------------------- targets


class Target:
    """Something the benchmark's clients connect to; ``cpu_root`` is the process tree
    whose CPU and memory count as this target's (None: nothing but the backend).
    ``runner`` (a Daemon, Dovecot or ProxyProcess) is what start/stop/cpu_root act on."""

    key = "target"
    label = "target"
    host = PROXY_HOST
    port = 0
    runner: Daemon | Dovecot | ProxyProcess | None = None

    def start(self) -> None:
        if self.runner is not None:
            self.runner.start()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()

    @property
    def cpu_root(self) -> int | None:
        return None if self.runner is None else self.runner.pid

    def roots(self) -> list[int]:
        """Every process tree this target started (for pinning)."""
        return [p for p in (self.cpu_root,) if p is not None]

    def log_text(self) -> str:
        return ""


class DirectTarget(Target):
    """The backend Dovecot itself: the reference."""

    key = "direct"
    label = "direct"

    def __init__(self, backend: Dovecot) -> None:
        self.backend = backend
        self.host, self.port = backend.host, backend.port

    @property
    def memory_root(self) -> int | None:
        return self.backend.pid


class ReferralProxyTarget(Target):
    """This project's proxy (``python -m referral_proxy``), one backend, map default b1."""

    key = "referral-proxy"
    label = "referral-proxy"

    def __init__(self, root: Path, backend: Dovecot, workers: int | None = None) -> None:
        self.workdir = root / ("proxy" if workers is None else f"proxy-w{workers}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        extra = "" if workers is None else f"workers = {workers}\n"
        # Every benchmark client is alice or user1..100 from 127.0.0.1 (2 x 100 idle sessions
        # for the memory row): the per-address and per-user limits (hostile clients, issue 10)
        # raised out of the way, as no peer here has them by default.
        extra += "".join(f"{k} = 100000\n" for k in ("max_connections_per_ip", "max_unauthenticated_per_ip",
                                                     "max_connections_per_user"))
        if workers is not None:
            self.key = f"referral-proxy-w{workers}"
            self.label = f"referral-proxy w={workers}"
        self.proxy = self.runner = ProxyProcess(self.workdir, backend, proxy_extra=extra)
        self.port = self.proxy.port

    def log_text(self) -> str:
        return self.proxy.stderr_text()


class _ProxyDovecot(Dovecot):
    """A Dovecot whose passdb sends every (password-checked) user on to *target*."""

    def __init__(self, *args, target: Dovecot, login_processes: int, **kw) -> None:
        super().__init__(*args, **kw)
        self.target = target
        self.login_processes = login_processes

    def _config_text(self) -> str:
        # high-performance login processes, as many as CPUs (Dovecot's advice for proxies)
        text = super()._config_text()
        return text.replace("process_min_avail = 1", f"process_min_avail = {self.login_processes}")

    def _prepare(self) -> None:
        super()._prepare()
        fields = f"proxy=y host={self.target.host} port={self.target.port}"
        lines = [f"{u}:{{PLAIN}}{p}::::::{fields}\n" for u, p in self.users.items()]
        self.passwd_path.write_text("".join(lines))


class DovecotProxyTarget(Target):
    """Dovecot in proxy mode (login processes relay to the backend after the passdb says so)."""

    key = "dovecot-proxy"
    label = "Dovecot proxy"

    def __init__(self, root: Path, backend: Dovecot, host: str = "127.0.0.3") -> None:
        self.dovecot = _ProxyDovecot("bench-dproxy", host, root / "dovecot-proxy", users=backend.users,
                                     target=backend, login_processes=os.cpu_count() or 1)
        self.runner = self.dovecot
        self.host, self.port = host, self.dovecot.port

    def log_text(self) -> str:
        return self.dovecot.log_text()


class _DaemonTarget(Target):
    """A target that is one Daemon (``self.daemon``), ready once it greets."""

    daemon: Daemon
    greeting_log: Path

    def start(self) -> None:
        self.runner = self.daemon
        super().start()
        wait_greeting(self.host, self.port, self.daemon.process, self.daemon.name,
                      lambda: _tail(self.greeting_log), START_TIMEOUT)

    def log_text(self) -> str:
        return _tail(self.greeting_log)


class PerditionTarget(_DaemonTarget):
    """Perdition (one forked process per connection), every user to the backend (no map)."""

    key = "perdition"
    label = "Perdition"

    def __init__(self, root: Path, backend: Dovecot) -> None:
        self.dir = root / "perdition"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "perdition.conf").write_text("# empty: everything is on the command line\n")
        self.port = free_port(PROXY_HOST)
        argv = [
            shutil.which(PERDITION) or PERDITION, "--no_daemon", "--protocol", "IMAP4",
            "--config_file", str(self.dir / "perdition.conf"),
            "--map_library", "", "--outgoing_server", f"{backend.host}:{backend.port}", "--no_lookup",
            "--bind_address", PROXY_HOST, "--listen_port", str(self.port),
            "--imap_capability", "IMAP4 IMAP4REV1 LITERAL+",
            "--pid_file", str(self.dir / "perdition.pid"), "--quiet", "--connection_limit", "0",
            "--server_resp_line", "--timeout", "0",
        ]
        self.daemon = Daemon("perdition", argv, self.dir / "perdition.log", self.dir)
        self.greeting_log = self.daemon.log_path


class NginxTarget(_DaemonTarget):
    """nginx's mail proxy (a master, ``workers`` worker processes) asking bench/auth_http.py
    where each user goes; the responder is a process of its own, measured apart."""

    key = "nginx"
    label = "nginx mail"

    def __init__(self, root: Path, backend: Dovecot, workers: int | None = None) -> None:
        self.dir = root / "nginx"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port(PROXY_HOST)
        self.auth_port = free_port(PROXY_HOST)
        self.auth = Daemon("auth_http", [sys.executable, str(REPO_ROOT / "bench" / "auth_http.py"),
                                         "--server", f"{backend.host}:{backend.port}",
                                         "--listen", f"{PROXY_HOST}:{self.auth_port}"],
                           self.dir / "auth_http.log", self.dir)
        conf = f"""\
load_module {NGINX_MAIL_MODULE};
daemon off;
master_process on;
worker_processes {workers or os.cpu_count() or 1};
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log warn;
events {{
    worker_connections 16384;
}}
mail {{
    auth_http {PROXY_HOST}:{self.auth_port}/auth;
    imap_auth login plain;
    imap_capabilities IMAP4rev1 LITERAL+ SASL-IR;
    proxy_pass_error_message on;
    server {{
        listen {PROXY_HOST}:{self.port};
        protocol imap;
    }}
}}
"""
        (self.dir / "nginx.conf").write_text(conf)
        self.daemon = Daemon("nginx", ["nginx", "-p", str(self.dir), "-c", str(self.dir / "nginx.conf"),
                                       "-e", str(self.dir / "error.log")],
                             self.dir / "nginx.log", self.dir)
        self.greeting_log = self.dir / "error.log"

    def start(self) -> None:
        self.auth.start()
        deadline = time.monotonic() + START_TIMEOUT
        while "listening on" not in self.auth.log_path.read_text(errors="replace"):
            if self.auth.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("auth_http responder did not start" + _tail(self.auth.log_path))
            time.sleep(0.05)
        super().start()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.auth.stop()

    def roots(self) -> list[int]:
        return [p for p in (self.daemon.pid, self.auth.pid) if p is not None]


def stop_all(targets: Iterable[Target]) -> None:
    """Stop every target, whatever fails on the way (reported, not raised)."""
    for t in targets:
        try:
            t.stop()
        except Exception as e:
            log(f"stopping {t.label}: {e!r}")
