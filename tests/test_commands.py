"""The declared command table: complete, consistent, and the source of the announced capabilities."""

from __future__ import annotations

from referral_proxy.capabilities import post_login
from referral_proxy.commands import CAPABILITIES, COMMANDS, NOT_RELAYED, PROXY_OWN, Routing, State, relayable
from referral_proxy.imap.grammar import Slot
from referral_proxy.session import _COLLABORATORS, _DISPATCH, _STATELESS, ClientSession

DOVECOT_2_3 = (
    "IMAP4rev1 SASL-IR LOGIN-REFERRALS ID ENABLE IDLE SORT SORT=DISPLAY THREAD=REFERENCES THREAD=REFS "
    "THREAD=ORDEREDSUBJECT MULTIAPPEND URL-PARTIAL CATENATE UNSELECT CHILDREN NAMESPACE UIDPLUS LIST-EXTENDED "
    "I18NLEVEL=1 CONDSTORE QRESYNC ESEARCH ESORT SEARCHRES WITHIN CONTEXT=SEARCH LIST-STATUS BINARY MOVE "
    "SNIPPET=FUZZY PREVIEW=FUZZY PREVIEW STATUS=SIZE SAVEDATE LITERAL+ NOTIFY SPECIAL-USE METADATA QUOTA ACL "
    "RIGHTS=texk COMPRESS=DEFLATE UNAUTHENTICATE REPLACE MULTISEARCH URLAUTH XLIST"
).split()


def test_every_relayed_capability_has_its_commands_declared():
    for cap in CAPABILITIES.values():
        missing = [c for c in cap.commands if c not in COMMANDS]
        assert not missing, f"{cap.name} brings undeclared {missing}"


def test_every_declared_command_comes_with_a_known_capability():
    known = set(CAPABILITIES) | set(PROXY_OWN)
    for spec in COMMANDS.values():
        assert spec.capability in known, spec
        if spec.capability in CAPABILITIES and spec.capability not in ("MULTIAPPEND",):
            assert spec.name in CAPABILITIES[spec.capability].commands, spec


def test_relayed_and_refused_capabilities_do_not_overlap():
    assert not set(CAPABILITIES) & set(NOT_RELAYED)


def test_every_command_with_a_mailbox_argument_is_routed_by_it():
    by_mailbox = {Routing.MAILBOX, Routing.EACH, Routing.TRANSFER, Routing.STREAMED, Routing.MERGED}
    for spec in COMMANDS.values():
        names = {Slot.MAILBOX, Slot.DEST, Slot.PATTERN} & {s for s, _ in spec.grammar.slots}
        if names:
            assert spec.routing in by_mailbox, spec
        if spec.routing in (Routing.MAILBOX, Routing.EACH):
            assert spec.grammar.has(Slot.MAILBOX), spec


def test_every_command_has_a_handler_and_states():
    assert set(_DISPATCH) == set(COMMANDS)
    for spec in COMMANDS.values():
        owner, _, method = spec.handler.rpartition(".")
        owners = {**_COLLABORATORS, **_STATELESS}  # (stateless ones made per command: copies, selection)
        assert callable(getattr(owners[owner], method) if owner else getattr(ClientSession, "cmd_" + method))
        assert spec.states
        if spec.routing is not Routing.PROXY:
            assert spec.states != {State.NOT_AUTHENTICATED}, spec


def test_announced_capabilities_derive_from_the_table():
    caps = post_login(DOVECOT_2_3)
    assert caps[:5] == list(PROXY_OWN)
    for name in ("CATENATE", "URL-PARTIAL", "NOTIFY", "COMPRESS=DEFLATE", "UNAUTHENTICATE", "REPLACE",
                 "MULTISEARCH", "URLAUTH", "XLIST", "SASL-IR", "LOGIN-REFERRALS"):
        assert name not in caps and not relayable(name), name
    for name in ("ESEARCH", "ESORT", "CONTEXT=SEARCH", "SEARCHRES", "METADATA", "QUOTA", "ACL", "RIGHTS=texk",
                 "SORT=DISPLAY", "THREAD=REFS", "SPECIAL-USE", "LIST-STATUS", "BINARY", "UNSELECT", "IDLE"):
        assert name in caps, name
    assert len(caps) == len({c.upper() for c in caps})


def test_the_design_document_shows_the_table_as_built():
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "design.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[0] in COMMANDS:
            rows[cells[0]] = cells
    assert set(rows) == set(COMMANDS)
    for name, spec in COMMANDS.items():
        assert rows[name][2] == f"`{spec.grammar.text or '(none)'}`", name
        assert rows[name][4] == spec.capability, name
