"""An operator's mailbox name reaches the map in the form IMAP clients send it (cli.imap_name).

Probe 5 of stop 48: ``map set alice Café b3`` printed ``alice Café -> b3`` and placed a name no client
sends (Dovecot 2.3 knows the mailbox as ``Caf&AOk-``, the modified UTF-7 every client writes): an
APPEND to it still went to b1, and the placement added b3 to every LIST of alice's. Now the name is
stored as clients send it, as the rules already compare names (routing.rule_form).
"""

from __future__ import annotations

import pytest
from imapwire import Wire
from movecheck import census, cli

from referral_proxy.cli import imap_name

pytestmark = pytest.mark.usefixtures("clean_mail")


def test_imap_name_keeps_modified_utf7_and_encodes_the_rest():
    typed = ["Café", "Caf&AOk-", "R&D", "R&-D", "INBOX", "Shared/x", "*", "Шаблоны/Sub", "j\udce9r"]
    assert [imap_name(n) for n in typed] == ["Caf&AOk-", "Caf&AOk-", "R&-D", "R&-D", "INBOX", "Shared/x", "*",
                                             "&BCgEMAQxBDsEPgQ9BEs-/Sub", "j\udce9r"]


def test_map_set_of_a_unicode_name_places_the_mailbox_clients_name(proxy_factory, fleet):
    proxy = proxy_factory()
    config = str(proxy.config_path)
    done = cli("map", "--config", config, "set", "alice", "Café", "b3")
    assert done.returncode == 0 and "Caf&AOk-" in done.stdout, (done.stdout, done.stderr)
    assert "no mail moves with a placement: whatever 'Caf&AOk-' holds on b1 is out of clients' reach" in done.stderr
    again = cli("map", "--config", config, "set", "alice", "Café", "b3")
    assert again.returncode == 0 and "no mail moves" not in again.stderr, again.stderr  # (routed there already)
    assert "Caf&AOk- -> b3" in cli("map", "--config", config, "show", "alice").stdout
    w = Wire(proxy.host, proxy.port, timeout=60)
    w.login("alice")
    assert w.cmd(b"c", b"CREATE Caf&AOk-")[-1].startswith(b"c OK")
    message = b"Message-Id: <cafe-1@t>\r\nSubject: cafe\r\n\r\nbody\r\n"
    assert w.cmd(b"a", b"APPEND Caf&AOk- {%d+}\r\n" % len(message) + message)[-1].startswith(b"a OK")
    _counts, where = census(fleet, "alice")
    assert where["cafe-1@t"] == [("b3", "Caf&AOk-")]
    gone = cli("map", "--config", config, "unset", "alice", "Café")
    assert gone.returncode == 0, gone.stderr
    assert "Caf&AOk-" not in cli("map", "--config", config, "show", "alice").stdout


def test_admin_commands_on_a_map_file_that_is_not_there_do_nothing(proxy_factory, tmp_path):
    """A copy of the proxy's config elsewhere (store = "sqlite:map.sqlite3", relative to the file): `move`
    moved the mail and recorded it in a new, empty map no proxy reads, and the user's mailbox was gone
    (probe 3, stop 48). Now each command names the missing file and does nothing; `map migrate` makes it."""
    proxy = proxy_factory()
    if '"sqlite:map.sqlite3"' not in proxy.config_path.read_text():
        pytest.skip("a PostgreSQL map (RP_TEST_STORE): a copy of the config names the same database")
    copy = tmp_path / "elsewhere" / "proxy.toml"
    copy.parent.mkdir()
    copy.write_text(proxy.config_path.read_text())
    for args in (["move", "--config", str(copy), "alice", "Projects", "b3"], ["recover", "--config", str(copy)],
                 ["map", "--config", str(copy), "set", "alice", "Projects", "b3"],
                 ["map", "--config", str(copy), "show", "alice"]):
        done = cli(*args)
        assert done.returncode != 0 and "does not exist: no proxy uses it" in done.stderr, (args, done.stderr)
    assert not (copy.parent / "map.sqlite3").exists()
    assert cli("map", "--config", str(copy), "migrate").returncode == 0
    assert (copy.parent / "map.sqlite3").exists()


def test_map_unset_of_inbox_in_any_case_removes_the_placement_set(proxy_factory):
    """`map set alice inbox b2` stored INBOX; `map unset alice inbox` said it had no placement (probe 3)."""
    config = str(proxy_factory().config_path)
    assert cli("map", "--config", config, "set", "alice", "inbox", "b2").returncode == 0
    gone = cli("map", "--config", config, "unset", "alice", "inbox")
    assert gone.returncode == 0 and "placement removed" in gone.stdout, gone.stdout + gone.stderr


