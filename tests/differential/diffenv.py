"""The differential test's environment: one proxy per mode in front of the session's
Dovecot fleet, direct Dovecot beside it, and the seeded stores to restore.

Direct Dovecot is b2; the proxy's side is b1 (mode "single") or b1 plus b3 for
``Shared/*`` (mode "split", the user's mailboxes over two backends). The same user
(carol) on both sides, the same configuration on every backend.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from conftest import RunningProxy, default_proxy_config, toml_dumps
from diffharness import (
    DIFFERENCES,
    Conversation,
    Side,
    Snapshot,
    compare,
    deliverer,
    report,
    run,
    seed,
    split_owner,
)

from referral_proxy.fleet import Fleet, free_port

USER, PASSWORD = "carol", "secret"
SPLIT_RULES = [{"mailbox": "Shared/*", "backend": "b3"}]
#: Direct Dovecot's transcript of a conversation (the same in both modes: b2 holds the
#: whole seed either way), kept from the first mode for the second. Not for ones with
#: a delivery or a wait, whose timing is part of what they test.
_DIRECT: dict[Conversation, list] = {}


@dataclass
class Env:
    mode: str
    fleet: Fleet
    proxy: RunningProxy
    direct: Side
    proxied: Side
    snapshots: list[Snapshot]

    def check(self, conv: Conversation) -> None:
        """Run *conv* on both sides from the seeded state; fail on an unexplained difference."""
        cached = _DIRECT.get(conv)
        for s in self.snapshots[1:] if cached is not None else self.snapshots:
            s.restore()
        if cached is not None:  # direct Dovecot said this in the other mode, from the same store
            direct, proxied = cached, run(conv, self.proxied, USER, PASSWORD)
        else:  # both sides at once: they touch different backends (b2; b1 and b3)
            with ThreadPoolExecutor(1) as pool:
                later = pool.submit(run, conv, self.direct, USER, PASSWORD)
                proxied = run(conv, self.proxied, USER, PASSWORD)
                direct = later.result()
            if all(step.kind == "C" for step in conv.steps):
                _DIRECT[conv] = direct
        cmp = compare(conv, self.mode, direct, proxied)
        if os.environ.get("RP_DIFF_SHOW"):
            print(report(conv, self.mode, cmp))
        assert not cmp.differences, report(conv, self.mode, cmp)
        stale = sorted(a for a in conv.allow if a not in cmp.explained and _applies(a, self.mode))
        assert not stale, (f"{conv.path}:{conv.line} {conv.name} ({self.mode}): @allow {' '.join(stale)} "
                           f"explains nothing any more: remove it (and its row if no conversation needs it)\n"
                           + cmp.text)


def _applies(diff_id: str, mode: str) -> bool:
    return DIFFERENCES[diff_id].scope in ("both", mode)


@contextmanager
def differential_env(fleet: Fleet, tmp_path_factory, mode: str) -> Iterator[Env]:
    """Seed the stores, snapshot them, start the module's proxy."""
    work = tmp_path_factory.mktemp(f"differential-{mode}")
    b1, b2, b3 = fleet["b1"], fleet["b2"], fleet["b3"]
    uv_direct = seed(b2, USER, lambda m: True)
    snapshots = [Snapshot.take(b2, USER, work / "b2")]
    if mode == "single":
        uv_proxy = seed(b1, USER, lambda m: True)
        snapshots.append(Snapshot.take(b1, USER, work / "b1"))
        owner = {"b1": b1}
        rules: list = []
    else:
        uv_proxy = seed(b1, USER, lambda m: split_owner(m) == "b1")
        uv_proxy.update(seed(b3, USER, lambda m: split_owner(m) == "b3"))
        snapshots += [Snapshot.take(b1, USER, work / "b1"), Snapshot.take(b3, USER, work / "b3")]
        owner = {"b1": b1, "b3": b3}
        rules = SPLIT_RULES
    config = default_proxy_config(fleet, free_port("127.0.0.1"), rules)
    # Each conversation starts from the restored maildir, which needs every imap process of the
    # user gone: a parked backend connection (keepalive.py) would wait out reset_mail's grace each time.
    config["proxy"]["backend_keepalive"] = 0
    # The conversations compare answers, not timing: the failed-login penalty (tested in test_limits.py)
    # only made each conversation with failed logins wait (57 s for one of eight AUTHENTICATE failures).
    config["proxy"]["login_penalty"] = 0
    proxy_dir = work / "proxy"
    proxy_dir.mkdir()
    config_path = proxy_dir / "proxy.toml"
    config_path.write_text(toml_dumps(config))
    host, port = "127.0.0.1", int(config["proxy"]["listen"][0].split(":")[1])
    proxy = RunningProxy(host=host, port=port, config_path=config_path, workdir=proxy_dir,
                         stdout_path=proxy_dir / "stdout.log", stderr_path=proxy_dir / "stderr.log", config=config)
    try:
        proxy.start()
        direct = Side("direct", b2.host, b2.port, deliverer(lambda m: b2, USER), uv_direct)
        proxied = Side("proxy", host, port,
                       deliverer(lambda m: owner["b1" if mode == "single" else split_owner(m)], USER), uv_proxy)
        yield Env(mode, fleet, proxy, direct, proxied, snapshots)
    finally:
        proxy.stop()
        for s in snapshots:
            s.backend.reset_mail(USER)
