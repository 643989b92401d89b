"""Real Dovecots of a test's own (b1 b2 b3 on consecutive loopback addresses; b3 announces no
MULTIAPPEND, so a MULTIAPPEND there is staged) and a proxy in front of them: what the tests of a
destination that refuses (test_quota_refusals), of message fidelity (test_message_fidelity) and of a
Latin-1 user (test_latin1_moves) share."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

from conftest import dovecot_root

from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER, Dovecot

USERS = {"alice": "secret"}
NO_MULTIAPPEND = ("protocol imap {\n  imap_capability = IMAP4rev1 SASL-IR ID ENABLE IDLE LITERAL+ UIDPLUS UNSELECT "
                  "NAMESPACE CHILDREN MOVE QUOTA BINARY\n}\n")
RULES = [{"mailbox": "Q", "backend": "b2"}, {"mailbox": "Q/*", "backend": "b2"}, {"mailbox": "S/*", "backend": "b3"}]


@contextlib.contextmanager
def own_dovecots(prefix: str, first_host: int, names: Sequence[str] = ("b1", "b2", "b3"),
                 users: Mapping[str, str] = USERS, extra: Mapping[str, str] | None = None) -> Iterator[dict[str, Dovecot]]:
    """*names* on 127.0.0.<first_host>.. (no userdb fields; *extra*: each one's dovecot.conf lines, by
    default NO_MULTIAPPEND for b3), started; stopped at the end."""
    extra = {"b3": NO_MULTIAPPEND} if extra is None else extra
    backends: dict[str, Dovecot] = {}
    try:
        for i, name in enumerate(names):
            d = Dovecot(f"{prefix}{name}", f"127.0.0.{first_host + i}", dovecot_root() / f"{prefix}{name}",
                        users=users, user_fields={}, extra_config=extra.get(name, ""))
            d.start()
            backends[name] = d
        yield backends
    finally:
        for d in backends.values():
            d.stop()


def own_proxy(proxy_factory, backends: Mapping[str, Dovecot], **kw):
    """A proxy in front of *backends* (master user for moves), Q and Q/* on b2, S/* on b3, no keepalive
    (a backend connection logged in before a quota changed would keep the old one)."""
    table = {n: {"endpoint": d.endpoint, "url": d.url, "tls": "none", "master_user": MASTER_USER,
                 "master_password": MASTER_PASSWORD} for n, d in backends.items()}
    config = {"backends": table, "map": {"default": "b1", **kw.pop("map", {})}}  # map: more [map] settings
    return proxy_factory(config, backend_keepalive=0, rules=RULES, **kw)
