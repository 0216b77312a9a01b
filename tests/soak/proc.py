"""What the kernel says about a process: open descriptors, resident memory, CPU time.

Read from ``/proc/PID`` (proc(5)), so the numbers are the ones an operator's
``ls /proc/PID/fd``, ``ps -o rss`` and ``top`` would show, not the server's
own opinion of itself.
"""

from __future__ import annotations

import os

__all__ = ["cpu_seconds", "open_fds", "rss_bytes"]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def open_fds(pid: int) -> int:
    """How many descriptors ``pid`` has open."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident set size of ``pid`` (``VmRSS``), in bytes."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time ``pid`` has used, in seconds.

    Fields 14 and 15 of ``/proc/PID/stat``; counted after the command name,
    which is in parentheses and may itself contain spaces or parentheses.
    """
    with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state), so utime (14) and stime (15) are 11 and 12.
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
