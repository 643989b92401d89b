"""Does a message arrive whole across servers? Flags, 30+ keywords, INTERNALDATE, bytes.

Messages with every system flag, 35 custom keywords of odd but legal atom characters, INTERNALDATEs
in odd zones, a bare-LF body, NUL bytes (APPENDed as a literal8), 8-bit headers, an empty body and a
20 MB one, put straight onto b1 (127.0.0.55), then carried to b2 (.56; .57 announces no MULTIAPPEND:
staged) by a cross-server UID COPY and UID MOVE, a RENAME across, the administrator's ``move`` and a
staged MULTIAPPEND of the same messages. FETCH (FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[]) straight
on the backends before and after, message by message.
"""

from __future__ import annotations

import collections
import re

import pytest
from imapwire import Wire
from movecheck import LEFT_TO_RECOVER, cli, faulty, journal_empty
from ownfleet import NO_MULTIAPPEND, own_dovecots, own_proxy

from referral_proxy.fleet import Dovecot

KEYWORDS = [b"$Label%d" % i for i in range(20)] + [
    b"a.b", b"x#y", b"$Junk!", b"k&r", b"it's", b"1+1=2", b"a,b", b"semi;colon", b"<angle>", b"q?",
    b"at@x", b"[open", b"pipe|", b"t~lde", b"back`tick", b"^caret", b"-dash_"]
SYSTEM = [b"\\Seen", b"\\Answered", b"\\Flagged", b"\\Draft", b"\\Deleted"]


