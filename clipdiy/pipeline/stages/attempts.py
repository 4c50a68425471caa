"""The attempt ledger: which image a dying worker process was on, and whether the death was its fault.

A decode task, inference actor or row-building task killed on a batch (the kernel's OOM killer,
a crash in native code, Ray's memory monitor, a lost node) is retried by Ray. Every attempt at a
batch registers with one shard of the run's ledger (:class:`LedgerShard`, a small actor, keys
spread by hash) before it works, naming its worker process and node, and ends its record when
done, so the records outlive the dying process and hold only batches in flight or dying.

The next attempt at a batch reads the earlier attempts still on record (each one died) and asks
Ray's control store (GCS) how each process ended (:func:`death_cause`):

- ``node_lost``: the attempt's node is gone (its process did not die of the batch);
- ``memory_pressure``: Ray's memory monitor killed it while it held under half of the node's
  used memory (another process's pressure);
- ``memory_hog``: the memory monitor killed it while it held at least half of the node's used memory;
- ``crashed``: killed by a signal or crashed (the kernel's OOM killer, a segfault): its own doing
  as far as anyone can tell (the kernel's OOM killer picks the largest process);
- ``alive`` / ``exited``: the process lives on, or was ended on purpose (a stopped run):
  the attempt did not die of the batch.

Only ``memory_hog``, ``crashed`` (and deaths whose record cannot be read at all, ``unknown``)
count against a batch. After ``max_worker_deaths`` such deaths the next attempt goes image by
image, registering each image before it touches it (and nothing after the last, so a death while
a batch is unpickled or its outputs packed falls on no image). An image gets a ``worker_lost`` row
once :data:`IMAGE_DEATHS` counted deaths happened while it alone was being worked on; the rest of
the batch is labelled. Ray's own retry and restart limits are finite and larger, so this decides.
"""

from __future__ import annotations

import collections
import logging
import re
import time
import zlib
from dataclasses import dataclass

from clipdiy.pipeline.stages.health import batch_key, restarted_actor

logger = logging.getLogger(__name__)

#: Counted deaths while one image alone was being worked on, before it gets a ``worker_lost`` row:
#: two, so that one death that only happened to fall on it (a neighbour's pressure the
#: control store could not tell apart) does not cost it its labels.
IMAGE_DEATHS = 2
#: Causes of death that count against the batch (and the image) an attempt was on.
COUNTED_CAUSES = frozenset({"crashed", "memory_hog", "unknown"})
#: The memory monitor's victim is the image's fault when it held at least this share of the node's used memory.
MEMORY_HOG_SHARE = 0.5
#: How long a new attempt waits for the control store to record an earlier attempt's death.
DEATH_RECORD_WAIT_S = 5.0

_SELF_MEMORY = re.compile(r"actual memory used=([0-9.]+)GB")
_NODE_MEMORY = re.compile(r"was ([0-9.]+)GB used / ([0-9.]+)GB limit")


@dataclass(frozen=True)
class EarlierAttempt:
    """An attempt at a batch that never ended: its process, node, and the image it alone was on."""

    worker_id: str | None
    node_id: str | None
    image_id: str | None


def classify_death(record, node_alive: bool) -> str:
    """The cause of an attempt's end from its worker's control-store record (a
    ``gcs_pb2.WorkerTableData``, or None when there is none) and whether its node is alive."""
    if not node_alive:
        return "node_lost"
    if record is None:
        return "unknown"
    if record.is_alive:
        return "alive"
    from ray.core.generated import common_pb2

    exit_type = common_pb2.WorkerExitType.Name(record.exit_type)
    if exit_type == "NODE_OUT_OF_MEMORY":
        own, node = _SELF_MEMORY.search(record.exit_detail), _NODE_MEMORY.search(record.exit_detail)
        if own is None or node is None or float(node.group(1)) <= 0:
            return "memory_hog"  # the monitor's own words unreadable: as the kernel's OOM killer
        return "memory_hog" if float(own.group(1)) >= MEMORY_HOG_SHARE * float(node.group(1)) else "memory_pressure"
    if exit_type in ("INTENDED_USER_EXIT", "INTENDED_SYSTEM_EXIT"):
        return "exited"
    return "crashed"


