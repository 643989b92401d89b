"""The configuration file: what is accepted, and one clear line for each mistake."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from storehelp import now

from referral_proxy.config import ConfigError, load_config
from referral_proxy.routing import MailboxMap, SQLiteStore

GOOD = """\
[proxy]
listen = ["tcp:1143:interface=127.0.0.1"]
hostname = "imap.example.test"
allow_plaintext_login = true
referrals = "aware"

[backends.b1]
endpoint = "tcp:host=127.0.0.2:port=1143"
url = "imap://127.0.0.2:1143"
tls = "none"

[backends.b2]
endpoint = "tcp:host=127.0.0.3:port=1143"
url = "imap://127.0.0.3:1143"

[backends.b3]
endpoint = "tcp:host=127.0.0.4:port=1143"
url = "imap://127.0.0.4:1143"

[map]
default = "b1"
store = "sqlite:map.sqlite3"

[[map.rules]]
mailbox = "Shared/*"
backend = "b3"

[[map.rules]]
user = "bob"
mailbox = "*"
backend = ["b2", "b3"]
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "proxy.toml"
    p.write_text(text)
    return p


def test_good_config_and_map(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert config.proxy.listen == ("tcp:1143:interface=127.0.0.1",)
    assert config.proxy.limits.max_line == 65536 and config.proxy.limits.max_message == 512 * 1024 * 1024
    assert config.backends["b1"].url_host == "127.0.0.2"
    assert config.map.store == f"sqlite:{tmp_path / 'map.sqlite3'}"  # relative to the file's folder
    m = MailboxMap(config.map, SQLiteStore(tmp_path / "map.sqlite3"))
    assert m.home("alice").backends == ("b1",)
    assert m.home("bob").backends == ("b2", "b3")
    assert m.lookup("alice", "Shared/Projects").backends == ("b3",)
    assert m.lookup("bob", "Shared/Projects").backends == ("b3",)  # first matching rule wins
    assert m.lookup("alice", "Shared").backends == ("b1",)
    now(m.place("alice", "inbox/Archive", ["b2"]))  # INBOX is case-insensitive
    assert m.lookup("alice", "INBOX/Archive").backends == ("b2",)
    now(m.close())
    # Placements survive a restart.
    again = MailboxMap(config.map, SQLiteStore(tmp_path / "map.sqlite3"))
    assert again.lookup("alice", "INBOX/Archive").backends == ("b2",)
    now(again.close())


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('hostname =', 'hostnam ='), "proxy.hostnam: unknown key"),
    (lambda t: t.replace('default = "b1"', 'default = "b9"'), "map.default: unknown backend 'b9'"),
    (lambda t: t.replace('backend = "b3"', 'backend = "nope"'), "map.rules[0].backend: unknown backend 'nope'"),
    (lambda t: t.replace('backend = "b3"', 'backend = ["b3", "b2", "b3"]'),
     "map.rules[0].backend: a backend is named twice in ['b3', 'b2', 'b3']"),
    (lambda t: t.replace('url = "imap://127.0.0.2:1143"\n', ''), "backends.b1.url: missing"),
    (lambda t: t.replace('tls = "none"', 'tls = "maybe"'), "backends.b1.tls: must be one of"),
    (lambda t: t.replace('referrals = "aware"', 'referrals = 3'), "proxy.referrals: wrong type int"),
    (lambda t: t + "[extra]\n", "extra: unknown key"),
    (lambda t: t.replace("[map]", "[mapp]"), "mapp: unknown key"),
    (lambda t: t.replace('"tcp:host=127.0.0.3:port=1143"', '"frob:host=x"'), "backends.b2.endpoint: bad endpoint 'frob:host=x'"),
    (lambda t: t.replace('"tcp:1143:interface=127.0.0.1"', '"tcp:notaport"'), "proxy.listen[0]: bad endpoint 'tcp:notaport'"),
    (lambda t: t.replace("[proxy]", "[proxy]\ntls_cert = \"missing.pem\"\ntls_key = \"missing.key\""), "proxy.tls_cert: no such file"),
    (lambda t: t.replace("[proxy]\n", "[proxy\n"), "not valid TOML"),
    # a map file where none can be made (its folder is a file; or not writable: probe y5 of stop 53, a traceback)
    (lambda t: t.replace('store = "sqlite:map.sqlite3"', 'store = "sqlite:proxy.toml/map.sqlite3"'),
     "map.store: cannot open sqlite:"),
])
@pytest.mark.parametrize("runner", ["cli", "twistd"])
def test_bad_config_is_one_clear_line(tmp_path, edit, message, runner):
    path = write(tmp_path, edit(GOOD))
    if runner == "cli":
        cmd = [sys.executable, "-m", "referral_proxy", "--config", str(path)]
    else:
        cmd = [sys.executable, "-m", "twisted", "--", "--pidfile=", "-n", "referral-proxy", "--config", str(path)]
        cmd = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0]='twistd'; run()",
               "--pidfile=", "-n", "referral-proxy", "--config", str(path)]
    # this checkout's code, not whatever is installed (nothing, or another checkout's editable install)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("referral-proxy: configuration error: ")
    assert message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_deploy_example_config_is_valid(tmp_path):
    """deploy/proxy.toml.example loads, with its files pointed at real (throwaway) ones."""
    from twisted.internet import reactor

    from referral_proxy.fleet import make_tls_material
    from referral_proxy.service import check_endpoints

    tls = make_tls_material(tmp_path / "tls", ["127.0.0.1"])
    example = (Path(__file__).parent.parent / "deploy" / "proxy.toml.example").read_text()
    text = (example.replace("/etc/referral-proxy/key.pem", str(tls.key))
                   .replace("/etc/referral-proxy/cert.pem", str(tls.cert))
                   .replace("/etc/referral-proxy/backend-ca.pem", str(tls.ca_cert))
                   .replace("/var/lib/referral-proxy/map.sqlite3", str(tmp_path / "map.sqlite3")))
    config = load_config(write(tmp_path, text), check_endpoints=lambda c: check_endpoints(c, reactor))
    assert config.proxy.allow_plaintext_login is False
    assert config.backends["mail2"].master_user == "proxy-master"
    assert MailboxMap(config.map).lookup("alice", "Shared/Team").backends == ("mail2",)


