"""``referral-proxy demo``: three local Dovecot backends, an example map, the proxy in front."""

from __future__ import annotations

import time
from email.message import EmailMessage
from pathlib import Path

from .cli import run
from .testing.dovecot import DEFAULT_USERS, Fleet, make_root

__all__ = ["run_demo", "DEMO_CONFIG"]

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

[backends.b2]
endpoint = "tcp:host={b2.host}:port={b2.port}"
url = "{b2.url}"

[backends.b3]
endpoint = "tcp:host={b3.host}:port={b3.port}"
url = "{b3.url}"

[map]
default = "b1"
store = "sqlite:map.sqlite3"

[[map.rules]]            # every user's Shared/* lives on b3
mailbox = "Shared/*"
backend = "b3"

[[map.rules]]            # bob's home is b2
user = "bob"
mailbox = "*"
backend = "b2"
"""


def _message(user: str, subject: str, body: str) -> bytes:
    msg = EmailMessage()
    msg["From"] = "demo@referral-proxy.test"
    msg["To"] = f"{user}@referral-proxy.test"
    msg["Subject"] = subject
    msg.set_content(body)
    return msg.as_bytes().replace(b"\n", b"\r\n")


def _seed(fleet: Fleet) -> None:
    """A few messages, each where the demo map says it lives."""
    homes = {"alice": "b1", "bob": "b2", "carol": "b1"}
    for user, home in homes.items():
        with fleet[home].client(user) as imap:
            imap.append("INBOX", "", None, _message(user, f"Welcome, {user}", f"Your home backend is {home}."))
        with fleet["b3"].client(user) as imap:
            imap.create("Shared/Projects")
            imap.append("Shared/Projects", "", None, _message(user, "Project plan", "This mailbox lives on b3."))


def run_demo(port: int = 1143, directory: str | None = None) -> int:
    root = Path(directory) if directory else make_root("referral-proxy-demo-")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # Dovecot's unprivileged processes must traverse it
    print(f"Starting three Dovecot backends under {root} ...", flush=True)
    fleet = Fleet.start_default(root / "backends")
    try:
        _seed(fleet)
        config = root / "proxy.toml"
        config.write_text(DEMO_CONFIG.format(port=port, b1=fleet["b1"], b2=fleet["b2"], b3=fleet["b3"]))
        users = ", ".join(f"{u}/{p}" for u, p in DEFAULT_USERS.items() if u != "dave")
        print(
            f"\nreferral-proxy demo is listening on 127.0.0.1:{port} (config: {config})\n"
            f"  users (user/password): {users}\n"
            f"  backends: " + ", ".join(f"{n}={b.url}" for n, b in fleet.backends.items()) + "\n"
            f"  map: bob's home is b2; everyone's Shared/* lives on b3; everything else on b1\n"
            f"  try:  python3 -c \"import imaplib; m=imaplib.IMAP4('127.0.0.1', {port}); "
            f"m.login('alice','secret'); print(m.list())\"\n"
            f"  or:   telnet 127.0.0.1 {port}     (Ctrl-C here stops everything)\n",
            flush=True,
        )
        time.sleep(0.1)
        return run(str(config))
    finally:
        fleet.stop()
