"""Telling a failure about one image from a failure of the run.

Bad images stay error rows and the job goes on; a failure that is not about one image stops
the job instead of being laundered into rows. Each guard sits where it sees enough to decide:

- **Reads** (:class:`RunHealth`, one small actor per run, ``num_cpus=0``, on the driver's node):
  every decode batch reports how many reads succeeded and how its failed reads are classified
  (:func:`classify_read_failure`). When ``stop_after_failed_reads`` reads in a row, across the
  whole cluster, failed with no success in between (credentials, permissions, a vanished bucket,
  an endpoint down, a manifest of missing objects), the actor's verdict is set, the next decode
  batch raises :class:`~clipdiy.errors.RunFailedError` and the job ends with exit status 1.
  A missing object (``not_found``) counts only in a run's first attempt, before its first
  successful read: a manifest (or a prefix) that names nothing that exists stops loudly, but
  once one read worked, or when the run is resumed after such a stop, a missing object is an
  answer about that object (a ``not_found`` row, never read again), not a failure of the run.
  All-ok batches report without waiting for an answer (:func:`report_reads`); a batch with
  failed reads waits for the verdict.
- **Poisoned actors** (:func:`is_poisoning_error`): a CUDA error that leaves the device unusable
  ends the actor's process so that Ray restarts it and retries its batch. :class:`RunHealth`
  counts these per batch, so a batch that poisons a fresh actor too becomes ``model`` error rows
  instead of restarting actors forever.
- **Processes that die** (:mod:`~clipdiy.pipeline.stages.attempts`, the attempt ledger): every
  attempt at a decode, inference or row batch registers with one of the run's ledger shards before
  it works (one call per batch and stage), so that the next attempt learns how many earlier ones
  died, how (from Ray's control store: a lost node or a neighbour's memory pressure does not
  count), and on which image; an image counted deaths followed gets a ``worker_lost`` row.
- **Restarts of these actors** (``max_restarts=-1``, so that no task fails for want of them): a
  restarted actor says so at once, as an error in the job's log, naming what it lost;
  :meth:`~clipdiy.pipeline.stages.health_actors.RunHealthHandles.restarted` lists them for the driver's summary. A restarted
  :class:`RunHealth` counts missing objects as answers (a lost count never turns into a false
  stop); a restarted ledger shard forgets the deaths of the batches in flight, and Ray's finite
  retries still bound them.
- **The error budget** (:class:`ErrorBudget`, in the driver): the share of error rows among the
  last ``window`` written rows, from the per-shard stats the driver receives anyway (no extra
  calls). Above ``max_rate`` the run stops with exit status 3, naming the dominant error kind;
  the shards written stay valid and the next start resumes.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import re
from collections.abc import Mapping

#: Read-failure classes, from "surely about the whole store" to "maybe about this object".
READ_FAILURE_CLASSES = ("credentials", "no_bucket", "unreachable", "access_denied", "not_found", "other")
#: Missing objects (``not_found``) are judged over at least this many of the run's last reads
#: (:meth:`RunHealth.judge_not_found`)...
NOT_FOUND_WINDOW = 200
#: ...they are answers when at least as many reads of the window found their object, and at
#: least this many: one object found shows the routing reaches the store, so a small night (a
#: deleted photo among a few) takes its missing objects as answers, as a large one does...
NOT_FOUND_MIN_FOUND = 1
#: ...and this many of them, more than the objects found, are a storm: the run stops (exit 1).
NOT_FOUND_STORM = 50
#: The classes never about one object.
STORE_FAILURE_CLASSES = frozenset({"credentials", "no_bucket", "unreachable"})

# S3 error codes that say the credentials (not the object) are the problem.
_CREDENTIAL_CODES = frozenset(
    {"InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
     "RequestTimeTooSkewed", "InvalidSecurity", "NotSignedUp", "AccountProblem", "AllAccessDisabled",
     "InvalidClientTokenId", "UnrecognizedClientException"}
)
_CREDENTIAL_TYPES = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError",
     "TokenRetrievalError", "UnauthorizedSSOTokenError", "RefreshWithMFAUnsupportedError",
     "DefaultCredentialsError", "RefreshError"}
)
_USERINFO = re.compile(r"//[^/@\s]+@")


def batch_key(image_ids: list[str]) -> str:
    """A short, stable name of a batch (its image ids), the same when Ray retries it."""
    return hashlib.sha256("\n".join(image_ids).encode("utf-8")).hexdigest()[:20]


def _chain(error: BaseException):
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _s3_code(error: BaseException) -> str | None:
    response = getattr(error, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


def read_error(error: BaseException, failure_class: str) -> tuple[str, str]:
    """(kind, message) of a storage failure while reading a source object; ``failure_class``:
    :func:`classify_read_failure`'s. A missing object (``not_found``:
    local FileNotFoundError, S3 NoSuchKey/404, HTTP 404) is its own kind; a read past its time
    (``timed_out``) too; a missing bucket, a permission or a network failure is ``unreadable``
    (a later run tries again).

    The message is built here from the error's type and structured fields
    (:func:`~clipdiy.storage.describe_error`), never from a library's text, which may quote the
    signed location in a form no pattern finds (re-encoded by aiohttp/yarl): the row names its
    object by its ``uri`` column."""
    from clipdiy.storage import ReadTimedOutError, describe_error

    if isinstance(error, ReadTimedOutError):
        return "timed_out", str(error)
    kind = "not_found" if failure_class == "not_found" else "unreadable"
    return kind, f"cannot read the object: {describe_error(error)}"


def classify_read_failure(error: BaseException) -> str:
    """The class (one of :data:`READ_FAILURE_CLASSES`) of an exception raised reading an object."""
    from clipdiy.storage import is_transient

    for link in _chain(error):
        code = _s3_code(link)
        if type(link).__name__ in _CREDENTIAL_TYPES or code in _CREDENTIAL_CODES:
            return "credentials"
        if code == "NoSuchBucket" or "nosuchbucket" in str(link).lower().replace(" ", ""):
            return "no_bucket"
    if is_transient(error):
        return "unreachable"
    if isinstance(error, PermissionError):
        return "access_denied"
    if isinstance(error, FileNotFoundError):
        return "not_found"
    return "other"


def one_line(text: str, limit: int = 300) -> str:
    """First line of ``text``, shortened, with any ``user:password@`` in URLs hidden."""
    line = _USERINFO.sub("//***@", (text or "").strip().splitlines()[0] if (text or "").strip() else "")
    return line if len(line) <= limit else line[: limit - 3] + "..."


#: Messages of allocation failures: CUDA's, and torch's CPU allocator's (``DefaultCPUAllocator:
#: can't allocate memory``), which a CPU actor raises where the kernel lets it.
_OUT_OF_MEMORY_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def is_out_of_memory(error: BaseException) -> bool:
    """An out-of-memory error of the device or the host allocator (``torch.OutOfMemoryError``,
    ``MemoryError``, or their messages)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if (oom is not None and isinstance(error, oom)) or isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return any(marker in text for marker in _OUT_OF_MEMORY_MARKERS)