def test_the_recovery_check_interval(tmp_path):
    """[map] recovery_check_seconds: 2 by default; 0.1 to 3600 (a fraction of a second is allowed)."""
    assert load_config(write(tmp_path, GOOD)).map.recovery_check_seconds == 2.0
    edited = GOOD.replace('store = "sqlite:map.sqlite3"', 'store = "sqlite:map.sqlite3"\nrecovery_check_seconds = 0.5')
    assert load_config(write(tmp_path, edited)).map.recovery_check_seconds == 0.5
    with pytest.raises(ConfigError, match="map.recovery_check_seconds: must be between 0.1 and 3600"):
        load_config(write(tmp_path, edited.replace("= 0.5", "= 0")))



def test_the_move_wait(tmp_path):
    """[map] move_wait_seconds (copywait.py, transfer._hold): 10 by default; 0.1 to 3600, a number."""
    assert load_config(write(tmp_path, GOOD)).map.move_wait_seconds == 10.0
    edited = GOOD.replace('store = "sqlite:map.sqlite3"', 'store = "sqlite:map.sqlite3"\nmove_wait_seconds = 1.5')
    assert load_config(write(tmp_path, edited)).map.move_wait_seconds == 1.5
    assert load_config(write(tmp_path, edited.replace("= 1.5", "= 3600"))).map.move_wait_seconds == 3600.0
    for bad in ("0", "-1", "0.05", "3601", "inf", "nan"):
        with pytest.raises(ConfigError, match="map.move_wait_seconds: must be between 0.1 and 3600"):
            load_config(write(tmp_path, edited.replace("= 1.5", "= " + bad)))
    for bad in ("true", '"10"'):
        with pytest.raises(ConfigError, match="map.move_wait_seconds: wrong type"):
            load_config(write(tmp_path, edited.replace("= 1.5", "= " + bad)))

def test_the_answer_timeout(tmp_path):
    """[backends.X] answer_timeout (stall.py): 60 by default; 0 (never) or 0.1 to 3600."""
    assert load_config(write(tmp_path, GOOD)).backends["b1"].answer_timeout == 60.0
    edited = GOOD.replace('tls = "none"', 'tls = "none"\nanswer_timeout = 2.5')
    assert load_config(write(tmp_path, edited)).backends["b1"].answer_timeout == 2.5
    assert load_config(write(tmp_path, edited.replace("= 2.5", "= 0"))).backends["b1"].answer_timeout == 0.0
    for bad in ("-1", "0.01", "7200", "true", '"60"'):
        with pytest.raises(ConfigError, match="backends.b1.answer_timeout"):
            load_config(write(tmp_path, edited.replace("= 2.5", "= " + bad)))
