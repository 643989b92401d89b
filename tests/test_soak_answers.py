"""The soak's count of its clients' answers (tests/soakanswers.py): by outcome and response code, waits,
the summary lines that carry them (the old figures left as the lead's scripts grep them) and their totals."""

from __future__ import annotations

import imaplib
import re
import socket

import pytest
from movecheck import quote, seed
from soakanswers import SLOW, Answers, long_waits, outcome, parse
from soaktotals import totals


@pytest.mark.parametrize("typ, data, expected", [
    ("OK", [b"[COPYUID 5 1 2] Copy completed."], "OK"),
    ("NO", [b"[INUSE] carol's Work is being moved"], "NO[INUSE]"),
    ("NO", [b"[TRYCREATE] Mailbox doesn't exist: Nope"], "NO[TRYCREATE]"),
    ("NO", [b"[UNAVAILABLE] Mail server temporarily unavailable"], "NO[UNAVAILABLE]"),
    ("NO", [b"[REFERRAL imap://carol;AUTH=*@b2/Work] Remote mailbox"], "NO[REFERRAL]"),
    ("NO", [b"Mailbox was deleted under us"], "NO"),
    ("NO", [None], "NO"),
])
def test_an_answer_is_counted_by_its_response_code(typ, data, expected):
    assert outcome(typ, data) == expected


@pytest.mark.parametrize("raised, expected", [
    (imaplib.IMAP4.abort("socket error: EOF"), "cut"),
    (ConnectionResetError(104, "reset"), "cut"),
    (EOFError(), "cut"),
    (TimeoutError("timed out"), "timeout"),
    (imaplib.IMAP4.error("UID command error: BAD [b'Error in IMAP command UID COPY: Invalid uidset']"), "BAD"),
    (imaplib.IMAP4.error("command: UID => unexpected response: b'?'"), "error"),
])
def test_a_command_imaplib_raised_on_is_counted_as_cut_timeout_or_bad(raised, expected):
    answers = Answers()

    def call():
        raise raised

    with pytest.raises(type(raised)):
        answers.ask("MOVE", call)
    assert dict(answers.counts) == {("MOVE", expected): 1}


def test_waits_keep_the_longest_and_count_the_slow_ones():
    answers = Answers()
    for waited in (0.01, SLOW + 0.5, 10.03, 0.2):
        answers.record("MOVE", "NO[INUSE]" if waited > SLOW else "OK", waited)
    answers.record("COPY", "cut", SLOW + 1)
    answers.record("RENAME", "OK", 0.1)
    text = answers.text()
    assert text == ("answers: COPY cut 1 (max 6.0 s, 1 over 5 s); MOVE OK 2 NO[INUSE] 2 (max 10.0 s, 2 over 5 s); "
                    "RENAME OK 1 (max 0.1 s, 0 over 5 s)")
    back = parse("seed 3: ...; lost 0, duplicated 0, unreachable 0; " + text)
    assert back.counts == answers.counts and back.slow == answers.slow
    assert back.longest == {"COPY": 6.0, "MOVE": 10.0, "RENAME": 0.1}
    assert Answers().text() == "answers: none" and parse("answers: none").counts == {}


