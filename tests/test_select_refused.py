"""A SELECT the proxy refuses itself leaves no mailbox selected; what it carries out on the selected mailbox waits.

RFC 3501 6.3.1: a SELECT/EXAMINE that fails leaves no mailbox selected; Dovecot then answers a STORE or
EXPUNGE with BAD. Probe r6 (stop 50): when the proxy said the NO itself (a reserved name, a mailbox being
moved, a backend it cannot reach), the mailbox selected before stayed selected at its backend, and a
pipelined ``UID STORE 1 +FLAGS.SILENT (\\Deleted)`` + ``UID EXPUNGE 1``, meant for the mailbox the client
tried to open, expunged message 1 of the previous one; a FETCH read it. And ``EXAMINE; CLOSE; UID MOVE 1
<elsewhere>`` got NO [READ-ONLY] (the EXAMINE's state) before the EXAMINE's answer, where Dovecot says
BAD. Each script is played in one write through the proxy (carol: Work on b1, her home, Far* on b2,
Gone* on a spare backend that is stopped) and one command at a time on direct Dovecot (bob: every mailbox
on b1); the tagged answers (status words, in order) and the census of both, by content, must agree.
"""

from __future__ import annotations

import re

import pytest
from imapwire import Wire
from test_answers19_select_no import _census, _prepare  # carol: Work on b1, Far* on b2; bob: all on b1

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

_DEL = [b"UID STORE 1 +FLAGS.SILENT (\\Deleted)", b"UID EXPUNGE 1"]
SCRIPTS = {
    "reserved-after-home": [b"SELECT Work", b"SELECT referral-proxy-staging-x", *_DEL, b"UID FETCH 2 (FLAGS)"],
    "reserved-after-far": [b"SELECT Far", b"SELECT referral-proxy-aside-x", *_DEL, b"CHECK"],
    "reserved-examine-after-far": [b"EXAMINE Far", b"EXAMINE referral-proxy-staging-x", b"UID FETCH 1 (UID)",
                                   b"SELECT Work", *_DEL],
    "moving-after-home": [b"SELECT Work", b"SELECT Moving", *_DEL, b"NOOP"],
    "moving-after-far": [b"SELECT Far", b"EXAMINE Moving", *_DEL, b"UID MOVE 2 Work"],
    "down-after-home": [b"SELECT Work", b"SELECT Gone", b"UID FETCH 1 (BODY.PEEK[])", *_DEL],
    "down-after-far": [b"SELECT Far", b"SELECT Gone", *_DEL, b"UID MOVE 2 Work"],
    "examine-close-move-across": [b"EXAMINE Work", b"CLOSE", b"UID MOVE 1 Far", b"NOOP"],
    "examine-unselect-move-across": [b"EXAMINE Work", b"UNSELECT", b"MOVE 1 Far", b"NOOP"],
    "failed-examine-move-across": [b"SELECT Far", b"EXAMINE Nope", b"UID MOVE 1 Work", b"COPY 1 Work"],
    "far-close-copy-across": [b"SELECT Far", b"CLOSE", b"COPY 1 Work", b"SELECT Work", b"UID MOVE 2 Far"],
    # nothing selected, commands in flight: the refusal after their answers (probe s1: it came first)
    "in-flight-then-reserved": [b"NOOP", b"UID EXPUNGE 1:3", b"STORE 1 +FLAGS (\\Seen)",
                                b"EXAMINE referral-proxy-staging-x", b"NOOP"],
}


def _status(line: bytes) -> bytes:
    """``tag OK`` / ``tag NO`` / ``tag BAD``: the proxy's own NO has its own code and words."""
    m = re.match(rb"(\S+ (?:OK|NO|BAD))", line)
    assert m is not None, line
    return m.group(1)


@pytest.mark.parametrize("name", list(SCRIPTS))
def test_a_select_refused_by_the_proxy_leaves_nothing_selected(fleet, clean_mail, proxy_factory, spare_backend, name):
    from storehelp import REACTOR, now

    from referral_proxy.config import load_config
    from referral_proxy.journal import Reservation, Step
    from referral_proxy.openstore import open_store

    script = SCRIPTS[name]
    gone = {"endpoint": spare_backend.endpoint, "url": spare_backend.url,
            "master_user": MASTER_USER, "master_password": MASTER_PASSWORD}
    proxy = proxy_factory({"backends": {"b4": gone}},
                          rules=[{"mailbox": "Far*", "backend": "b2"}, {"mailbox": "Gone*", "backend": "b4"}])
    _prepare(fleet, "carol")
    _prepare(fleet, "bob")
    w = Wire(fleet["b1"].host, fleet["b1"].port)
    w.login("bob")
    direct = [_status(w.cmd(b"c%d" % i, c)[-1]) for i, c in enumerate(script)]
    w.close()
    store = open_store(load_config(proxy.config_path).map.store, REACTOR)
    store.start()
    entry = now(store.begin_move("carol", "rename", [Reservation("Moving", subtree=True)], {}, "x", "/"))
    now(store.journal_step(entry, Step.PLANNED, {}, "x"))  # under way: NO [INUSE] at once
    now(store.settle())
    spare_backend.stop()
    try:
        p = Wire(proxy.host, proxy.port)
        p.login("carol")
        proxied = [_status(line) for line in p.pipelined(script)]
        p.close()
    finally:
        spare_backend.start()
        now(store.end_move(entry))
        now(store.close())
    assert proxied == direct  # in command order, as Dovecot answers them
    assert _census(fleet, "carol") == _census(fleet, "bob")


def test_a_copy_across_waiting_on_a_close_whose_backend_died_is_not_answered_from_before(fleet, clean_mail,
                                                                                          proxy_factory, spare_backend):
    """Probe s1 (stop 50): Far selected on a backend that stops; ``EXAMINE Far; CLOSE; UID MOVE 1 Work`` in one
    write, then the backend killed: the MOVE, waiting for the two, was answered NO [READ-ONLY] (the EXAMINE's
    state, never confirmed) before the BYE. Its state is not known: NO [UNAVAILABLE], or nothing before the BYE."""
    import os
    import signal
    import time

    far = {"endpoint": spare_backend.endpoint, "url": spare_backend.url,
           "master_user": MASTER_USER, "master_password": MASTER_PASSWORD}
    proxy = proxy_factory({"backends": {"b4": far}}, rules=[{"mailbox": "Far*", "backend": "b4"}])
    with spare_backend.client("carol") as m:
        m.create("Far")
        m.append("Far", None, None, b"Message-Id: <far@sr>\r\n\r\nx\r\n")
    p = Wire(proxy.host, proxy.port)
    p.login("carol")
    assert p.cmd(b"s", b"SELECT Far")[-1].startswith(b"s OK")
    os.killpg(spare_backend.pid, signal.SIGSTOP)  # (its master leads its process group: every imap process)
    try:
        p.send(b"c0 EXAMINE Far\r\nc1 CLOSE\r\nc2 UID MOVE 1 Work\r\nc3 NOOP\r\n")
        time.sleep(1)
    finally:
        spare_backend.kill()
        spare_backend.start()
    answers = []
    try:
        while not (line := p.line()).startswith(b"* BYE"):
            answers.append(line)
    except OSError:  # (closed: ConnectionError)
        pass
    p.close()
    assert not any(a.startswith(b"c2 NO [READ-ONLY]") or a.startswith(b"c2 OK") for a in answers), answers
