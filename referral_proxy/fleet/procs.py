"""The processes of a Dovecot instance, seen through /proc (stop and census them)."""

from __future__ import annotations

import ctypes
import os
import signal


def pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def process_group(pgid: int) -> list[tuple[int, str, str]]:
    """(pid, comm, state) of the non-zombie processes in process group *pgid* (/proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read().decode(errors="replace")
        except OSError:
            continue
        lpar, rpar = data.find("("), data.rfind(")")
        fields = data[rpar + 2:].split()
        # fields: state ppid pgrp ...
        if len(fields) < 3 or int(fields[2]) != pgid or fields[0] in ("Z", "X"):
            continue
        found.append((int(entry.name), data[lpar + 1:rpar], fields[0]))
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""
