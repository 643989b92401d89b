"""A map rule written in UTF-8 in the TOML meets names in modified UTF-7 (what IMAP4rev1 clients
send) and in UTF-8 (clients that enabled UTF8=ACCEPT, RFC 6855): one mailbox, one route.

Compared as sent, the rule ``Café/*`` -> b3 took ``Caf&AOk-/seven`` (the same mailbox, in
modified UTF-7) to the default backend: created there, and a MOVE "across" to it from INBOX
stayed on b1. Judged by a census of the backends."""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, seed

from referral_proxy.config import MapConfig, RuleConfig
from referral_proxy.fleet import MASTER_PASSWORD, MASTER_USER
from referral_proxy.routing import MailboxMap

RULES = [{"mailbox": "Café/*", "backend": "b3"}]
MASTERS = {"backends": {b: {"master_user": MASTER_USER, "master_password": MASTER_PASSWORD} for b in ("b1", "b2", "b3")}}


def test_a_rule_in_utf8_or_modified_utf7_routes_both_forms_of_a_name_alike():
    rules = (RuleConfig("Café/*", ("b3",)), RuleConfig("&ZeVnLIqe-/*", ("b2",)), RuleConfig("R&D/*", ("b4",)))
    mailbox_map = MailboxMap(MapConfig(default="b1", rules=rules))
    for name, backend in [("Caf&AOk-/x", "b3"), ("Café/x", "b3"), ("日本語/x", "b2"), ("&ZeVnLIqe-/x", "b2"),
                          ("R&-D/x", "b4"), ("Caf&AOk-", "b1"), ("a&b/x", "b1"), ("Cafe/x", "b1")]:
        assert mailbox_map.lookup("carol", name).primary == backend, name
    assert "b3" in mailbox_map.backends_under("carol", "Caf&AOk-")
    assert "b2" in mailbox_map.backends_under("carol", "日本語")


@pytest.mark.usefixtures("clean_mail")
def test_a_modified_utf7_client_creates_and_moves_into_the_mailbox_the_utf8_rule_places(proxy_factory, fleet):
    seed(fleet["b1"], "carol", "INBOX", ["in-0@t", "in-1@t"])
    proxy = proxy_factory(MASTERS, rules=RULES)
    w = Wire(proxy.host, proxy.port)
    w.login("carol")
    assert w.cmd(b"c", b'CREATE "Caf&AOk-/seven"')[-1].startswith(b"c OK")
    assert w.cmd(b"s", b"SELECT INBOX")[-1].startswith(b"s OK")
    answer = w.cmd(b"m", b'UID MOVE 1 "Caf&AOk-/seven"')
    assert answer[-1].startswith(b"m OK"), answer
    assert w.cmd(b"e", b"ENABLE UTF8=ACCEPT")[-1].startswith(b"e OK")
    status = w.cmd(b"t", b'STATUS "Caf&AOk-/seven" (MESSAGES)')  # what Dovecot 2.3 takes: modified UTF-7
    assert status[0] == b"* STATUS Caf&AOk-/seven (MESSAGES 1)\r\n", status
    w.close()
    counts, where = census(fleet, "carol")
    assert dict(counts) == {"in-0@t": 1, "in-1@t": 1}, where
    assert where["in-0@t"] == [("b3", "Caf&AOk-/seven")] and where["in-1@t"] == [("b1", "INBOX")], where
