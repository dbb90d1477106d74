"""One writer per output: the run's lease on its output folder.

A run takes ``{output}/lease.json`` before any training: created exclusively (a local ``O_EXCL`` create, an S3
conditional put ``If-None-Match: *``; on another store, written and read back), holding the run's id, host, process
and start, and a heartbeat the driver renews every :data:`HEARTBEAT_S` while it runs; it is removed at the end. A
second run on a held output is refused at once (:class:`LeaseHeldError`, exit 2) and told who holds it. A holder
that is gone is taken over: on the same host when its process is not alive (a killed driver, re-run at once, as
before leases existed), anywhere when its heartbeat is older than :data:`STALE_AFTER_S`. ``--take-over`` takes a
held lease explicitly, and says so in the log.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import psutil

from tinv import storage
from tinv.errors import InvalidInputError, TinvError

LEASE_NAME = "lease.json"
HEARTBEAT_S = 30.0
"""How often the driver renews its lease."""
STALE_AFTER_S = 300.0
"""A lease whose heartbeat is older than this belongs to a driver that is gone (ten missed heartbeats)."""
log = logging.getLogger("tinv.lease")


class LeaseHeldError(InvalidInputError):
    """Another run holds the output: two writers would mix their files and catalogs."""


class LeaseLostError(TinvError):
    """Another run took this run's lease over (``--take-over``); this one must stop writing."""


@dataclass(frozen=True)
class Lease:
    """Who holds an output."""

    run_id: str
    host: str
    pid: int
    pid_started: float
    """The process's start time: a pid the OS gave to another process since is not the holder."""
    started: float
    heartbeat: float

    @classmethod
    def mine(cls, run_id: str) -> Lease:
        now = time.time()
        return cls(run_id, socket.gethostname(), os.getpid(), psutil.Process().create_time(), now, now)

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    def gone(self, now: float) -> str | None:
        """Why this lease's holder is gone (None while it may be alive)."""
        if now - self.heartbeat > STALE_AFTER_S:
            return f"its last heartbeat was {now - self.heartbeat:.0f} s ago"
        if self.host == socket.gethostname() and not alive(self.pid, self.pid_started):
            return f"its driver (pid {self.pid}) is not running on this host"
        return None

    def describe(self, now: float) -> str:
        return (f"run {self.run_id} on {self.host} (pid {self.pid}), started {now - self.started:.0f} s ago, "
                f"last heartbeat {now - self.heartbeat:.0f} s ago")


def alive(pid: int, started: float) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started``."""
    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def read(output: str, storage_options: dict[str, Any] | None = None) -> Lease | None:
    """The lease on ``output``, or None."""
    try:
        return Lease(**json.loads(storage.read_bytes(storage.join(output, LEASE_NAME), storage_options)))
    except FileNotFoundError:
        return None
    except (ValueError, TypeError):  # unreadable: whatever wrote it is no run of ours
        return Lease("unknown", "unknown", 0, 0.0, 0.0, 0.0)


def create(uri: str, data: bytes, storage_options: dict[str, Any] | None = None) -> None:
    """Write ``data`` to ``uri`` only if nothing is there (:class:`FileExistsError` otherwise): ``O_EXCL`` locally,
    a conditional put on S3, else written and read back (the last writer wins; the loser sees another's bytes)."""
    fs, path = storage.filesystem(uri, storage_options)
    if storage.is_local(uri):
        fs.makedirs(storage.parent(path), exist_ok=True)
        with open(path, "xb") as f:  # O_EXCL
            f.write(data)
        return
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols:
        storage.retry(lambda: fs.pipe_file(path, data, mode="create"), what=f"creating {uri}")
        return
    if storage.retry(lambda: fs.exists(path), what=f"checking {uri}"):
        raise FileExistsError(uri)
    storage.write_bytes(uri, data, storage_options)
    if storage.read_bytes(uri, storage_options) != data:
        raise FileExistsError(uri)


def acquire(output: str, run_id: str, storage_options: dict[str, Any] | None = None,
            take_over: bool = False) -> Lease:
    """This run's lease on ``output`` (see the module); :class:`LeaseHeldError` when a live run holds it."""
    uri, mine = storage.join(output, LEASE_NAME), Lease.mine(run_id)
    try:
        create(uri, mine.to_bytes(), storage_options)
        return mine
    except FileExistsError:
        pass
    held, now = read(output, storage_options), time.time()
    why = None if held is None else held.gone(now)
    if held is not None and why is None and not take_over:
        raise LeaseHeldError(f"{output} is being written by {held.describe(now)}; wait for it, or pass "
                             "--take-over if that run is known to be dead")
    if held is not None:
        log.warning("taking over the lease on %s from %s: %s", output, held.describe(now), why or "--take-over")
    storage.write_bytes(uri, mine.to_bytes(), storage_options)
    if read(output, storage_options) != mine:
        raise LeaseHeldError(f"{output}: another run took the lease at the same moment")
    return mine


def renew(output: str, lease: Lease, storage_options: dict[str, Any] | None = None) -> Lease:
    """The lease with a fresh heartbeat; :class:`LeaseLostError` when another run took it."""
    held = read(output, storage_options)
    if held is None or (held.run_id, held.pid, held.started) != (lease.run_id, lease.pid, lease.started):
        raise LeaseLostError(f"the lease on {output} was taken by "
                             f"{held.describe(time.time()) if held else 'nobody (removed)'}")
    fresh = Lease(**{**asdict(lease), "heartbeat": time.time()})
    storage.write_bytes(storage.join(output, LEASE_NAME), fresh.to_bytes(), storage_options)
    return fresh


def release(output: str, lease: Lease, storage_options: dict[str, Any] | None = None) -> None:
    """Remove the lease, if it is still this run's."""
    held = read(output, storage_options)
    if held is not None and (held.run_id, held.pid, held.started) == (lease.run_id, lease.pid, lease.started):
        storage.remove(storage.join(output, LEASE_NAME), storage_options)


class Heartbeat:
    """Renews a lease every :data:`HEARTBEAT_S` in a thread; ``lost`` says why when it could not."""

    def __init__(self, output: str, lease: Lease, storage_options: dict[str, Any] | None = None) -> None:
        self.output, self.lease, self.storage_options = output, lease, storage_options
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tinv-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.lease = renew(self.output, self.lease, self.storage_options)
            except LeaseLostError as e:
                self.lost = str(e)
                log.error("%s", e)
                return
            except OSError as e:  # storage down: the heartbeat ages; a later renewal may still succeed
                log.warning("could not renew the lease on %s: %s", self.output, e)

    def stop(self) -> Lease:
        self._stop.set()
        self._thread.join(timeout=HEARTBEAT_S)
        return self.lease
