"""The sweep driver's lease on a storage: one driver at a time writes a storage's rows and checkpoints.

The lease is the object `lease.json` at the storage root, written and read through Storage (so it holds on an
object store too): who holds it (host, pid, the process's start time, when it started), when it was last
renewed, and a random token that tells this driver's lease from a later one. Its holder is alive where it is on
this host and its process still runs (the same pid with the same start time: a pid can be reused), or where it
is on another host and renewed its lease within TTL_S. A driver that was killed leaves its lease behind; the
next one takes it over with --resume.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Callable

from .procfs import stat_fields
from .storage import Storage, StorageError

NAME = "lease.json"
# How often a driver renews its lease: often enough that a few missed renewals (a slow or briefly unreachable
# object store) stay well inside TTL_S.
RENEW_S = 30.0
# A lease from another host whose process this host cannot see counts as left by a dead driver this long after
# its last renewal: four renewal periods, which also absorbs clock differences of a minute between hosts.
TTL_S = 120.0


@dataclass(frozen=True)
class Holder:
    """A lease record: the driver that holds (or held) the lease."""

    host: str
    pid: int
    start_ticks: int | None  # the process's start time (/proc/<pid>/stat field 22; a reused pid has another)
    started: str  # ISO-8601 UTC, for people
    renewed: float  # epoch seconds
    token: str

    def __str__(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"

    def alive(self) -> bool:
        if self.host == socket.gethostname() and self.start_ticks is not None:
            return _start_ticks(self.pid) == self.start_ticks
        # Another host, or a system without /proc: only the renewals tell.
        return time.time() - self.renewed < TTL_S


def _start_ticks(pid: int) -> int | None:
    """When process `pid` started (clock ticks after boot), or None where it is gone, a zombie, or this
    system has no /proc."""
    fields = stat_fields(pid)  # from field 3 (the state) on: field 22 is fields[19]
    return None if fields is None or fields[0] == "Z" else int(fields[19])


class Lease:
    """This driver's lease on `storage`: check() before anything is validated, acquire() once validation has
    passed (nothing is written before), release() on every way out. A daemon thread renews it every RENEW_S.
    With `resume`, a lease left by a dead driver is taken over."""

    def __init__(self, storage: Storage, resume: bool):
        self.storage, self.resume = storage, resume
        self.held: Holder | None = None
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    def check(self) -> Holder | None:
        """Refuse (StorageError, one line) where a live driver holds the lease, or where a dead one left it and
        this driver does not resume; else the dead holder whose lease acquire() takes over (None if none)."""
        holder = self._read()
        if holder is None:
            return None
        if holder.alive():
            raise StorageError(f"{self.storage}: in use by the sweep of {holder}; wait for it to end or stop it")
        if not self.resume:
            raise StorageError(f"{self.storage}: its lease was left by a sweep driver that is gone ({holder}); "
                               "pass --resume to take it over and continue that sweep")
        return holder

    def acquire(self, out: Callable[[str], None]) -> None:
        """Take the lease (checked again: validation took a while), saying whose it takes over, and start
        renewing it."""
        dead = self.check()
        if dead is not None and self._read() == dead:
            self.storage.delete(NAME)
        now = time.time()
        self.held = Holder(host=socket.gethostname(), pid=os.getpid(), start_ticks=_start_ticks(os.getpid()),
                           started=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)), renewed=now,
                           token=secrets.token_hex(16))
        if not self.storage.create(NAME, _encode(self.held)):
            other = self._read()
            self.held = None
            raise StorageError(f"{self.storage}: in use by the sweep of {other or 'another driver'}, which took "
                               "its lease just now; wait for it to end or stop it")
        if dead is not None:
            out(f"took over the lease on {self.storage} from a sweep driver that is gone ({dead})")
        self._renewer = threading.Thread(target=self._renew, name="sau-lease", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            try:
                holder = self._read()
                if holder is not None and holder.token != self.held.token:
                    print(f"warning: {self.storage.location(NAME)}: another sweep driver took this one's lease; "
                          "no longer renewing it", file=sys.stderr)
                    return
                self.storage.write(NAME, _encode(Holder(**{**asdict(self.held), "renewed": time.time()})))
            except (OSError, StorageError):  # an unreachable store: the next period tries again
                continue

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this driver's (not one that took it over)."""
        if self.held is None:
            return
        self._stop.set()
        self._renewer.join()
        holder = self._read()
        if holder is not None and holder.token == self.held.token:
            self.storage.delete(NAME)
        self.held = None

    def _read(self) -> Holder | None:
        data = self.storage.read(NAME)
        if data is None:
            return None
        try:
            record = json.loads(data)
            ticks = record["start_ticks"]
            return Holder(host=str(record["host"]), pid=int(record["pid"]),
                          start_ticks=None if ticks is None else int(ticks), started=str(record["started"]),
                          renewed=float(record["renewed"]), token=str(record["token"]))
        except (KeyError, ValueError, TypeError) as error:
            reason = f"no field {error}" if isinstance(error, KeyError) else str(error).splitlines()[0]
            raise StorageError(f"{self.storage.location(NAME)}: not a lease record ({reason}); delete it if no "
                               "sweep runs on this storage") from None


def _encode(holder: Holder) -> bytes:
    return (json.dumps(asdict(holder), indent=2) + "\n").encode()
