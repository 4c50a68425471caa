"""One writer per OUTPUT: a lock file with the run id, host, pid and a heartbeat.

A second run on the same OUTPUT refuses with :class:`OutputLockedError` while the lock is live.
A lock is stale (and taken over) when its heartbeat is older than ``stale_after_s``, or at once
when it was taken on this host by a process that no longer exists (a killed driver).

Two starts cannot both win a free OUTPUT: locally the lock is created with ``O_EXCL``; on S3
with a conditional write (``If-None-Match: *``, s3fs's ``"xb"`` mode), which S3 and the
S3-compatible stores that implement it refuse when the object exists. Every object-store lock is
also read back after a pause, and the run that does not find its own token refuses: this guards
stores that ignore the condition, and the take-over of a stale lock (two runs taking over the
same dead lock within the pause of each other remain a narrow race).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Self

from clipdiy.errors import ClipdiyError
from clipdiy.pipeline.layout import OutputLayout

logger = logging.getLogger(__name__)


class OutputLockedError(ClipdiyError, RuntimeError):
    """Another run is writing to the same OUTPUT."""


def _has_conditional_create(fs) -> bool:
    """Whether ``fs.open(path, "xb")`` is a conditional create on the store (s3fs on S3)."""
    try:
        from s3fs import S3FileSystem
    except ImportError:
        return False
    return isinstance(fs, S3FileSystem)


def _describe_holder(holder: LockInfo | None) -> str:
    """The holder of a lock, for refusals ("another run" when it could not be read)."""
    return "another run" if holder is None else f"run {holder.run_id} (host {holder.host}, pid {holder.pid})"


@dataclass
class LockInfo:
    run_id: str
    host: str
    pid: int
    token: str
    acquired_at: float
    heartbeat_at: float


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """The lock of one OUTPUT, held by one run; a daemon thread refreshes its heartbeat."""

    def __init__(
        self,
        layout: OutputLayout,
        run_id: str,
        *,
        stale_after_s: float,
        heartbeat_s: float,
        settle_s: float = 0.5,
        takeover_grace_s: float = 5.0,
    ):
        self.layout = layout
        self.run_id = run_id
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.settle_s = settle_s
        self.takeover_grace_s = takeover_grace_s
        now = time.time()
        self.info = LockInfo(run_id, socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now)
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> LockInfo | None:
        document = self.layout.read_json(self.layout.lock_path())
        if document is None:
            return None
        try:
            return LockInfo(**{k: document[k] for k in LockInfo.__dataclass_fields__})
        except (KeyError, TypeError) as error:
            raise OutputLockedError(
                f"{self.layout.uri}: unreadable lock file {self.layout.lock_path()} ({error}); remove it if no run is writing"
            ) from error

    def stale_reason(self, info: LockInfo) -> str | None:
        """Why a lock may be taken over, or None while its holder looks alive."""
        age = time.time() - info.heartbeat_at
        if age > self.stale_after_s:
            return f"its heartbeat is {age:.0f} s old"
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            return f"its process {info.pid} on this host is gone"
        return None

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputLockedError` naming the holder."""
        existing = self._read()
        if existing is not None:
            reason = self.stale_reason(existing)
            if reason is None:
                age = time.time() - existing.heartbeat_at
                raise OutputLockedError(
                    f"{self.layout.uri} is in use by run {existing.run_id} (host {existing.host}, pid {existing.pid}, "
                    f"heartbeat {age:.0f} s ago); wait for it to finish, or delete {self.layout.lock_path()} if it is dead"
                )
            logger.warning("taking over the lock of run %s on %s: %s", existing.run_id, self.layout.uri, reason)
            # A dead driver's Ray workers die with it within moments; a write task still finishing
            # must land before this run lists what is already labelled.
            time.sleep(self.takeover_grace_s)
        now = time.time()
        self.info.acquired_at = self.info.heartbeat_at = now
        if self.layout.is_local and existing is None:
            self._create_exclusive()
        else:
            if existing is None and _has_conditional_create(self.layout.fs):
                self._create_exclusive_object()
            else:
                self.layout.write_json_atomic(self.layout.lock_path(), asdict(self.info))
            time.sleep(self.settle_s)
        holder = self._read()
        if holder is None or holder.token != self.info.token:
            who = _describe_holder(holder)
            raise OutputLockedError(f"{self.layout.uri}: {who} took the lock at the same time; not starting")
        self._thread = threading.Thread(target=self._beat, name="clipdiy-lock-heartbeat", daemon=True)
        self._thread.start()

    def _create_exclusive(self) -> None:
        import json

        path = self.layout.lock_path()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self._read()
            who = _describe_holder(holder)
            raise OutputLockedError(f"{self.layout.uri} is in use by {who}; not starting") from None
        with os.fdopen(fd, "w") as handle:
            json.dump(asdict(self.info), handle)

    def _create_exclusive_object(self) -> None:
        """Create the lock object only if there is none (S3 conditional write)."""
        import json

        try:
            with self.layout.fs.open(self.layout.lock_path(), "xb") as handle:
                handle.write(json.dumps(asdict(self.info), indent=2, sort_keys=True).encode())
        except FileExistsError:
            holder = self._read()
            who = _describe_holder(holder)
            raise OutputLockedError(f"{self.layout.uri} is in use by {who}; not starting") from None

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = self._read()
                if holder is None or holder.token != self.info.token:
                    self.lost = True
                    logger.error("the lock of %s was taken by another run; this run will not finish", self.layout.uri)
                    return
                self.info.heartbeat_at = time.time()
                self.layout.write_json_atomic(self.layout.lock_path(), asdict(self.info))
            except OSError as error:
                # A missed beat is survivable while the next ones succeed (stale_after >= 2 beats).
                logger.warning("lock heartbeat on %s failed: %s", self.layout.uri, error)

    def check(self) -> None:
        """Raise if another run took the lock over while this one was running."""
        if self.lost:
            raise OutputLockedError(f"{self.layout.uri}: the lock was taken over by another run during this run")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            holder = self._read()
        except OutputLockedError:
            return
        if holder is not None and holder.token == self.info.token:
            self.layout.fs.rm_file(self.layout.lock_path())

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