def death_cause(attempt: EarlierAttempt, wait_s: float = DEATH_RECORD_WAIT_S) -> str:
    """:func:`classify_death` of an earlier attempt, from Ray's control store (waiting up to
    ``wait_s`` for the death to be recorded). ``unknown`` where there is nothing to ask."""
    if attempt.worker_id is None:
        return "unknown"
    try:
        import ray
        from ray._private.state import state
        from ray._raylet import WorkerID
        from ray.core.generated import gcs_pb2

        # Ray's control store, read through its private accessor: the public state API needs the
        # dashboard, which a job may run without. Only a retried batch asks (rare).
        accessor = state._connect_and_get_accessor()
        deadline = time.monotonic() + wait_s
        while True:
            node_alive = attempt.node_id is None or any(
                node["NodeID"] == attempt.node_id and node["Alive"] for node in ray.nodes())
            data = accessor.get_worker_info(WorkerID.from_hex(attempt.worker_id))
            record = gcs_pb2.WorkerTableData.FromString(data) if data is not None else None
            cause = classify_death(record, node_alive)
            if cause != "alive" or time.monotonic() >= deadline:
                return cause
            time.sleep(0.25)
    except Exception as error:  # noqa: BLE001 - an unreadable store counts the death, as before
        logger.warning("cannot read how an earlier attempt ended: %s", str(error).splitlines()[0] if str(error) else error)
        return "unknown"


class LedgerShard:
    """One shard of the run's attempt ledger (used as a Ray actor; a plain class in tests).

    Holds, per batch key in flight, its attempts: [worker id, node id, image alone in progress].
    """

    def __init__(self):
        self._records: dict[str, list[list]] = {}
        self.restarted = restarted_actor("an attempt-ledger actor", "the death counts of the batches in flight")

    def begin_batch(self, key: str, worker_id: str | None = None, node_id: str | None = None,
                    ended: tuple[str, ...] = ()) -> list[tuple]:
        """Register an attempt at the batch ``key`` (a stage's name and :func:`batch_key`) and
        forget the batches in ``ended`` (ends this process had not sent yet); return the earlier
        attempts at ``key`` still on record, which all died (Ray runs one attempt at a time)."""
        for done in ended:
            self._records.pop(done, None)
        attempts = self._records.setdefault(key, [])
        earlier = [tuple(a) for a in attempts]
        attempts.append([worker_id, node_id, None])
        return earlier

    def begin_image(self, key: str, image_id: str | None) -> None:
        """The current attempt at ``key`` starts on ``image_id`` alone (None: on no image)."""
        attempts = self._records.get(key)
        if attempts:
            attempts[-1][2] = image_id

    def end_batch(self, key: str) -> None:
        self._records.pop(key, None)

    def attempts_on_record(self) -> int:
        """How many batches the shard holds (in flight, or whose attempts died)."""
        return len(self._records)

    def was_restarted(self) -> bool:
        return self.restarted


class WorkerLost(Exception):
    """Stands for the output of an image whose worker process died on it (a ``worker_lost`` row)."""


def shard_index(key: str, shards: int) -> int:
    return zlib.crc32(key.encode("utf-8")) % shards


# Ends of batches this process has not sent yet, per ledger shard (an actor's id): each goes with
# this process's next registration at that shard, so a batch costs one call to the ledger.
_UNSENT_ENDS: dict[str, list[str]] = collections.defaultdict(list)


def _is_actor(shard) -> bool:
    return hasattr(getattr(shard, "begin_batch", None), "remote")


def _shard_id(shard) -> str:
    return shard._actor_id.hex() if _is_actor(shard) else str(id(shard))