def one_line_error(error: BaseException) -> str:
    """``Type: first line`` of an exception."""
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _tally(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


class RunHealth:
    """The run-wide read streak and poisoning counts (used as a Ray actor; plain class for tests).

    stop_after_failed_reads: this many failed reads in a row, cluster-wide, end the run.
    first_attempt: whether this is the run's first attempt (missing objects count towards the
    streak only then, and only until a read succeeds).
    """

    def __init__(self, stop_after_failed_reads: int, first_attempt: bool = True):
        self.stop_after = stop_after_failed_reads
        self.first_attempt = first_attempt
        self.reads_ok = 0
        self.streak: collections.Counter[str] = collections.Counter()
        self.sample: str | None = None
        self._verdict: str | None = None
        self._actors: list = []
        self._poisonings: dict[str, int] = {}
        self._not_found_total = 0
        self._not_found_marks: list[tuple[int, int]] = []  # (reads found, missing) after each judged batch
        self.restarted = restarted_actor("the run's health actor", "its read streak and poisoning counts")
        if self.restarted:
            # The reads before the restart are unknown: a missing object is an answer about it,
            # as after a first good read, so that a lost count cannot turn into a false stop.
            self.first_attempt = False

    def record_reads(self, ok: int, failed: Mapping[str, int], sample: str | None = None) -> str | None:
        """Add one decode batch's reads; return the verdict (a one-line reason) once reads are broken.

        A batch with any successful read ends the streak: the store answers, so its failures are
        about their objects.
        """
        if self._verdict is not None:
            return self._verdict
        if ok:
            self.reads_ok += ok
            self.streak.clear()
            self.sample = None
            return None
        if self.reads_ok or not self.first_attempt:
            failed = {k: v for k, v in failed.items() if k != "not_found"}  # an answer about its object
            if not any(failed.values()):
                return None
        self.streak.update({k: v for k, v in failed.items() if v})
        if sample and self.sample is None:
            self.sample = sample
        failures = sum(self.streak.values())
        if failures >= self.stop_after:
            dominant = self.streak.most_common(1)[0][0]
            since = "no read has succeeded in this run" if self.reads_ok == 0 else f"after {self.reads_ok} good reads"
            self._verdict = (
                f"reading the input failed for the last {failures} objects in a row ({_tally(self.streak)}; {since}): "
                f"{_READ_HINTS.get(dominant, 'check the input and the storage')}; e.g. {self.sample or 'no message'} "
                f"(--stop-after-failed-reads {self.stop_after})"
            )
        return self._verdict

    def judge_not_found(self, ok: int, not_found: int, sample: str | None = None) -> bool:
        """Whether a decode batch's ``not_found`` reads are answers (True) or a symptom (False),
        judged before its rows are built; sets the run's verdict on a storm of them.

        ``ok`` and ``not_found``: the batch's successful reads and missing objects (its ``ok`` is
        reported to :meth:`record_reads` afterwards). Over the run's last
        :data:`NOT_FOUND_WINDOW` reads or more: missing objects are answers only when at least
        as many reads found their object, and at least :data:`NOT_FOUND_MIN_FOUND`; a window with
        :data:`NOT_FOUND_STORM` or more missing objects and more missing than found is a storm
        (a manifest pointing at the wrong bucket or prefix, a mis-routed endpoint): the run
        stops, exit 1. Rows judged a symptom are written ``unreadable`` (read again next run), so
        a storm never marks objects deleted.
        """
        self._not_found_total += not_found
        found_now = self.reads_ok + ok
        base_found, base_missing = 0, 0
        for index in range(len(self._not_found_marks) - 1, -1, -1):
            found, missing = self._not_found_marks[index]
            if (found_now - found) + (self._not_found_total - missing) >= NOT_FOUND_WINDOW:
                base_found, base_missing = found, missing
                del self._not_found_marks[:index]  # older marks are never a window's start again
                break
        self._not_found_marks.append((found_now, self._not_found_total))
        recent_missing = self._not_found_total - base_missing
        # Found reads leave no mark: those since the window's start are taken as the oldest of
        # it, so at most the window's room beside its missing objects counts.
        recent_found = min(found_now - base_found, max(0, NOT_FOUND_WINDOW - recent_missing))
        if self._verdict is None and recent_missing >= NOT_FOUND_STORM and recent_missing > recent_found:
            self._verdict = (
                f"most reads find nothing: {recent_missing} of the last {recent_found + recent_missing} objects read do "
                f"not exist ({_READ_HINTS['not_found']}; or the endpoint reaches another store); their rows are "
                f"'unreadable', read again by the next run; e.g. {sample or 'no message'}"
            )
        return recent_found >= max(NOT_FOUND_MIN_FOUND, recent_missing)

    def verdict(self) -> str | None:
        return self._verdict

    def finish(self) -> str | None:
        """The verdict at the end of the stream: also set when not one read of the run succeeded
        and every failure is about the store, not an object (a corpus smaller than
        ``stop_after_failed_reads`` with bad credentials, say). Missing or forbidden objects alone
        do not count: a nightly run whose only pending image is a deleted one must not fail."""
        if (self._verdict is None and self.reads_ok == 0 and self.streak
                and set(self.streak) <= STORE_FAILURE_CLASSES):
            self.stop_after = sum(self.streak.values())
            return self.record_reads(0, {})
        return self._verdict

    def register_actor(self, actor) -> None:
        """Keep an inference actor's handle (sent by the actor as it starts), so that a run
        stopped early can end its pool at once: Ray Data's stopped pool lets its actors go only
        when the last reference to their handles does, which can be much later."""
        self._actors.append(actor)

    def actors(self) -> list:
        """The handles of the run's inference actors (a restarted actor may appear twice)."""
        return list(self._actors)

    def was_restarted(self) -> bool:
        return self.restarted

    def record_poisoning(self, batch_key: str) -> int:
        """Count one poisoned actor on the batch ``batch_key``; return how often it happened."""
        self._poisonings[batch_key] = self._poisonings.get(batch_key, 0) + 1
        return self._poisonings[batch_key]


#: Restarts of one inference actor in one run (each reloads the models): more means the cluster,
#: not an image, is broken, and the run stops (exit 1) instead of restarting actors all night.
ACTOR_RESTARTS = 100


def restarted_actor(what: str, lost: str) -> bool:
    """Whether this actor is a restart (Ray re-creates a dead actor with ``max_restarts``); if so,
    say loudly what its predecessor's state held, which is gone."""
    try:
        import ray

        context = ray.get_runtime_context() if ray.is_initialized() else None
        restarted = bool(context is not None and context.get_actor_id() is not None
                         and context.was_current_actor_reconstructed)
    except Exception:  # noqa: BLE001 - not in an actor (a plain instance in tests)
        return False
    if restarted:
        logging.getLogger(__name__).error(
            "%s was restarted (its process or node died): %s are lost; the run goes on, bounded by Ray's "
            "finite retries", what, lost)
    return restarted


_READ_HINTS = {
    "credentials": "the credentials are missing, invalid or expired (check the environment, profile or role)",
    "no_bucket": "the bucket does not exist (any more)",
    "unreachable": "the store does not answer (endpoint down or unreachable, see --endpoint-url)",
    "access_denied": "access is denied (check the role's read permission on the objects)",
    "not_found": "the objects do not exist (a stale manifest, or a wrong prefix)",
}


def report_reads(health, ok: int, failed: Mapping[str, int], sample: str | None = None) -> str | None:
    """A decode batch's reads to the run's :class:`RunHealth` (through ``health``, its handles);
    the verdict when reads are broken run-wide. All-ok batches wait for nothing; a batch with
    failed reads waits for the verdict. (Each batch's good reads are sent at once, not gathered:
    :meth:`RunHealth.judge_not_found` weighs missing objects against the reads found so far.)"""
    import ray

    if not failed:
        health.reads.record_reads.remote(ok, {})
        return None
    return ray.get(health.reads.record_reads.remote(ok, dict(failed), sample))


class ErrorBudget:
    """The share of error rows among the last ``window`` written rows, per shard as written.

    max_rate: stop above this share (1.0 never stops). The rate is judged only once ``window``
    rows are written, so a small run is never stopped by a few bad images.
    """

    def __init__(self, max_rate: float, window: int):
        self.max_rate = max_rate
        self.window = window
        self._shards: collections.deque[tuple[int, collections.Counter[str]]] = collections.deque()
        self._rows = 0
        self._errors: collections.Counter[str] = collections.Counter()

    def add(self, rows: int, error_kinds: Mapping[str, int]) -> str | None:
        """Add one shard's rows and error counts per kind; a one-line reason when over budget."""
        kinds = collections.Counter({k: int(v) for k, v in error_kinds.items() if v})
        self._shards.append((rows, kinds))
        self._rows += rows
        self._errors.update(kinds)
        # Drop the oldest shards while the rest still fill the window.
        while len(self._shards) > 1 and self._rows - self._shards[0][0] >= self.window:
            old_rows, old_kinds = self._shards.popleft()
            self._rows -= old_rows
            self._errors.subtract(old_kinds)
        errors = sum(self._errors.values())
        if self._rows < self.window or errors <= self.max_rate * self._rows:
            return None
        kind, count = max(((k, v) for k, v in self._errors.items() if v > 0), key=lambda kv: (kv[1], kv[0]))
        return (
            f"error budget exceeded: {errors} of the last {self._rows} images failed "
            f"({errors / self._rows:.0%} > --max-error-rate {self.max_rate:g}), mostly {kind} ({count}; "
            f"{_tally(+self._errors)})"
        )
