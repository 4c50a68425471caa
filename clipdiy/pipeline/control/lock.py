"""One live writer per OUTPUT: a lock file with the run id, host, pid, a token and a heartbeat.

A second run on the same OUTPUT refuses with :class:`OutputLockedError` while the lock is live.
A lock is stale (and may be taken over) when its heartbeat is older than ``stale_after_s`` (the
larger of the taker's and the holder's own, which the lock document records: a holder promises
to stop writing before its own ``stale_after_s``, so a taker with a shorter setting, such as
``jobs/review.py import``, must not judge it by that), at
once when it was taken on this host by a process that no longer exists (a killed driver), and,
when the file is empty or unreadable (a driver killed between create and write, by an older
version or another tool), once the file is older than ``corrupt_grace_s``.

Every write of the lock is a compare-and-swap on the store (:mod:`clipdiy.pipeline.control.lock_store`:
S3 ``If-None-Match: *`` / ``If-Match: <ETag>``; local disk an ``os.link`` create and a
``flock``-guarded ``os.replace``): the first take-over of a stale lock wins and the others
refuse; a heartbeat renews the lock only if it is still the version this run wrote. A refused
condition at start is a one-line :class:`OutputLockedError` (exit 2). On a store without
conditional writes the lock is read back after ``settle_s`` instead (two runs taking over the
same dead lock within that pause remain a narrow race there).

A holder that cannot renew its heartbeat gives up in time: a watchdog thread declares the lock
lost once ``stale_after_s - heartbeat_s`` have passed since the last successful renewal (before
any other run could see the lock stale), and the same happens at once when a heartbeat finds
the lock taken. Losing the lock calls ``on_lost`` (the job's CLI exits 1 there, which stops
its Ray work) and makes :meth:`OutputLock.check` raise :class:`LockLostError` (exit 1: work was
done; starting the run again resumes it). A run that takes over waits ``takeover_grace_s``
before it lists OUTPUT, so write tasks of the previous holder that were already committing land
first.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Self

from clipdiy.errors import ClipdiyError
from clipdiy.output_layout import OutputLayout
from clipdiy.pipeline.control.lock_store import (
    ConditionalWriteConflict,
    LockStore,
    StoredLock,
    open_lock_store,
)
from clipdiy.pipeline.control.failure import one_line

logger = logging.getLogger(__name__)


class OutputLockedError(ClipdiyError, RuntimeError):
    """Another run is writing to the same OUTPUT (a refusal before any work: exit 2)."""


class LockLostError(ClipdiyError, RuntimeError):
    """This run lost its OUTPUT lock while working and stopped writing (exit 1: resume it)."""

    exit_status = 1


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
    #: After how long without a heartbeat the holder itself counts its lock stale (its watchdog
    #: stops it writing before then). None in documents of older versions.
    stale_after_s: float | None = None

    @classmethod
    def parse(cls, data: bytes) -> LockInfo | None:
        """The lock document in ``data``, or None when it is empty or not a lock document."""
        try:
            document = json.loads(data.decode("utf-8"))
            fields = cls.__dataclass_fields__
            info = cls(**{name: document[name] for name in fields if name in document or name != "stale_after_s"})
            if info.stale_after_s is not None:
                info.stale_after_s = float(info.stale_after_s)
            return info
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def encode(self) -> bytes:
        return (json.dumps(asdict(self), indent=2, sort_keys=True) + "\n").encode()


#: Tokens of the locks this process holds now: a lock document naming this process with another
#: token was left by a run of this process that ended without deleting it (a read-only store).
_HELD_HERE: set[str] = set()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """The lock of one OUTPUT, held by one run; daemon threads renew its heartbeat and watch it.

    ``on_lost(error)`` is called (once, from a daemon thread) when the lock is lost; without it
    the owner finds out from :meth:`check`.
    """

    def __init__(
        self,
        layout: OutputLayout,
        run_id: str,
        *,
        stale_after_s: float,
        heartbeat_s: float,
        settle_s: float = 0.5,
        takeover_grace_s: float = 5.0,
        corrupt_grace_s: float | None = None,
        on_lost: Callable[[LockLostError], None] | None = None,
        store: LockStore | None = None,
    ):
        if heartbeat_s * 2 > stale_after_s:
            raise ValueError("heartbeat_s must be at most half of stale_after_s")
        self.layout = layout
        self.where = layout.uri  # a Location: named by its public form
        self.run_id = run_id
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        # The holder gives up one beat before anyone may call its lock stale.
        self.renew_deadline_s = stale_after_s - heartbeat_s
        self.settle_s = settle_s
        self.takeover_grace_s = takeover_grace_s
        self.corrupt_grace_s = stale_after_s if corrupt_grace_s is None else corrupt_grace_s
        self.on_lost = on_lost
        self.store = store if store is not None else open_lock_store(layout)
        now = time.time()
        self.info = LockInfo(run_id, socket.gethostname(), os.getpid(), uuid.uuid4().hex, now, now, stale_after_s)
        self.lost = False
        self.lost_reason: str | None = None
        self._version: str | None = None  # the version of the lock file this run last wrote
        self._renewed_at = 0.0  # time.monotonic() just before that write was sent
        self._state = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ reading

    def _load(self) -> tuple[StoredLock | None, LockInfo | None]:
        stored = self.store.read()
        return stored, None if stored is None else LockInfo.parse(stored.data)

    def _read(self) -> LockInfo | None:
        """The current holder (None when there is no lock file, or it is empty or unreadable)."""
        return self._load()[1]

    def stale_reason(self, info: LockInfo) -> str | None:
        """Why a lock may be taken over, or None while its holder looks alive."""
        age = time.time() - info.heartbeat_at
        stale_after_s = self.stale_after(info)
        if age > stale_after_s:
            return f"its heartbeat is {age:.0f} s old (stale after {stale_after_s:.0f} s)"
        if info.host == socket.gethostname() and not _pid_alive(info.pid):
            return f"its process {info.pid} on this host is gone"
        if info.host == socket.gethostname() and info.pid == os.getpid() and info.token not in _HELD_HERE:
            return "its run, in this process, has ended"
        return None

    def stale_after(self, info: LockInfo) -> float:
        """Seconds without a heartbeat after which ``info``'s lock is stale: this run's setting or
        the holder's own, whichever is longer (a NaN, negative or missing value counts as none)."""
        holder = info.stale_after_s
        return max(self.stale_after_s, holder) if holder is not None and holder == holder and holder > 0 else self.stale_after_s

    # ------------------------------------------------------------------ taking the lock

    def acquire(self) -> None:
        """Take the lock or raise :class:`OutputLockedError` (one line) naming the holder."""
        stored, existing = self._load()
        if stored is not None:
            reason = self._takeover_reason(stored, existing)
            logger.warning("taking over the lock of %s on %s: %s", _describe_holder(existing), self.where, reason)
            # A dead driver's Ray workers die with it within moments; a write task still finishing
            # must land before this run lists what is already labelled.
            time.sleep(self.takeover_grace_s)
        self._renewed_at = time.monotonic()
        self.info.acquired_at = self.info.heartbeat_at = time.time()
        try:
            if stored is None:
                self._version = self.store.create(self.info.encode())
            else:
                self._version = self.store.replace(self.info.encode(), stored.version)
        except ConditionalWriteConflict as conflict:
            raise OutputLockedError(
                f"{self.where} is in use by {self._holder_now()}: it took the lock first "
                f"(conditional write refused: {conflict}); not starting"
            ) from None
        if not self.store.conditional:
            time.sleep(self.settle_s)
            holder = self._read()
            if holder is None or holder.token != self.info.token:
                raise OutputLockedError(
                    f"{self.where}: {_describe_holder(holder)} took the lock at the same time; not starting"
                )
        self._start_threads()

    def _takeover_reason(self, stored: StoredLock, existing: LockInfo | None) -> str:
        """Why the lock in the store may be taken over; raises OutputLockedError when it may not."""
        path = self.layout.lock_path()
        if existing is None:
            age = time.time() - stored.modified_at
            if age > self.corrupt_grace_s:
                return f"the lock file is empty or unreadable and {age:.0f} s old"
            raise OutputLockedError(
                f"{self.where}: the lock file {path} is empty or unreadable and only {age:.0f} s old (a run may be "
                f"writing it); it counts as stale after {self.corrupt_grace_s:.0f} s, or delete it if no run is writing"
            )
        reason = self.stale_reason(existing)
        if reason is None:
            age = time.time() - existing.heartbeat_at
            raise OutputLockedError(
                f"{self.where} is in use by {_describe_holder(existing)}, heartbeat {age:.0f} s ago; wait for it to "
                f"finish, or delete {path} if it is dead"
            )
        return reason

    def _holder_now(self) -> str:
        try:
            return _describe_holder(self._read())
        except Exception:  # noqa: BLE001 - only for the message of a refusal already decided
            return "another run"

    # ------------------------------------------------------------------ holding it

    def _start_threads(self) -> None:
        _HELD_HERE.add(self.info.token)
        self._stop.clear()
        self._threads = [
            threading.Thread(target=self._beat, name="clipdiy-lock-heartbeat", daemon=True),
            threading.Thread(target=self._watch, name="clipdiy-lock-watchdog", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if self.lost:
                return
            self.renew()

    def renew(self) -> None:
        """Write a fresh heartbeat if the lock is still this run's version; lose it otherwise."""
        sent = time.monotonic()
        self.info.heartbeat_at = time.time()
        try:
            version = self.store.replace(self.info.encode(), self._version)
        except ConditionalWriteConflict:
            self._after_conflict(sent)
        except Exception as error:  # noqa: BLE001 - the store is unreachable: the watchdog bounds how long
            left = self.renew_deadline_s - (time.monotonic() - self._renewed_at)
            logger.warning(
                "lock heartbeat on %s failed (%s: %s); this run stops writing if it cannot renew within %.0f s",
                self.where, type(error).__name__, str(error).splitlines()[0] if str(error) else "", max(left, 0),
            )
        else:
            with self._state:
                if not self.lost:
                    self._version, self._renewed_at = version, sent

    def _after_conflict(self, sent: float) -> None:
        try:
            stored, holder = self._load()
        except Exception as error:  # noqa: BLE001 - unknown holder: the watchdog decides
            logger.warning("lock heartbeat on %s: cannot read the lock (%s)", self.where, type(error).__name__)
            return
        if stored is not None and holder is not None and holder.token == self.info.token:
            # This run's own write landed although its request failed (a retried PUT): keep it.
            with self._state:
                if not self.lost:
                    self._version, self._renewed_at = stored.version, sent
            return
        self._lose("the lock file was removed" if stored is None else f"the lock was taken by {_describe_holder(holder)}")

    def _watch(self) -> None:
        interval = max(min(self.heartbeat_s, self.renew_deadline_s / 8), 0.01)
        while not self._stop.wait(interval):
            if self.lost:
                return
            silent = time.monotonic() - self._renewed_at
            if silent > self.renew_deadline_s:
                self._lose(
                    f"its heartbeat could not be renewed for {silent:.0f} s (another run may take the lock "
                    f"after {self.stale_after_s:.0f} s)"
                )
                return

    def _lose(self, reason: str) -> None:
        with self._state:
            if self.lost:
                return
            self.lost, self.lost_reason = True, reason
        error = self._lost_error()
        logger.error("%s", error)
        if self.on_lost is not None:
            self.on_lost(error)

    def _lost_error(self) -> LockLostError:
        return LockLostError(
            f"{self.where}: this run lost its lock ({self.lost_reason}) and stopped writing; start it again to resume"
        )

    def check(self) -> None:
        """Raise :class:`LockLostError` if this run no longer holds the lock."""
        if self.lost:
            raise self._lost_error()

    def release(self) -> None:
        """Stop the heartbeat and delete the lock file. A store that refuses the delete (full,
        read-only, unreachable: often the very fault that ended the run) leaves the file, which
        the next run takes over (this process gone, or its heartbeat stale); the refusal is
        logged, not raised, so it never hides the error that ended the run."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        _HELD_HERE.discard(self.info.token)
        if self.lost or self._version is None:
            return
        try:
            self.store.delete(self._version)
        except ConditionalWriteConflict:
            logger.warning("the lock of %s is no longer this run's; left in place", self.where)
        except Exception as error:  # noqa: BLE001 - see the docstring
            logger.warning("could not delete the lock of %s (%s); the next run takes it over", self.where,
                           one_line(f"{type(error).__name__}: {error}"))
        self._version = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()