class AttemptLedger:
    """One stage's side of the attempt ledger, used inside a Ray task or actor.

    ``health``: the run's :class:`~clipdiy.pipeline.stages.health_actors.RunHealthHandles` (or anything
    with a ``shards`` sequence of :class:`LedgerShard` actors or plain instances); None: no ledger,
    every batch is processed whole, as in a plain library call. ``max_deaths``: counted deaths on
    one batch before it goes image by image.
    """

    def __init__(self, health, stage: str, max_deaths: int):
        self.health = health
        self.stage = stage
        self.max_deaths = max_deaths

    def begin(self, image_ids: list[str]) -> BatchAttempt:
        if self.health is None:
            return BatchAttempt(None, "", 0, {}, False, ())
        key = f"{self.stage}:{batch_key(image_ids)}"
        shards = self.health.shards
        shard = shards[shard_index(key, len(shards))]
        ended = tuple(_UNSENT_ENDS.pop(_shard_id(shard), ()))
        worker_id = node_id = None
        if _is_actor(shard):
            import ray

            context = ray.get_runtime_context()
            worker_id, node_id = context.get_worker_id(), context.get_node_id()
            earlier = ray.get(shard.begin_batch.remote(key, worker_id, node_id, ended))
        else:
            earlier = shard.begin_batch(key, worker_id, node_id, ended)
        attempts = [EarlierAttempt(*a) for a in earlier]
        causes = [death_cause(a) for a in attempts]
        counted = [a for a, cause in zip(attempts, causes) if cause in COUNTED_CAUSES]
        on_image = collections.Counter(a.image_id for a in counted if a.image_id is not None)
        lost = {image: n for image, n in on_image.items() if n >= IMAGE_DEATHS}
        if attempts:
            logger.warning("batch %s: %d earlier attempts ended (%s); %d counted", key, len(attempts),
                           ", ".join(f"{n} {c}" for c, n in collections.Counter(causes).items()), len(counted))
        return BatchAttempt(shard, key, len(counted), lost, len(counted) >= self.max_deaths, tuple(causes))

    @staticmethod
    def flush(health) -> None:
        """Send this process's unsent ends (a benchmark's or test's last batch)."""
        if health is None:
            return
        for shard in health.shards:
            for key in _UNSENT_ENDS.pop(_shard_id(shard), ()):
                if _is_actor(shard):
                    shard.end_batch.remote(key)
                else:
                    shard.end_batch(key)


class BatchAttempt:
    """One attempt at a batch. ``one_by_one``: earlier attempts died ``deaths`` counted times (at
    least ``max_deaths``), so this one registers each image (:meth:`start`) before touching it;
    ``lost``: images counted deaths happened on (at least :data:`IMAGE_DEATHS`), which get a
    ``worker_lost`` row instead; ``causes``: how each earlier attempt ended."""

    def __init__(self, shard, key: str, deaths: int, lost: dict[str, int], one_by_one: bool,
                 causes: tuple[str, ...]):
        self.shard = shard
        self.key = key
        self.deaths = deaths
        self.lost = lost
        self.one_by_one = one_by_one
        self.causes = causes

    def lost_message(self, image_id: str) -> str:
        return (f"the worker process died {self.lost.get(image_id, 0)} times working on this image alone "
                f"({self.deaths} counted deaths on its batch: killed by the out-of-memory killer or Ray's memory "
                "monitor while holding the node's memory, or a crash in native code); a later run on workers "
                "with more memory tries it again")

    def start(self, image_id: str | None) -> None:
        """Before touching ``image_id`` (only while going image by image), or after the last
        image (None): waits for the record, so a death from now on falls on it (on none)."""
        if self.shard is None or not self.one_by_one:
            return
        if _is_actor(self.shard):
            import ray

            ray.get(self.shard.begin_image.remote(self.key, image_id))
        else:
            self.shard.begin_image(self.key, image_id)

    def end(self) -> None:
        """The attempt is done: its end goes with this process's next registration at the shard."""
        if self.shard is not None:
            _UNSENT_ENDS[_shard_id(self.shard)].append(self.key)


#: Retries of a task beyond what the attempt ledger needs: for node losses, a neighbour's memory
#: pressure and the like (deaths that do not count against a batch).
SPARE_RETRIES = 10


def ray_task_retries(max_deaths: int, images_per_batch: int, batches_per_task: int) -> int:
    """Ray's retries of one decode task, inference actor or row task: finite, and enough for the
    attempt ledger to reach a decision on every batch of the task (``max_deaths`` deaths, then
    :data:`IMAGE_DEATHS` per image that kills its process), so that the ledger, not Ray, decides."""
    return batches_per_task * (max_deaths + IMAGE_DEATHS * images_per_batch) + SPARE_RETRIES