def _messages() -> list[tuple[list[bytes], bytes, bytes]]:
    """(flags, INTERNALDATE, body) of each test message."""
    def msg(mid: str, rest: bytes) -> bytes:
        return b"Message-Id: <%s@fid>\r\n" % mid.encode() + rest
    big = msg("big", b"Subject: big\r\n\r\n" + b"".join(b"%07d ........................................................\r\n" % i
                                                         for i in range(20 * 1024 * 1024 // 66)))
    return [
        (SYSTEM, b"01-Jan-2020 00:00:00 +0000", msg("allflags", b"Subject: all\r\n\r\nall flags\r\n")),
        (SYSTEM[:1] + KEYWORDS, b"29-Feb-2024 23:59:59 -1200", msg("keywords", b"Subject: kw\r\n\r\nkw\r\n")),
        ([b"\\Draft"], b" 5-Mar-2021 12:34:56 +1345", msg("zone", b"Subject: zone\r\n\r\nodd zone\r\n")),
        ([], b"31-Dec-1999 23:59:59 +1400", msg("barelf", b"Subject: lf\n\nbare\nLF\nonly\n")),
        ([b"\\Answered"], b"15-Jul-2010 01:02:03 -0930", msg("nul", b"Subject: nul\r\n\r\na\x00b\x00\x00c\r\n")),
        ([b"$Label1"], b"10-Oct-2010 10:10:10 +0530", msg("8bit", "Subject: Grüße aus Köln\r\nFrom: Jérôme "
                                                                   "<j@x>\r\n\r\nçà\r\n".encode())),
        ([b"\\Flagged"], b"02-Feb-2002 02:02:02 +0000", b"\r\n"),  # Dovecot: "Can't save a zero byte message"
        ([b"\\Seen", b"$Label2"], b"07-Jun-2019 07:07:07 -0000", big),
    ]


@pytest.fixture
def ffleet():
    with own_dovecots("fid", 55) as backends:
        yield backends


def _append_all(conn_send, tag: bytes, box: bytes, msgs, binary: bool) -> None:
    parts = [tag + b" APPEND " + box]
    for flags, date, data in msgs:
        lit = b"~{%d+}" % len(data) if binary and b"\x00" in data else b"{%d+}" % len(data)
        parts.append(b" (" + b" ".join(flags) + b") \"" + date + b"\" " + lit + b"\r\n" + data)
    conn_send(b"".join(parts) + b"\r\n")


def _put(d: Dovecot, box: str, msgs) -> None:
    w = Wire(d.host, d.port, timeout=300)
    w.login("alice", "secret")
    if box != "INBOX":
        assert w.cmd(b"c", b"CREATE " + box.encode())[-1].startswith(b"c OK")
    _append_all(w.send, b"a", box.encode(), msgs, binary=True)
    reply = w.until_tagged(b"a")
    assert reply[-1].startswith(b"a OK"), reply
    w.close()


_META = re.compile(rb"FLAGS \(([^)]*)\)|INTERNALDATE \"([^\"]*)\"|RFC822\.SIZE (\d+)")


def snapshot(d: Dovecot, box: str) -> list[tuple]:
    """(sorted flags, INTERNALDATE, RFC822.SIZE, BODY[]) of each message, sorted (UIDs aside)."""
    with d.client("alice", timeout=300) as m:
        typ, data = m.select('"%s"' % box, readonly=True)
        assert typ == "OK", data
        if data == [b"0"]:
            return []
        typ, data = m.uid("FETCH", "1:*", "(FLAGS INTERNALDATE RFC822.SIZE BODY.PEEK[])")
        assert typ == "OK"
    out = []
    for item in data:
        if not isinstance(item, tuple):
            continue
        meta = item[0]
        flags = date = size = None
        for f, dt, sz in _META.findall(meta):
            flags = f if f else flags
            date = dt if dt else date
            size = sz if sz else size
        fl = tuple(sorted(x for x in (flags or b"").split() if x != b"\\Recent"))
        out.append((fl, date, size, item[1]))
    return sorted(out, key=lambda t: (t[2], t[3]))


def _run(proxy, *commands: bytes) -> Wire:
    """alice logged in to *proxy*, each of *commands* answered OK."""
    w = Wire(proxy.host, proxy.port, timeout=300)
    w.login("alice", "secret")
    for command in commands:
        reply = w.cmd(b"t", command)
        assert reply[-1].startswith(b"t OK"), (command, reply)
    return w


def _describe(before, after) -> str:
    lines = [f"{len(before)} before, {len(after)} after"]
    for a, b in zip(before, after):
        for i, what in enumerate(("flags", "date", "size", "body")):
            if a[i] != b[i]:
                lines.append(f"{a[3][:40]!r}: {what} {str(a[i])[:200]} -> {str(b[i])[:200]}")
    return "\n".join(lines)


def test_messages_arrive_whole_across_servers(proxy_factory, ffleet):
    msgs = _messages()
    for box in ("F1", "F2", "F3", "F4"):
        _put(ffleet["b1"], box, msgs)
    before = snapshot(ffleet["b1"], "F1")
    assert len(before) == len(msgs)
    assert any(b"a\x80b\x80\x80c" in m[3] for m in before)  # BODY[]: Dovecot sends each stored NUL as 0x80
    assert len(KEYWORDS) >= 35 and any(len(m[0]) == len(KEYWORDS) + 1 for m in before)  # every keyword kept
    proxy = own_proxy(proxy_factory, ffleet)
    w = _run(proxy, b"CREATE Q/Copy", b"CREATE Q/Move", b"CREATE S/Staged", b"SELECT F1", b"UID COPY 1:* Q/Copy",
             b"SELECT F2", b"UID MOVE 1:* Q/Move", b"UNSELECT", b"RENAME F3 Q/Renamed")
    moved = cli("move", "--config", str(proxy.config_path), "alice", "F4", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    # a client's MULTIAPPEND of the same messages to a backend without MULTIAPPEND: staged
    _append_all(w.send, b"a", b"S/Staged", msgs, binary=True)
    staged = w.until_tagged(b"a")
    w.close()
    found = {}
    for where, d, box in (("COPY", "b2", "Q/Copy"), ("MOVE", "b2", "Q/Move"), ("RENAME", "b2", "Q/Renamed"),
                          ("admin move", "b2", "F4"), ("source after COPY", "b1", "F1"),
                          ("staged MULTIAPPEND", "b3", "S/Staged")):
        after = snapshot(ffleet[d], box)
        if after != before:
            found[where] = _describe(before, after)
    assert staged[-1].startswith(b"a OK"), staged
    assert journal_empty(proxy)
    assert not found, "\n".join(f"{k}: {v}" for k, v in found.items())


def _binaries(d: Dovecot, box: str) -> list[bytes]:
    """``BINARY.PEEK[]`` of each message of *box*, in UID order: the stored bytes, NULs included, of a
    message without a Content-Transfer-Encoding to decode (``BODY[]`` shows each NUL as 0x80)."""
    w = Wire(d.host, d.port, timeout=120)
    w.login("alice", "secret")
    assert w.cmd(b"e", b"EXAMINE " + box.encode())[-1].startswith(b"e OK")
    w.send(b"f UID FETCH 1:* (BINARY.PEEK[])\r\n")
    out = []
    while not (line := w.line()).startswith(b"f "):
        if m := re.search(rb"~?\{(\d+)\}\r\n$", line):
            out.append(w.read_exact(int(m.group(1))))
    w.close()
    assert line.startswith(b"f OK") or b"No messages" in line, line
    return out


def _boxes(d: Dovecot) -> list[str]:
    w = Wire(d.host, d.port, timeout=60)
    w.login("alice", "secret")
    names = [re.search(rb' "/" "?([^"\r]*)"?\r\n', x).group(1).decode() for x in w.cmd(b"l", b'LIST "" "*"')[:-1]
             if b"\\Noselect" not in x and b"\\NonExistent" not in x]
    w.close()
    return names


def _census(backends) -> collections.Counter:
    """Every message of alice on *backends*, by its stored bytes (BINARY.PEEK[])."""
    return collections.Counter(m for d in backends for box in _boxes(d) for m in _binaries(d, box))


MIXED = (b"Message-Id: <mixed@fid>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n\r\n"
         b"--XX\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nYQBiAGM=\r\n"
         b"--XX\r\nContent-Type: application/octet-stream\r\n\r\nx\x00y\x00z\r\n--XX--\r\n")


def _nul_messages() -> list[tuple[list[bytes], bytes, bytes]]:
    """Messages holding NUL bytes (no Content-Transfer-Encoding; one with 8-bit headers, one declaring
    ``binary``: BODY[] shows that one as base64), an 8-bit one whose BODY[] holds 0x80 without a NUL
    (an em dash), a base64 one and a plain one around them."""
    nul8 = "Message-Id: <nul8@fid>\r\nSubject: Grüße\r\n\r\nÀ\x00—\x00\x80\x00\r\n".encode()
    declared = b"Message-Id: <declared@fid>\r\nContent-Transfer-Encoding: binary\r\n\r\np\x00q\r\n"
    dash = "Message-Id: <dash@fid>\r\nSubject: a — b\r\n\r\nÀ la — carte\r\n".encode()
    b64 = b"Message-Id: <b64@fid>\r\nContent-Transfer-Encoding: base64\r\n\r\nYQBiAGM=\r\n"
    plain = b"Message-Id: <plain@fid>\r\n\r\nplain\r\n"
    nuls = [m for m in _messages() if b"\x00" in m[2]]
    return [([], b"01-Jan-2020 00:00:00 +0000", plain), *nuls, ([b"\\Seen"], b"02-Jan-2020 00:00:00 +0000", nul8),
            ([], b"03-Jan-2020 00:00:00 +0000", dash), ([], b"04-Jan-2020 00:00:00 +0000", declared),
            ([], b"05-Jan-2020 00:00:00 +0000", b64)]


def test_nul_bytes_stay_nul_bytes_across_servers(proxy_factory, ffleet):
    """Seen in round 10: a COPY across stored 0x80 for each NUL (read by BODY.PEEK[]). Now every way
    across keeps the stored bytes (a 20 MB message too); BODY[] (what the journal hashes) is the same on
    both sides too."""
    big = b"Message-Id: <bignul@fid>\r\n\r\n" + b"".join(b"%07d\x00.......\x80........\r\n" % i for i in range(20 * 2**20 // 26))
    msgs = [*_nul_messages(), ([b"\\Seen"], b"06-Jan-2020 00:00:00 +0000", big)]  # 20 MB, a NUL in each line
    for box in ("N1", "N2", "N3", "N4"):
        _put(ffleet["b1"], box, msgs)
    before, body = _binaries(ffleet["b1"], "N1"), snapshot(ffleet["b1"], "N1")
    assert b"a\x00b\x00\x00c" in before[1] and len(before) == len(msgs)
    proxy = own_proxy(proxy_factory, ffleet)
    _run(proxy, b"CREATE Q/Copy", b"CREATE Q/Move", b"SELECT N1", b"UID COPY 1:* Q/Copy",
         b"SELECT N2", b"UID MOVE 1:* Q/Move", b"UNSELECT", b"RENAME N3 Q/Renamed").close()
    moved = cli("move", "--config", str(proxy.config_path), "alice", "N4", "b2")
    assert moved.returncode == 0, moved.stdout + moved.stderr
    for box in ("Q/Copy", "Q/Move", "Q/Renamed", "N4"):
        assert _binaries(ffleet["b2"], box) == before, box
        assert snapshot(ffleet["b2"], box) == body, box
    assert _binaries(ffleet["b1"], "N1") == before and journal_empty(proxy)


@pytest.mark.parametrize("how, step", [("MOVE", "move-appending:1"), ("MOVE", "move-appending:2"),
                                       ("MOVE", "move-appended:1"), ("MOVE", "move-expunging:1"),
                                       ("move", "copying:1"), ("move", "copied:1"), ("move", "committed:1")])
def test_nul_bytes_survive_a_killed_move_and_recover(proxy_factory, ffleet, how, step):
    """Killed at each step with messages holding NULs in the batch, then ``recover``: every message
    once, by its stored bytes, NULs intact (the journal's hashes are of BODY[], the same on both sides)."""
    msgs = _nul_messages()
    _put(ffleet["b1"], "K", msgs)
    want = _census([ffleet["b1"]])
    assert len(want) == len(msgs)
    proxy = own_proxy(proxy_factory, ffleet, **({"command": faulty("--kill-at", step)} if how == "MOVE" else {}),
                      map=LEFT_TO_RECOVER["map"])
    if how == "MOVE":
        w = _run(proxy, b"CREATE Q/K", b"SELECT K")
        w.send(b"m UID MOVE 1:* Q/K\r\n")
        assert w.closed(60), "the proxy was not killed at " + step
        proxy.process.wait(10)
    else:
        killed = cli("move", "--config", str(proxy.config_path), "alice", "K", "b2", command=faulty("--kill-at", step))
        assert killed.returncode != 0 and "killed at" in killed.stderr, killed.stdout + killed.stderr
    recovered = cli("recover", "--config", str(proxy.config_path))
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    assert _census(ffleet.values()) == want


def test_a_destination_without_binary_gets_the_copy_it_can_hold(proxy_factory):
    """b2 announces no BINARY: no literal8 is sent there; the copy is made as before (each NUL as 0x80)."""
    caps = NO_MULTIAPPEND.replace("QUOTA BINARY", "QUOTA MULTIAPPEND")
    with own_dovecots("fnb", 58, extra={"b2": caps}) as backends:
        msgs = _nul_messages()
        _put(backends["b1"], "N", msgs)
        body = snapshot(backends["b1"], "N")
        _run(own_proxy(proxy_factory, backends), b"CREATE Q/N", b"SELECT N", b"UID COPY 1:* Q/N").close()
        assert snapshot(backends["b2"], "Q/N") == body
        assert b"a\x80b\x80\x80c" in _binaries(backends["b2"], "Q/N")[1]


@pytest.mark.xfail(strict=True, reason="BINARY[] decodes its base64 part and BODY[] shows its NULs as 0x80: "
                                       "neither is the stored message; not mended (round 11)")
def test_nul_bytes_beside_a_base64_part(proxy_factory, ffleet):
    _put(ffleet["b1"], "M", [([], b"01-Jan-2020 00:00:00 +0000", MIXED)])
    _run(own_proxy(proxy_factory, ffleet), b"CREATE Q/M", b"SELECT M", b"UID COPY 1:* Q/M").close()
    stored = ffleet["b2"].client("alice")
    with stored as m:
        m.select("Q/M", readonly=True)
        typ, data = m.uid("FETCH", "1", "(BINARY.PEEK[2])")
    assert b"x\x00y\x00z" in data[0][1]
