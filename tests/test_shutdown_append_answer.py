"""A graceful stop (SIGTERM) right after a MULTIAPPEND's last byte (hostile round h1).

The backend has the whole command and commits it; direct Dovecot, sent SIGTERM at that moment,
answers the APPEND (``a OK [APPENDUID ...]``) and then says ``* BYE Server shutting down``. The
proxy said BYE and closed at once: the messages were saved, the client never heard so, and a
client that APPENDs again on its next connection saves every message twice. Judged on the backend:
the messages are there once if and only if the client was answered OK, before the BYE."""

from __future__ import annotations

import signal
import time

import pytest
from imapwire import Wire
from movecheck import body, census

pytestmark = pytest.mark.usefixtures("clean_mail")

SIZE = 30_000_000  # Dovecot takes a moment to save it: the stop comes before its answer


@pytest.mark.parametrize("run", range(2))
def test_an_append_sent_whole_before_sigterm_is_answered_before_the_bye(proxy_factory, fleet, run):
    proxy = proxy_factory()
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("carol")
    first, second = body("stop-1@t", SIZE), body("stop-2@t", SIZE)
    w.send(b"a APPEND INBOX {%d+}\r\n" % len(first) + first + b" {%d+}\r\n" % len(second) + second)
    time.sleep(1.5)  # both literals on their way to the backend
    w.send(b"\r\n")  # the command's end: from now on the backend may commit it
    proxy.process.send_signal(signal.SIGTERM)
    lines = []
    try:
        while True:
            lines.append(w.line())
    except (ConnectionError, OSError):
        pass
    w.close()
    proxy.process.wait(30)
    counts, where = census(fleet, "carol")
    saved = [counts["stop-1@t"], counts["stop-2@t"]]
    answers = [line[:80] for line in lines if line.startswith(b"a ")]
    bye = next((i for i, line in enumerate(lines) if line.startswith(b"* BYE")), len(lines))
    if saved == [1, 1]:
        assert answers and answers[0].startswith(b"a OK"), (answers, lines[:3], dict(where))
        assert lines.index(next(x for x in lines if x.startswith(b"a "))) < bye, lines[:3]
    else:
        assert saved == [0, 0], dict(where)
        assert not answers or not answers[0].startswith(b"a OK"), answers
