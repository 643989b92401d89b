"""The passwd-files a test Dovecot authenticates from (its users, its master user), one line per user."""

from __future__ import annotations

import os
import pwd
from collections.abc import Mapping
from pathlib import Path

from .conf import INTERNAL_USER

__all__ = ["passwd_line", "write_passwd"]


def passwd_line(user: str, password: str, fields: str = "") -> str:
    for ch in ":\n\r\0":
        if ch in user or ch in password or (ch != ":" and ch in fields):  # the fields are the line's last
            raise ValueError(f"user/password/fields must not contain {ch!r} (passwd-file format)")
    return f"{user}:{{PLAIN}}{password}::::::{fields}\n"


def write_passwd(path: Path, entries: Mapping[str, str], fields: Mapping[str, str]) -> None:
    """Read by the auth process, which runs as `dovecot`; replaced whole (a login never reads half)."""
    auth_gid = pwd.getpwnam(INTERNAL_USER).pw_gid
    tmp = path.with_name(path.name + ".new")
    tmp.write_text("".join(passwd_line(u, p, fields.get(u, "")) for u, p in entries.items()),
                   encoding="utf-8", errors="surrogateescape")  # a password of raw 8-bit bytes too
    os.chown(tmp, 0, auth_gid)
    os.chmod(tmp, 0o640)
    os.replace(tmp, path)
