"""A process's memory, from the kernel's own accounting (never from timing)."""

from __future__ import annotations


def reset_peak(pid: int) -> None:
    """Start VmHWM afresh (Linux: ``5`` in /proc/PID/clear_refs), so a later peak is this phase's."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def rss(pid: int) -> tuple[int, int]:
    """(current, peak since the last reset_peak) resident memory in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024
