"""``referral-proxy demo``: three local Dovecot backends, an example map, the proxy in front.

The backends have a master user, so the admin commands the README shows (``map``,
``move`` with its progress bar, ``recover``) work on the demo's configuration; the
banner prints them ready to paste.
"""

from __future__ import annotations

import os
import sys
import time
from email.message import EmailMessage
from pathlib import Path

from .fleet import DEFAULT_USERS, MASTER_PASSWORD, MASTER_USER, Fleet, make_root
from .runner import run

__all__ = ["run_demo", "DEMO_CONFIG", "PROJECTS_MESSAGES"]

PROJECTS_MESSAGES = 40  # alice's Projects on b1: what the banner's `move` carries to b3

DEMO_CONFIG = """\
# referral-proxy demo: three Dovecot backends on 127.0.0.2, .3 and .4
[proxy]
listen = ["tcp:{port}:interface=127.0.0.1"]
hostname = "demo.referral-proxy.test"
allow_plaintext_login = true
referrals = "aware"

[backends.b1]
endpoint = "tcp:host={b1.host}:port={b1.port}"
url = "{b1.url}"
master_user = "{master_user}"          # map, move and recover log in as the user through it
master_password = "{master_password}"

[backends.b2]
endpoint = "tcp:host={b2.host}:port={b2.port}"
url = "{b2.url}"
master_user = "{master_user}"
master_password = "{master_password}"

[backends.b3]
endpoint = "tcp:host={b3.host}:port={b3.port}"
url = "{b3.url}"
master_user = "{master_user}"
master_password = "{master_password}"

[map]
default = "b1"
store = "sqlite:map.sqlite3"
master_user_separator = "*"  # as the demo Dovecots' auth_master_user_separator: "bob*proxy-master" is bob

[[map.rules]]            # every user's Shared/* lives on b3
mailbox = "Shared/*"
backend = "b3"

[[map.rules]]            # bob's home is b2
user = "bob"
mailbox = "*"
backend = "b2"
{metrics}"""


def _message(user: str, subject: str, body: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "demo@referral-proxy.test"
    msg["To"] = f"{user}@referral-proxy.test"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def _seed(fleet: Fleet) -> None:
    """A few messages, each where the demo map says it lives; alice's Projects is big
    enough for `move` to show its progress bar."""
    homes = {"alice": "b1", "bob": "b2", "carol": "b1"}
    for user, home in homes.items():
        with fleet[home].client(user) as imap:
            imap.append("INBOX", "", None, _message(user, f"Welcome, {user}", f"Your home backend is {home}."))
        with fleet["b3"].client(user) as imap:
            imap.create("Shared/Projects")
            imap.append("Shared/Projects", "", None, _message(user, "Project plan", "This mailbox lives on b3."))
    with fleet["b1"].client("alice") as imap:
        imap.create("Projects")
        line = "Minutes of the weekly meeting, kept on b1 until an administrator moves them.\n"
        for i in range(PROJECTS_MESSAGES):
            imap.append("Projects", r"(\Seen)", None, _message("alice", f"Meeting {i + 1}", line * 400))


def _program() -> str:
    """How this command was started, to print commands the user can paste."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else "referral-proxy"
    if argv0.endswith("__main__.py") or argv0 == "-m":
        return f"{sys.executable} -m referral_proxy"
    return argv0 if os.sep in argv0 else "referral-proxy"


def banner(port: int, config: Path, fleet: Fleet, metrics_port: int) -> str:
    users = ", ".join(f"{u}/{p}" for u, p in DEFAULT_USERS.items() if u != "dave")
    rp = _program()
    lines = [
        f"referral-proxy demo is listening on 127.0.0.1:{port} (config: {config})",
        f"  users (user/password): {users}",
        "  backends: " + ", ".join(f"{n}={b.url}" for n, b in fleet.backends.items()),
        "  map: bob's home is b2; everyone's Shared/* lives on b3; everything else on b1",
    ]
    if metrics_port:
        lines.append(f"  metrics: curl http://127.0.0.1:{metrics_port}/metrics   health: "
                     f"curl http://127.0.0.1:{metrics_port}/health")
    lines += [
        "  try, in another terminal:",
        f"    python3 -c \"import imaplib; m=imaplib.IMAP4('127.0.0.1', {port}); m.login('alice','secret'); "
        "print(m.list())\"",
        f"    telnet 127.0.0.1 {port}",
        f"    {rp} map --config {config} show alice",
        f"    {rp} move --config {config} alice Projects b3    "
        f"# {PROJECTS_MESSAGES} messages to b3, with a progress bar",
        f"    {rp} recover --config {config}",
        "  Ctrl-C here stops everything.",
    ]
    return "\n".join(lines) + "\n"


def run_demo(port: int = 1143, directory: str | None = None, metrics_port: int = 9143) -> int:
    root = Path(directory) if directory else make_root("referral-proxy-demo-")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # Dovecot's unprivileged processes must traverse it
    print(f"Starting three Dovecot backends under {root} ...", flush=True)
    fleet = Fleet.start_default(root / "backends")
    try:
        _seed(fleet)
        config = root / "proxy.toml"
        metrics = (f'\n[metrics]\nlisten = "tcp:{metrics_port}:interface=127.0.0.1"\nhealth_interval = 5\n'
                   if metrics_port else "")
        config.write_text(DEMO_CONFIG.format(port=port, b1=fleet["b1"], b2=fleet["b2"], b3=fleet["b3"],
                                             master_user=MASTER_USER, master_password=MASTER_PASSWORD,
                                             metrics=metrics))
        print("\n" + banner(port, config, fleet, metrics_port), flush=True)
        time.sleep(0.1)
        return run(str(config))
    finally:
        fleet.stop()
