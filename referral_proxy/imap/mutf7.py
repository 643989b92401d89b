"""Modified UTF-7 mailbox names (RFC 3501 section 5.1.3), sans-I/O.

IMAP4rev1 mailbox names travel as 7-bit "modified UTF-7": printable US-ASCII
(0x20-0x7e) stands for itself, except "&", which is written "&-"; every other
character is UTF-16BE, base64-encoded with "," instead of "/" and no "="
padding, between "&" and "-". The proxy needs the Unicode form to build
RFC 5092 URLs (which carry UTF-8) and to compare names from different sources.

:func:`decode` is strict: anything an RFC 3501 encoder could not have produced
(8-bit or control bytes, a bad base64 run, a run that encodes printable
ASCII, an unpaired surrogate) raises ValueError, so the caller can fall back
to treating the name as opaque bytes. Two adjacent shifted runs
("&AOk-&AOk-") are decoded: the RFC does not forbid them and some servers
write them; but :func:`valid_name` refuses them, as Dovecot refuses such a
name ("Mailbox name is not valid mUTF-7": an encoder writes "&AOkA6Q-").
"""

from __future__ import annotations

import base64
import re

__all__ = ["decode", "decode_pattern", "encode", "valid_name", "shifts_a_line_break", "spare_bits_set"]

_AMP = 0x26
_DASH = 0x2D
# The modified base64 alphabet: standard base64 with "," in place of "/".
_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+,"
_B64_RUN = re.compile(rb"[A-Za-z0-9+,]*")
_ADJACENT_SHIFTS = re.compile(rb"&[A-Za-z0-9+,]+-&[A-Za-z0-9+,]")
# Runs of characters that are written literally / that must be shifted.
_RUNS = re.compile(r"[\x20-\x7e]+|[^\x20-\x7e]+")
_PRINTABLE = re.compile(r"[\x20-\x7e]")
# Bits left over in the last base64 character, by run length mod 8; lengths
# not listed cannot come from a whole number of UTF-16 code units.
_SPARE_BITS = {0: 0, 3: 2, 6: 4}


def decode(name: bytes) -> str:
    """The Unicode form of a modified UTF-7 mailbox name; ValueError if malformed."""
    out: list[str] = []
    i = 0
    size = len(name)
    while i < size:
        byte = name[i]
        if byte == _AMP:
            run = _B64_RUN.match(name, i + 1)
            assert run is not None  # "*" always matches
            end = run.end()
            if end >= size:
                raise ValueError(f"unterminated shift at offset {i}")
            if name[end] != _DASH:
                raise ValueError(f"invalid modified base64 byte at offset {end}")
            out.append(_decode_shift(run.group(), i) if end > i + 1 else "&")
            i = end + 1
        elif 0x20 <= byte <= 0x7E:
            start = i
            while i < size and 0x20 <= name[i] <= 0x7E and name[i] != _AMP:
                i += 1
            out.append(name[start:i].decode("ascii"))
        else:
            raise ValueError(f"byte 0x{byte:02x} at offset {i} must be shifted")
    return "".join(out)


def _decode_shift(run: bytes, offset: int) -> str:
    """The characters of one shifted run (between "&" and "-"), checked canonical."""
    spare = _SPARE_BITS.get(len(run) % 8)
    if spare is None:
        raise ValueError(f"shift at offset {offset} has an impossible length")
    # Python 3.11's base64 ignores non-zero spare bits; an encoder never sets them.
    if _ALPHABET.index(run[-1]) & ((1 << spare) - 1):
        raise ValueError(f"shift at offset {offset} has non-zero spare bits")
    padded = run.replace(b",", b"/") + b"=" * (-len(run) % 4)
    try:
        text = base64.b64decode(padded, validate=True).decode("utf-16-be")
    except UnicodeDecodeError:
        raise ValueError(f"shift at offset {offset} is not valid UTF-16") from None
    if _PRINTABLE.search(text) is not None:
        raise ValueError(f"shift at offset {offset} encodes printable ASCII")
    return text


_SHIFTED = re.compile(rb"&([A-Za-z0-9+,]+)-?")
_LINE_BREAK = re.compile(r"[\r\n]")


def shifts_a_line_break(name: bytes) -> bool:
    """Does a shifted run of *name* stand for CR or LF, read as leniently as any server might? Dovecot 2.3
    echoes a name it cannot find, decoded, in its NO text: a shifted CR LF ends that line there and what
    follows reads as a completion (probe 5, stop 48). (A shifted NUL Dovecot refuses itself, unechoed.)"""
    if b"&" not in name:
        return False
    for m in _SHIFTED.finditer(name):
        run = m.group(1).replace(b",", b"/")
        run = run[: len(run) - (len(run) % 4 == 1)]  # (a lone last character carries no whole byte)
        data = base64.b64decode(run + b"=" * (-len(run) % 4))
        if _LINE_BREAK.search(data[: len(data) // 2 * 2].decode("utf-16-be", "replace")):
            return True
    return False


def spare_bits_set(name: bytes) -> bool:
    """Does a shifted run of *name* end in a character with non-zero spare bits? Dovecot 2.3 ignores them:
    "&AMl-quipe" opens the mailbox "&AMk-quipe" (Équipe), which the map would route by its own spelling
    (probe v1, stop 52: the mail split over two backends). An encoder never writes them."""
    for m in _SHIFTED.finditer(name):
        run = m.group(1)
        if not m.group(0).endswith(b"-"):
            continue  # an unterminated shift: no name to Dovecot either
        spare = _SPARE_BITS.get(len(run) % 8, 0)
        if spare and _ALPHABET.index(run[-1]) & ((1 << spare) - 1):
            return True
    return False


def decode_pattern(pattern: bytes) -> str:
    """*pattern* read as Dovecot reads a LIST reference and pattern: 8-bit UTF-8 as it is if it
    holds no "&", else strict modified UTF-7 with no shift right after another (what an encoder
    never writes: "&AOk-&AOk-" is "&AOkA6Q-"); ValueError otherwise (Dovecot then matches the
    bytes as they are)."""
    if b"&" not in pattern:
        return pattern.decode("utf-8")
    if _ADJACENT_SHIFTS.search(pattern) is not None:
        raise ValueError("a shift right after another")
    return decode(pattern)


def encode(name: str) -> bytes:
    """The modified UTF-7 form of ``name``; ValueError if it holds a lone surrogate."""
    out = bytearray()
    for run in _RUNS.findall(name):
        if _PRINTABLE.match(run) is not None:
            out += run.replace("&", "&-").encode("ascii")
        else:
            data = base64.b64encode(run.encode("utf-16-be"))
            out += b"&" + data.rstrip(b"=").replace(b"/", b",") + b"-"
    return bytes(out)


def valid_name(name: bytes, *, utf8: bool = False) -> bool:
    """A mailbox name a server takes: modified UTF-7 with no shift right after another (Dovecot
    refuses "&AOk-&AOk-" in every command) and no shifted U+0000 ("&AAA-": Dovecot refuses it too, and
    no client could send the name an IMAP URL would carry), or, with *utf8* (a client that enabled
    UTF8=ACCEPT, RFC 6855), UTF-8 without control characters nor "&" (which starts a shift)."""
    try:
        return "\x00" not in decode(name) and _ADJACENT_SHIFTS.search(name) is None
    except ValueError:
        pass
    if not utf8 or b"&" in name or any(c < 0x20 or c == 0x7F for c in name):
        return False
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