def test_the_summary_lines_keep_their_figures_for_the_lead_s_scripts():
    """Figures.line() and the "1 runs" line: "lost N, duplicated N, ..." unchanged and first, the answers after;
    /tmp/totals.sh's regular expressions (the first match of each word) read the same figures as before."""
    import collections

    from soak import Figures

    answers = Answers()
    answers.record("COPY", "NO[TRYCREATE]", 0.02)
    answers.record("OLDMOVE-EXPUNGE", "OK", 0.01)
    figures = Figures(5, collections.Counter({"copy OK": 3, "kill b1": 1}), ["a@x"], [], [], 40, 1, answers=answers)
    assert figures.line() == ("seed 5: 3 operations, 1 kills, 40 messages counted; "
                              "lost 1, duplicated 0, unreachable 0; "
                              "answers: COPY NO[TRYCREATE] 1 (max 0.0 s, 0 over 5 s); "
                              "OLDMOVE-EXPUNGE OK 1 (max 0.0 s, 0 over 5 s)")
    runs = [f"seed {s} rc=0 1 runs, 100 operations, 4 kills (kill b1: 4), 50 messages counted: lost {s % 2}, "
            f"duplicated 0, unreachable 0, proxy faults 0; {answers.text()}" for s in (1, 2)]
    runs.append("seed 3 rc=1 1 runs, 7 operations, 1 kills (kill proxy: 1), 9 messages counted: lost 0, "
                "duplicated 2, unreachable 0, proxy faults 1")  # a line of before: no answers
    runs.append("STOP at 3")
    old = {word: sum(int(re.search(word + r" (\d+)", line)[1]) for line in runs if "1 runs" in line)
           for word in ("lost", "duplicated", "unreachable", "faults")}
    assert old == {"lost": 1, "duplicated": 2, "unreachable": 0, "faults": 1}
    assert totals(runs) == ["runs 3 ops 207 kills 9 lost 1 dup 2 unreachable 0 faults 1",
                            "answers: COPY NO[TRYCREATE] 2 (max 0.0 s, 0 over 5 s); "
                            "OLDMOVE-EXPUNGE OK 2 (max 0.0 s, 0 over 5 s)"]


def test_dovecot_s_own_answers_are_counted_by_code(fleet, clean_mail):
    """Against a real Dovecot through imaplib, as the soak's clients ask: OK, NO [TRYCREATE], BAD, cut."""
    b1 = fleet["b1"]
    seed(b1, "carol", "Work", ["w1@t", "w2@t"])
    answers = Answers()
    m = b1.client("carol")
    try:
        m.select(quote("Work"))
        answers.ask("COPY", lambda: m.uid("COPY", "1", quote("Work")))
        answers.ask("COPY", lambda: m.uid("COPY", "2", quote("Nope")))
        with pytest.raises(imaplib.IMAP4.error):
            answers.ask("MOVE", lambda: m.uid("MOVE", "x:y", quote("Work")))
        m.sock.shutdown(socket.SHUT_RDWR)  # (the soak's kills: the connection gone before the answer)
        with pytest.raises((imaplib.IMAP4.abort, OSError)):
            answers.ask("MOVE", lambda: m.uid("MOVE", "1", quote("INBOX")))
    finally:
        m.sock.close()
    assert dict(answers.counts) == {("COPY", "OK"): 1, ("COPY", "NO[TRYCREATE]"): 1, ("MOVE", "BAD"): 1,
                                    ("MOVE", "cut"): 1}
    assert [(c, t.split("]")[0]) for c, t in answers.refusals] == [("COPY", "NO [TRYCREATE"), ("MOVE", "BAD Error in IMAP command UID MOVE: Invalid uidset")]
    assert answers.refused().startswith("1x COPY NO [TRYCREATE] ")


def test_long_waits_names_each_with_the_backend_kills_before_it():
    """A soak's summary says which answer took long and whether a killed Dovecot's lock explains it."""
    history = [(100.0, -1, "KILL b3"), (102.5, 4, "MOVE m1 INBOX/Sub -> Shared"), (103.0, 1, "APPEND ['a'] -> INBOX"),
               (103.1, 1, "APPEND ['a'] -> INBOX: OK [None]"), (120.0, -1, "KILL proxy0"),
               (208.9, 4, "MOVE m1 INBOX/Sub -> Shared: OK [None]"), (300.0, 2, "RENAME A B"),
               (340.0, 2, "RENAME A B: NO [b'[INUSE] try again']")]
    assert long_waits(history, 30.0, 125.0) == [
        "c4 'MOVE m1 INBOX/Sub -> Shared' waited 106.4 s (OK [None]); backend kills around it: b3 -2.5 s",
        "c2 'RENAME A B' waited 40.0 s (NO [b'[INUSE] try again']); backend kills around it: none"]
