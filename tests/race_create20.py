"""Round 20 (create20, not collected): admin moves while other sessions of the user LIST and MYRIGHTS.

Dovecot 2.3.19 (maildir, ACL) answers some CREATEs of new names ``NO [ALREADYEXISTS]`` and makes the
mailbox, when other sessions of the same user LIST or MYRIGHTS at that moment (mailops.create). Here
``move carol Work b3`` and back, ROUNDS times (a subtree: Work and CHILDREN children, each with mail),
while SESSIONS sessions of carol straight on b1 and on b3 loop on LIST and MYRIGHTS. Every move must
end at once (exit 0, not "committed but not finished"), and a census find every message once where
the move put it. Run: ``ROUNDS=20 python3 -m pytest tests/race_create20.py -s``; it prints how many
CREATEs were taken as made (the log's "refused as existing, and made: taken").
"""

from __future__ import annotations

import imaplib
import os
import sys
import threading

import pytest
from movecheck import census, cli, seed
from test_moves import MASTERS, _exactly_once, _no_entries, ids

pytestmark = pytest.mark.usefixtures("clean_mail")

ROUNDS = int(os.environ.get("ROUNDS", "10"))
SESSIONS = int(os.environ.get("SESSIONS", "2"))
CHILDREN = int(os.environ.get("CHILDREN", "6"))


# `referral-proxy` with its log at info (the CLI's is warn): mailops.create's "taken" line is counted.
VERBOSE = [sys.executable, "-c", "import sys, twisted.logger as t, referral_proxy.movecli as m; "
           "m.LogLevelFilterPredicate = lambda defaultLogLevel: t.LogLevelFilterPredicate(t.LogLevel.info); "
           "from referral_proxy.cli import main; sys.exit(main(sys.argv[1:]))"]


class _Busy(threading.Thread):
    """A session of *user* straight on *backend* looping on LIST and MYRIGHTS until stopped."""

    def __init__(self, backend, user: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.backend, self.user, self.stop, self.rounds = backend, user, stop, 0

    def run(self) -> None:
        with self.backend.client(self.user, timeout=300) as m:
            while not self.stop.is_set():
                try:
                    m.list('""', '"*"')
                    m.myrights("INBOX")
                except imaplib.IMAP4.error:
                    pass
                self.rounds += 1


def test_moves_beside_sessions_listing(fleet, proxy_factory):
    names = ["Work"] + [f"Work/c{i}" for i in range(CHILDREN)]
    mail = {n: ids(n.replace("/", "-"), 3) for n in names}
    for n in names:
        seed(fleet["b1"], "carol", n, mail[n])
    proxy = proxy_factory(MASTERS)
    stop = threading.Event()
    busy = [_Busy(fleet[b], "carol", stop) for b in ("b1", "b3") for _ in range(SESSIONS)]
    for t in busy:
        t.start()
    taken, unfinished, failed = 0, [], []
    try:
        for r in range(ROUNDS):
            for to in ("b3", "b1"):
                moved = cli("move", "--config", str(proxy.config_path), "carol", "Work", to, timeout=600,
                            command=VERBOSE)
                out = moved.stdout + moved.stderr
                taken += out.count("refused as existing, and made: taken")
                if "not finished" in out:
                    unfinished.append((r, to))
                    assert cli("recover", "--config", str(proxy.config_path)).returncode == 0
                elif moved.returncode != 0:
                    failed.append((r, to, out[-500:]))
                    continue
                where = census(fleet, "carol")[1]
                assert all(where[i] == [(to, n)] for n in names for i in mail[n]), (r, to, where)
    finally:
        stop.set()
        for t in busy:
            t.join(60)
    print(f"\nrace_create20: {ROUNDS * 2} moves of {len(names)} mailboxes; {taken} CREATE(s) taken as made; "
          f"{len(unfinished)} not finished {unfinished}; {len(failed)} failed; "
          f"{sum(t.rounds for t in busy)} LIST+MYRIGHTS rounds beside")
    _exactly_once(fleet, proxy, "carol", [i for n in names for i in mail[n]])
    assert _no_entries(proxy)
    assert not unfinished and not failed, (unfinished, failed)
