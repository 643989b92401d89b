"""``referral-proxy demo`` shows what the README describes: the banner's admin commands
(map, move with its progress bar, recover) work on the demo's own configuration."""

from __future__ import annotations

import imaplib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

from conftest import REPO_ROOT, dovecot_root, require_dovecot

from referral_proxy.demo import PROJECTS_MESSAGES
from referral_proxy.fleet import free_port


def _count(host: str, port: int, mailbox: str) -> int | None:
    with imaplib.IMAP4(host, port, timeout=30) as m:
        m.login("alice", "secret")
        typ, data = m.select(mailbox, readonly=True)
        return int(data[0]) if typ == "OK" else None


def test_demo_then_move_map_and_recover_against_it():
    require_dovecot()
    port, metrics_port = free_port(), free_port()
    root = dovecot_root() / "demo"
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")
    rp = [sys.executable, "-m", "referral_proxy"]
    demo = subprocess.Popen([*rp, "demo", "--port", str(port), "--metrics-port", str(metrics_port), "--dir", str(root)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        banner = ""
        deadline = time.monotonic() + 120
        while "Ctrl-C here stops everything." not in banner:
            line = demo.stdout.readline().decode()
            assert line or demo.poll() is None, banner + demo.stderr.read().decode()
            banner += line
            assert time.monotonic() < deadline, banner
        config = root / "proxy.toml"
        program = f"{sys.executable} -m referral_proxy"
        for command in (f"{program} map --config {config} show alice",
                        f"{program} move --config {config} alice Projects b3",
                        f"{program} recover --config {config}",
                        f"curl http://127.0.0.1:{metrics_port}/metrics"):
            assert command in banner, banner
        backends = dict(re.findall(r"(b\d)=imap://127\.0\.0\.\d:(\d+)", banner))
        hosts = {"b1": "127.0.0.2", "b3": "127.0.0.4"}
        while True:  # the proxy is up once it greets
            try:
                assert _count("127.0.0.1", port, "Projects") == PROJECTS_MESSAGES
                break
            except ConnectionRefusedError:
                assert demo.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)

        def admin(*args: str) -> subprocess.CompletedProcess:
            return subprocess.run([*rp, *args], capture_output=True, text=True, timeout=300, env=env)

        shown = admin("map", "--config", str(config), "show", "alice")
        assert shown.returncode == 0, shown.stderr
        moved = admin("move", "--config", str(config), "alice", "Projects", "b3")
        assert moved.returncode == 0, moved.stderr
        assert f"{PROJECTS_MESSAGES}/{PROJECTS_MESSAGES} messages" in moved.stderr and "[#####" in moved.stderr
        assert f"moved alice Projects from b1 to b3: 1 mailbox(es), {PROJECTS_MESSAGES} message(s)" in moved.stdout
        # The census: every message on b3 now, none left on b1; the proxy serves it from b3.
        assert _count(hosts["b3"], int(backends["b3"]), "Projects") == PROJECTS_MESSAGES
        assert _count(hosts["b1"], int(backends["b1"]), "Projects") is None
        assert _count("127.0.0.1", port, "Projects") == PROJECTS_MESSAGES
        shown = admin("map", "--config", str(config), "show", "alice")
        assert re.search(r"Projects.*b3", shown.stdout), shown.stdout
        recovered = admin("recover", "--config", str(config))
        assert recovered.returncode == 0 and "nothing to recover" in recovered.stdout, recovered.stderr
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/health", timeout=10) as r:
            assert r.status == 200
    finally:
        demo.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            assert demo.wait(60) == 0
        finally:
            if demo.poll() is None:
                demo.kill()
