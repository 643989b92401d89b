"""A backend STOPPED while a command the proxy carries out itself waits on it (stall.py): the
client gets an answer within ``answer_timeout`` + a margin, not ``* OK Hang in there..`` for
ever (helper attack14c); the session goes on; no mail is lost or doubled (census), whether the
stopped backend then resumes (SIGCONT) or is killed and restarted."""

from __future__ import annotations

import os
import signal

import pytest
from imapwire import Wire
from movecheck import census, seed
from race_hang import _bob_served as bob_served
from race_hang import _heard as heard

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER

pytestmark = pytest.mark.usefixtures("clean_mail")

T = 2
CONFIG = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD, "answer_timeout": T}
                       for b in ("b1", "b2", "b3")}}
RULES = [{"mailbox": "Far*", "backend": "b2"}, {"user": "bob", "mailbox": "*", "backend": "b3"}]
COMMANDS = {"list": b'LIST "" "*"', "lsub": b'LSUB "" "*"', "status": b"STATUS Far (MESSAGES)",
            "copy": b"UID COPY 1:* Far"}
WORK = [f"work-{i}@t" for i in range(10)]


def stopped_session(proxy_factory, fleet):
    seed(fleet["b1"], "carol", "Work", WORK)
    seed(fleet["b2"], "carol", "Far", [])
    seed(fleet["b3"], "bob", "INBOX", ["bob-1@t"])
    proxy = proxy_factory(CONFIG, rules=RULES)
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    assert w.cmd(b"t1", b"STATUS Far (MESSAGES)")[-1].startswith(b"t1 OK")  # a connection to b2
    assert w.cmd(b"t2", b"SELECT Work")[-1].startswith(b"t2 OK")
    return proxy, w


@pytest.mark.parametrize("after", ["cont", "kill"])
@pytest.mark.parametrize("what", list(COMMANDS))
def test_a_stopped_backend_gets_its_client_an_answer(proxy_factory, fleet, what, after):
    proxy, w = stopped_session(proxy_factory, fleet)
    b2 = fleet["b2"]
    group = os.getpgid(b2.pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        w.send(b"t3 " + COMMANDS[what] + b"\r\n")
        got = heard(w, b"t3", T + 40)
        assert got and got[-1].startswith(b"t3 "), got  # an answer, not stayalive lines for ever
        assert w.cmd(b"t4", b"NOOP")[-1].startswith(b"t4 OK")
        bob_served(proxy)
    finally:
        if after == "cont":
            os.killpg(group, signal.SIGCONT)
        else:
            b2.kill()
            b2.start()
    listed = w.cmd(b"t5", b'LIST "" "*"')
    assert listed[-1].startswith(b"t5 OK") and any(b"Far" in x for x in listed), listed
    w.close()
    counts, where = census(fleet, "carol")
    copied = got[-1].startswith(b"t3 OK") and what == "copy"
    assert {i: counts[i] for i in WORK} == {i: 2 if copied else 1 for i in WORK}, (got[-1], dict(where))
