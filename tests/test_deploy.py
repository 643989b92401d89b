"""deploy/: every file the compose file, the Dockerfiles and the systemd unit name exists, and
the example configurations load (the proxy's through the real loader, Dovecot's with doveconf).
No Docker engine is needed: the files are read, not run."""

from __future__ import annotations

import inspect
import ipaddress
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from referral_proxy.config import load_config
from referral_proxy.routing import MailboxMap

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_compose_names_only_files_that_exist():
    services = compose()["services"]
    assert set(services) == {"proxy", "dovecot1", "dovecot2", "dovecot3"}
    for name, service in services.items():
        build = service["build"]
        context = DEPLOY / (build["context"] if isinstance(build, dict) else build)
        dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
        assert context.is_dir() and dockerfile.is_file(), (name, context, dockerfile)
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (DEPLOY / source).exists(), (name, volume)
            else:
                assert source in compose()["volumes"], (name, volume)
        # every file its Dockerfile copies is in the build context
        for word, args in dockerfile_instructions(dockerfile):
            if word in ("COPY", "ADD"):
                sources = [a for a in shlex.split(args) if not a.startswith("--")][:-1]
                for src in sources:
                    assert (context / src).exists(), (name, word, src)
    assert services["proxy"]["depends_on"] == ["dovecot1", "dovecot2", "dovecot3"]
    # the three backends are one image: the same users and master user everywhere
    assert {services[d]["build"] for d in ("dovecot1", "dovecot2", "dovecot3")} == {"./dovecot"}


def test_proxy_image_is_debian_pip_install_and_twistd():
    steps = dockerfile_instructions(DEPLOY / "Dockerfile")
    assert steps[0][0] == "FROM" and steps[0][1].startswith("debian:")
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert "python3 -m venv /opt/referral-proxy" in runs and "/opt/referral-proxy/bin/pip install --no-cache-dir ." in runs
    cmd = [args for word, args in steps if word == "CMD"][-1]
    assert cmd.startswith('["twistd", "--pidfile=", "-n", "referral-proxy", "--config", ')


def test_compose_proxy_config_loads_and_matches_the_backends():
    from twisted.internet import reactor

    from referral_proxy.service import check_endpoints

    config = load_config(DEPLOY / "compose" / "proxy.toml", check_endpoints=lambda c: check_endpoints(c, reactor))
    services = compose()["services"]
    m = MailboxMap(config.map)
    assert m.home("alice").backends == ("dovecot1",) and m.home("bob").backends == ("dovecot2",)
    assert m.lookup("alice", "Shared/Team").backends == ("dovecot3",)
    assert m.lookup("bob", "Shared/Team").backends == ("dovecot3",)
    assert config.metrics.listen == "tcp:9143" and config.log.format == "json"
    published = {p.split(":")[-2] + "->" + p.split(":")[-1] for p in services["proxy"]["ports"]}
    assert {"1143->143", "9143->9143"} == published
    masters = dict(line.split(":")[:2] for line in (DEPLOY / "dovecot" / "master-users").read_text().splitlines()
                   if line and not line.startswith("#"))
    for name, backend in config.backends.items():
        assert name in services and backend.endpoint == f"tcp:host={name}:port=143"
        assert masters[backend.master_user] == "{PLAIN}" + backend.master_password
        port = backend.url.rsplit(":", 1)[1]
        assert f"127.0.0.1:{port}:143" in services[name]["ports"]  # referrals point where clients can go
    users = (DEPLOY / "dovecot" / "users").read_text()
    assert all(re.search(rf"^{u}:", users, re.M) for u in ("alice", "bob", "carol"))
    # Dovecot trusts the proxy's ID (the client's address) from the proxy's compose address only.
    proxy_ip = services["proxy"]["networks"]["imap"]["ipv4_address"]
    conf = (DEPLOY / "dovecot" / "dovecot.conf").read_text()
    trusted = re.search(r"^login_trusted_networks = (.+)$", conf, re.M).group(1).split()
    assert any(ipaddress.ip_address(proxy_ip) in ipaddress.ip_network(n) for n in trusted)
    subnet = compose()["networks"]["imap"]["ipam"]["config"][0]["subnet"]
    assert ipaddress.ip_address(proxy_ip) in ipaddress.ip_network(subnet)
    # A master login "bob*admin" is routed as bob: the proxy splits it where Dovecot does (probe 5, stop 48:
    # unset, it went to the default backend as a user "bob*admin", and its mail into bob's INBOX there).
    separator = re.search(r"^auth_master_user_separator = (\S+)$", conf, re.M).group(1)
    assert config.map.master_user_separator == separator
    assert m.home(m.login_user("bob*admin")).backends == ("dovecot2",)


def test_dovecot_config_is_valid_for_doveconf():
    if shutil.which("doveconf") is None:
        pytest.skip("doveconf is not installed (Debian package dovecot-core)")
    result = subprocess.run(["doveconf", "-c", str(DEPLOY / "dovecot" / "dovecot.conf"), "-n"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "login_trusted_networks = 10.143.0.10/32" in result.stdout
    assert "master = yes" in result.stdout


def test_systemd_unit_names_what_the_project_installs():
    unit = (DEPLOY / "referral-proxy.service").read_text()
    exec_start = re.search(r"^ExecStart=(.+)$", unit, re.M).group(1).split()
    program, options = Path(exec_start[0]), exec_start[1:]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert program.name in scripts and program.parent == Path("/opt/referral-proxy/bin")
    assert f"python3 -m venv {program.parent.parent}" in unit  # the comment says how it gets there
    config = Path(options[options.index("--config") + 1])
    assert config.name == "proxy.toml" and (DEPLOY / "proxy.toml.example").is_file()
    assert "proxy.toml.example" in unit
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", unit, re.M)


def test_dockerignore_keeps_the_build_context_small():
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".venv" in ignored


def test_the_demo_splits_a_master_login_where_its_dovecots_do():
    """The demo's config names the fleet's auth_master_user_separator (probe 5, stop 48)."""
    from referral_proxy import demo
    from referral_proxy.fleet import conf

    dovecot = re.search(r"^auth_master_user_separator = (\S+)$", inspect.getsource(conf), re.M).group(1)
    assert re.search(r'^master_user_separator = "(.)"', demo.DEMO_CONFIG, re.M).group(1) == dovecot
