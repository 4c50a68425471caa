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
  All-ok batches report without waiting for an answer, so a healthy run pays one asynchronous
  actor call per decode batch; a batch with failed reads waits for the verdict.
- **Poisoned actors** (:func:`is_poisoning_error`): a CUDA error that leaves the device unusable
  ends the actor's process so that Ray restarts it and retries its batch. :class:`RunHealth`
  counts these per batch, so a batch that poisons a fresh actor too becomes ``model`` error rows
  instead of restarting actors forever.
- **Processes that die** (:class:`RunHealth`'s attempt ledger): a decode task or inference actor
  killed on a batch (the kernel's OOM killer, a crash in native code) is retried by Ray. Every
  attempt at a batch registers with the run's health actor before it works (one call per batch),
  and ends its record when done, so the records outlive the dying process and hold only batches
  in flight or dying. After ``max_worker_deaths`` deaths on one batch the next attempt goes image
  by image, registering each image before it touches it; an image that was in progress when an
  attempt died gets a ``worker_lost`` row instead of being processed again, and the rest of the
  batch is labelled. Ray's own retry and restart limits are finite and larger, so this decides.
- **The error budget** (:class:`ErrorBudget`, in the driver): the share of error rows among the
  last ``window`` written rows, from the per-shard stats the driver receives anyway (no extra
  calls). Above ``max_rate`` the run stops with exit status 3, naming the dominant error kind;
  the shards written stay valid and the next start resumes.
"""

from __future__ import annotations

import collections
import hashlib
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
        self._attempts: dict[str, _BatchAttempts] = {}
        self._not_found_total = 0
        self._not_found_marks: list[tuple[int, int]] = []  # (reads found, missing) after each judged batch

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

    def begin_batch(self, key: str) -> tuple[int, tuple[str, ...]]:
        """Register an attempt at the batch ``key`` (a stage's name and :func:`batch_key`); return
        (how many earlier attempts at it died, the image ids in progress when one died).

        An attempt that finishes calls :meth:`end_batch`, so every earlier attempt still on
        record died (Ray runs one attempt of a task at a time).
        """
        record = self._attempts.setdefault(key, _BatchAttempts())
        deaths = record.started
        record.started += 1
        if record.current is not None:  # the image an attempt was working on when it died
            record.lost.add(record.current)
            record.current = None
        return deaths, tuple(sorted(record.lost))

    def begin_image(self, key: str, image_id: str) -> None:
        """An attempt going image by image starts on ``image_id`` (and is done with the one before)."""
        record = self._attempts.get(key)
        if record is not None:
            record.current = image_id

    def end_batch(self, key: str) -> None:
        """The attempt at ``key`` finished: forget the batch."""
        self._attempts.pop(key, None)

    def attempts_on_record(self) -> int:
        """How many batches the ledger holds (in flight, or whose attempts died)."""
        return len(self._attempts)

    def record_poisoning(self, batch_key: str) -> int:
        """Count one poisoned actor on the batch ``batch_key``; return how often it happened."""
        self._poisonings[batch_key] = self._poisonings.get(batch_key, 0) + 1
        return self._poisonings[batch_key]


#: Retries of a task beyond what the attempt ledger needs: for node losses and the like.
SPARE_RETRIES = 10
#: Restarts of one inference actor in one run (each reloads the models): more means the cluster,
#: not an image, is broken, and the run stops (exit 1) instead of restarting actors all night.
ACTOR_RESTARTS = 100


def ray_task_retries(max_deaths: int, images_per_batch: int, batches_per_task: int) -> int:
    """Ray's retries of one decode task or inference actor task: finite, and enough for the
    attempt ledger to reach a decision on every batch of the task (``max_deaths`` deaths, then one
    more per image that kills its process), so that the ledger, not Ray, decides."""
    return batches_per_task * (max_deaths + images_per_batch) + SPARE_RETRIES


class _BatchAttempts:
    """The ledger's record of one batch: attempts started, the image being worked on by the
    current attempt going image by image, and images whose attempt died on them."""

    __slots__ = ("started", "current", "lost")

    def __init__(self):
        self.started = 0
        self.current: str | None = None
        self.lost: set[str] = set()


class WorkerLost(Exception):
    """Stands for the output of an image whose worker process died on it (a ``worker_lost`` row)."""


class AttemptLedger:
    """One batch's side of :class:`RunHealth`'s attempt ledger, used inside a Ray task or actor.

    ``health``: the run's RunHealth actor handle (None: no ledger, every batch is processed
    whole, as in a plain library call). ``max_deaths``: deaths on one batch before it goes image
    by image.
    """

    def __init__(self, health, stage: str, max_deaths: int):
        self.health = health
        self.stage = stage
        self.max_deaths = max_deaths

    def begin(self, image_ids: list[str]) -> BatchAttempt:
        if self.health is None:
            return BatchAttempt(None, "", 0, frozenset(), False)
        import ray

        key = f"{self.stage}:{batch_key(image_ids)}"
        deaths, lost = ray.get(self.health.begin_batch.remote(key))
        return BatchAttempt(self.health, key, deaths, frozenset(lost), deaths >= self.max_deaths)


class BatchAttempt:
    """One attempt at a batch. ``one_by_one``: earlier attempts died ``deaths`` times (at least
    ``max_deaths``), so this one registers each image (:meth:`start`) before touching it;
    ``lost``: images an earlier attempt died on, which get a ``worker_lost`` row instead."""

    def __init__(self, health, key: str, deaths: int, lost: frozenset[str], one_by_one: bool):
        self.health = health
        self.key = key
        self.deaths = deaths
        self.lost = lost
        self.one_by_one = one_by_one

    def lost_message(self) -> str:
        return (f"the worker process died {self.deaths} times on this image's batch, the last time working on "
                "this image alone (killed by the out-of-memory killer, or a crash in native code)")

    def start(self, image_id: str) -> None:
        """Before touching ``image_id`` (only while going image by image): waits for the record."""
        if self.health is not None and self.one_by_one:
            import ray

            ray.get(self.health.begin_image.remote(self.key, image_id))

    def end(self) -> None:
        """The attempt is done (no need to wait: a lost message only keeps a finished record)."""
        if self.health is not None:
            self.health.end_batch.remote(self.key)


_READ_HINTS = {
    "credentials": "the credentials are missing, invalid or expired (check the environment, profile or role)",
    "no_bucket": "the bucket does not exist (any more)",
    "unreachable": "the store does not answer (endpoint down or unreachable, see --endpoint-url)",
    "access_denied": "access is denied (check the role's read permission on the objects)",
    "not_found": "the objects do not exist (a stale manifest, or a wrong prefix)",
}


def start_run_health(stop_after_failed_reads: int, first_attempt: bool = True):
    """Start the run's :class:`RunHealth` actor on the driver's node (which outlives worker nodes)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(RunHealth)
        .options(
            num_cpus=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
            # Restarted (counts lost, harmlessly) rather than failing every decode task that calls it.
            max_restarts=-1,
            max_task_retries=-1,
        )
        .remote(stop_after_failed_reads, first_attempt)
    )


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
