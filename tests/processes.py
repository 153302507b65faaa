"""The processes a test started, found through /proc: a session's, a process tree, their listening sockets."""

import subprocess
from pathlib import Path


def _stats() -> dict[int, tuple[int, int, str]]:
    """Every process that is not a zombie: pid -> (ppid, session, name)."""
    stats = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            comm, fields = stat.read_text().rsplit(")", 1)
        except OSError:
            continue
        state, ppid, _, session = fields.split()[:4]  # fields after "(comm)": state, ppid, pgrp, session
        if state != "Z":
            stats[int(stat.parent.name)] = (int(ppid), int(session), comm.partition("(")[2])
    return stats


def session_pids(sid: int) -> list[int]:
    """The living processes of session `sid` (a process started with start_new_session, and all it started)."""
    return [pid for pid, (_, session, _) in _stats().items() if session == sid]


def process_tree(root: int) -> dict[int, str]:
    """`root` and its living descendants, by pid, with their names."""
    stats = _stats()
    tree, grew = ({root: stats[root][2]} if root in stats else {}), True
    while grew:
        new = {pid: name for pid, (ppid, _, name) in stats.items() if ppid in tree and pid not in tree}
        tree.update(new)
        grew = bool(new)
    return tree


def alive(pids) -> list[int]:
    stats = _stats()
    return [pid for pid in pids if pid in stats]


def listening_addresses(pids) -> list[str]:
    out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True, check=True).stdout
    return [line.split()[3] for line in out.splitlines() if any(f"pid={pid}," in line for pid in pids)]
