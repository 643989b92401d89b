"""IMAP URLs (RFC 5092) for RFC 2193 mailbox referrals and RFC 2221 login referrals.

A referral names the backend that owns a mailbox as
``imap://<enc-user>;AUTH=*@<host>[:<port>]/<enc-mailbox>``. RFC 5092 carries the
mailbox name as percent-encoded UTF-8, not as the modified UTF-7 a client
sends, so :func:`imap_url` converts it, and :func:`parse_imap_url` (for tests
and for clients that follow referrals) gives back the Unicode name. Only the
parts a referral uses are understood; a trailing ``;UIDVALIDITY=``, ``/;UID=``
or ``?search`` after the mailbox is accepted and ignored.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import quote, unquote_to_bytes

from . import mutf7

__all__ = ["imap_url", "parse_imap_url", "has_dot_segment"]

# quote() percent-encodes with upper-case hex and never encodes the unreserved
# ALPHA / DIGIT / "-" / "." / "_" / "~"; these are the other characters RFC 5092
# leaves literal: achar = unreserved / sub-delims-sh / "&" / "=" / "~", with
# sub-delims-sh = "!" / "$" / "'" / "(" / ")" / "*" / "+" / ",";
# bchar = achar / ":" / "@" / "/".
_ACHAR_SAFE = "!$'()*+,&="
_BCHAR_SAFE = _ACHAR_SAFE + ":@/"
_ACHARS = re.compile(r"(?:[A-Za-z0-9\-._~!$'()*+,&=]|%[0-9A-Fa-f]{2})+")
_BCHARS = re.compile(r"(?:[A-Za-z0-9\-._~!$'()*+,&=:@/]|%[0-9A-Fa-f]{2})+")
# A host name or IPv4 address. RFC 3986's reg-name also allows sub-delims and
# percent-encoding, which no IMAP server name uses and which would make
# "user;AUTH=*host" (a URL missing its "@") parse as a host.
_REG_NAME = re.compile(r"[A-Za-z0-9\-._~]+")
_URL = re.compile(r"imap://([^/?#]*)(/[^?#]*)?(?:\?[^#]*)?\Z", re.IGNORECASE | re.DOTALL)
_AUTH = re.compile(r";AUTH=(.*)\Z", re.IGNORECASE | re.DOTALL)
_PORT = re.compile(r"[0-9]*")
# The mailbox ends where ";UIDVALIDITY=..." or "/;UID=..." begins.
_MAILBOX_REF = re.compile(r"([^;]*?)(?:/?;.*)?\Z", re.DOTALL)


def imap_url(
    host: str, port: int | None, user: str | None, mailbox: bytes | None, *, auth: str = "*"
) -> str:
    """The referral URL for ``mailbox`` (as the client sent it) on ``host``.

    ``mailbox`` None gives the server URL of a login referral (RFC 2221). A
    name that is not valid modified UTF-7 has its raw bytes percent-encoded,
    so a referral is still possible for whatever the client typed.
    ValueError for an empty user, mailbox or AUTH, a bad host or port, a name with a
    ``.`` or ``..`` segment (has_dot_segment).
    """
    url = "imap://"
    if user is not None:
        if not user or not auth:
            raise ValueError("user and AUTH type must not be empty")
        url += quote(user.encode("utf-8", "surrogateescape"), safe=_ACHAR_SAFE)  # a non-UTF-8 login name too
        url += ";AUTH=" + quote(auth.encode("utf-8"), safe=_ACHAR_SAFE) + "@"
    url += _host(host)
    if port is not None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range: {port}")
        url += f":{port:d}"
    url += "/"
    if mailbox is not None:
        if not mailbox:
            raise ValueError("mailbox name must not be empty")
        if has_dot_segment(mailbox):
            raise ValueError(f"a dot segment would resolve to another mailbox: {mailbox!r}")
        try:
            data = mutf7.decode(mailbox).encode("utf-8")
        except ValueError:
            data = bytes(mailbox)
        url += quote(data, safe=_BCHAR_SAFE)
    return url


def has_dot_segment(mailbox: bytes) -> bool:
    """True if a ``/``-separated segment of *mailbox* is ``.`` or ``..``: no URL carries such a
    name, since resolving it (RFC 3986 5.2: remove_dot_segments, applied to every reference)
    gives another path, ``imap://h/Shared/x/..`` is ``imap://h/Shared/``, and ``%2E`` is the
    same as ``.`` once normalised (RFC 3986 6.2.2.2)."""
    return any(segment in (b".", b"..") for segment in mailbox.split(b"/"))


def _host(host: str) -> str:
    """``host`` as the URL's host part: an IPv6 address bracketed, anything else checked."""
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    if bracketed or ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address: {host!r}") from None
        return "[" + host.replace("%", "%25") + "]"
    if _REG_NAME.fullmatch(host) is None:
        raise ValueError(f"invalid host: {host!r}")
    return host


