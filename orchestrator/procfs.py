"""What Linux's /proc says about a process: the fields of /proc/<pid>/stat."""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after "(comm)", from field 3 (the state) on, or None where the process is
    gone or there is no /proc. comm may hold spaces and parentheses, hence the split at the last ")"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split() or None
    except OSError:
        return None