@pytest.mark.parametrize("name", ["Proj/", "Proj//x", "/Proj", "Proj/./x", "Proj/..", "~Proj"])
def test_map_set_of_a_name_dovecot_refuses_or_strips_is_refused(proxy_factory, name):
    """`map set carol Proj/ b2` (as shell completion writes it) placed a name no mailbox has: Dovecot strips
    the separator (CREATE "Proj/" makes Proj) or refuses the name; the operator's `map show` listed a
    placement that routed nothing (probe v1, stop 52). Refused, nothing written."""
    config = str(proxy_factory().config_path)
    done = cli("map", "--config", config, "set", "carol", name, "b2")
    assert done.returncode == 2 and "no mailbox is named so" in done.stderr, (done.stdout, done.stderr)
    shown = cli("map", "--config", config, "show", "carol")
    assert shown.returncode == 0 and "b2 (placed" not in shown.stdout, shown.stdout


def test_move_of_a_mailbox_nowhere_or_named_with_a_trailing_separator_is_refused(proxy_factory):
    """`move alice Nope b1` (b1 her home) said "is on b1 already", rc 0, for a mailbox she has nowhere;
    `move alice Projects/ b1` with Projects on b3 said the same and moved nothing (probe 3, stop 48)."""
    from test_moves import MASTERS

    config = str(proxy_factory(MASTERS).config_path)
    nowhere = cli("move", "--config", config, "alice", "Nope", "b1")
    assert nowhere.returncode == 1 and "[NONEXISTENT]" in nowhere.stderr, nowhere.stdout + nowhere.stderr
    trailing = cli("move", "--config", config, "alice", "Projects/", "b1")
    assert trailing.returncode == 2 and "ends with the separator" in trailing.stderr, trailing.stderr
    here = cli("move", "--config", config, "alice", "INBOX", "b1")
    assert here.returncode == 0 and "already" in here.stdout, here.stdout + here.stderr


def test_a_move_whose_output_pipe_is_closed_still_moves_and_exits(proxy_factory, fleet):
    """`move ... 2>&1 | true`: the first progress line raised BrokenPipeError, the move failed midway and
    the report of it raised again before the reactor stopped: the command never exited (probe 8, stop 48)."""
    import os
    import subprocess
    import sys

    from movecheck import REPO, seed
    from test_moves import MASTERS

    mail = [f"pipe-{i}@t" for i in range(20)]
    seed(fleet["b1"], "alice", "Work", mail, size=20000)
    proxy = proxy_factory(MASTERS)
    read, write = os.pipe()
    os.close(read)  # nobody will read what it says
    try:
        done = subprocess.run([sys.executable, "-m", "referral_proxy", "move", "--config", str(proxy.config_path),
                               "alice", "Work", "b3"], stdout=write, stderr=write, cwd=REPO, timeout=300,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    finally:
        os.close(write)
    assert done.returncode == 0
    counts, where = census(fleet, "alice")
    assert all(counts[i] == 1 and where[i] == [("b3", "Work")] for i in mail), where


def test_admin_commands_refuse_a_master_users_login_form(proxy_factory):
    """`map set alice*proxy-master Zed b3` placed Zed for a user nobody logs in as: that login is alice's
    (master_user_separator), her CREATE Zed went to b1, `map show` listed a second user (probe e3, stop 56).
    Each admin command taking a user refuses the form and names the user; nothing is written."""
    config = str(proxy_factory({"map": {"master_user_separator": "*"}}).config_path)
    for args in (["map", "--config", config, "set", "alice*proxy-master", "Zed", "b3"],
                 ["map", "--config", config, "show", "ALICE*proxy-master"],
                 ["map", "--config", config, "unset", "alice*x", "Zed"],
                 ["move", "--config", config, "alice*proxy-master", "Zed", "b3"]):
        done = cli(*args)
        assert done.returncode == 2 and "master user's login" in done.stderr and "'alice'" in done.stderr.lower(), (
            args, done.stdout, done.stderr)
    shown = cli("map", "--config", config, "show", "alice")
    assert shown.returncode == 0 and "Zed" not in shown.stdout, shown.stdout
    placed = cli("map", "--config", config, "set", "alice", "Zed", "b3")
    assert placed.returncode == 0 and "alice Zed -> b3" in placed.stdout, (placed.stdout, placed.stderr)