def parse_imap_url(url: str) -> tuple[str | None, str, int | None, str | None]:
    """(user, host, port, mailbox) of an IMAP URL; ValueError if it is not one.

    The user and the mailbox come back percent-decoded as Unicode (a user's bytes that are not
    UTF-8 as surrogateescape; the mailbox is not re-encoded to modified UTF-7: that is the
    caller's choice); user, port and mailbox are None when absent. The scheme and ";AUTH=" match in any
    case, as in RFC 2193's examples ("IMAP://user;AUTH=*@SERVER2/REMOTE").
    """
    match = _URL.match(url)
    if match is None:
        raise ValueError(f"not an IMAP URL: {url!r}")
    authority, path = match.group(1), match.group(2)
    userinfo, at, hostport = authority.rpartition("@")
    user = _parse_userinfo(userinfo) if at else None
    host, port = _parse_hostport(hostport)
    mailbox = None
    if path and path != "/":
        ref = _MAILBOX_REF.match(path[1:])
        assert ref is not None  # the pattern matches any string
        if ref.group(1):
            mailbox = _unquote(ref.group(1), _BCHARS, "mailbox")
    return user, host, port, mailbox


def _parse_userinfo(userinfo: str) -> str | None:
    """The user of ``enc-user [";AUTH=" auth]``; None for ";AUTH=..." alone."""
    enc_user, semi, rest = userinfo.partition(";")
    if semi:
        auth = _AUTH.match(semi + rest)
        if auth is None or _ACHARS.fullmatch(auth.group(1)) is None:
            raise ValueError(f"invalid IMAP userinfo: {userinfo!r}")
        if not enc_user:
            return None
    return _unquote(enc_user, _ACHARS, "user", "surrogateescape")


def _parse_hostport(hostport: str) -> tuple[str, int | None]:
    """(host, port) of ``host [":" port]``, an IPv6 host unbracketed."""
    if hostport.startswith("["):
        close = hostport.find("]")
        if close < 0:
            raise ValueError(f"unterminated IPv6 address: {hostport!r}")
        host = hostport[1:close].replace("%25", "%")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address: {host!r}") from None
        rest = hostport[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ValueError(f"junk after IPv6 address: {hostport!r}")
        digits = rest[1:]
    else:
        host, _, digits = hostport.partition(":")
        if _REG_NAME.fullmatch(host) is None:
            raise ValueError(f"invalid host: {host!r}")
    if _PORT.fullmatch(digits) is None:
        raise ValueError(f"invalid port: {digits!r}")
    if not digits:
        return host, None
    port = int(digits)
    if port > 65535:
        raise ValueError(f"port out of range: {port}")
    return host, port


def _unquote(text: str, grammar: re.Pattern[str], what: str, errors: str = "strict") -> str:
    """Percent-decode ``text`` after checking it against ``grammar``; UTF-8 required, unless *errors*
    says otherwise (a login name: its bytes as they were, surrogateescape, as auth.py reads LOGIN)."""
    if grammar.fullmatch(text) is None:
        raise ValueError(f"invalid {what} in IMAP URL: {text!r}")
    try:
        return unquote_to_bytes(text).decode("utf-8", errors)
    except UnicodeDecodeError:
        raise ValueError(f"{what} in IMAP URL is not UTF-8: {text!r}") from None
