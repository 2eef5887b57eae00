"""The machine's processes as /proc shows them, for tests that find (and kill) Ray's processes.

Linux only, as the tests that use it. A process that ends while it is read is left out.
"""

from __future__ import annotations

import os
from pathlib import Path


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line with its NUL separators as spaces), every readable process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])  # field 4, after "(comm)"
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        table[int(entry.name)] = (parent, cmdline)
    return table


def descendants(root: int | None = None) -> dict[int, str]:
    """pid -> command line of every descendant of ``root`` (default: this process), not ``root`` itself."""
    root = os.getpid() if root is None else root
    table = processes()
    found = {}
    for pid, (_, cmdline) in table.items():
        p, hops = pid, 0
        while p in table and p != root and hops < 64:
            p, hops = table[p][0], hops + 1
        if p == root and pid != root:
            found[pid] = cmdline
    return found
