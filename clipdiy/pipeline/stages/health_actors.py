"""The run's health actors, started on the driver's node: the read-health actor
(:class:`~clipdiy.pipeline.stages.health.RunHealth`) and the attempt ledger's shards
(:class:`~clipdiy.pipeline.stages.attempts.LedgerShard`), and the handles the stages call them by.

Kept apart from both: it is the one place that knows them together, so neither imports the other's
module back (the ledger uses the guards of ``health``; ``health`` knows nothing of the ledger).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from clipdiy.pipeline.stages.attempts import LedgerShard
from clipdiy.pipeline.stages.health import RunHealth

#: CPUs of the cluster per ledger shard: one shard served 360-570 registrations a second on a
#: shared, loaded 2-core box (``benchmarks/bench_run_health.py``; more on a free head-node core),
#: one per batch and stage; the 11,600 images/s target with batches of 8 is 4,350 a second, and
#: a cluster that fast has 500-1,000 CPUs: 8-16 shards.
CPUS_PER_LEDGER_SHARD = 64
#: At most this many ledger shards (actors on the driver's node, ``num_cpus=0``).
MAX_LEDGER_SHARDS = 32


def ledger_shards_for(cluster_cpus: float) -> int:
    """How many ledger shards a cluster of ``cluster_cpus`` CPUs gets."""
    return max(1, min(MAX_LEDGER_SHARDS, math.ceil(cluster_cpus / CPUS_PER_LEDGER_SHARD)))


@dataclass(frozen=True)
class RunHealthHandles:
    """The run's health actors: ``reads`` (:class:`RunHealth`: read streak, poisonings, actor
    handles; its methods are called through this object, ``health.verdict.remote()``) and
    ``shards`` (the attempt ledger's :class:`~clipdiy.pipeline.stages.attempts.LedgerShard`
    actors, keys spread by hash)."""

    reads: Any
    shards: tuple

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("reads", "shards"):  # pickling, copying: not delegated
            raise AttributeError(name)
        return getattr(self.reads, name)

    def restarted(self, timeout: float = 60) -> list[str]:
        """The names of the actors that were restarted during the run (their counts were lost)."""
        import ray

        names = ["reads"] + [f"ledger shard {i}" for i in range(len(self.shards))]
        flags = ray.get([actor.was_restarted.remote() for actor in (self.reads, *self.shards)], timeout=timeout)
        return [name for name, flag in zip(names, flags) if flag]

    def kill(self) -> None:
        import ray

        for actor in (self.reads, *self.shards):
            ray.kill(actor)


def start_run_health(stop_after_failed_reads: int, first_attempt: bool = True, ledger_shards: int | None = None):
    """Start the run's health actors on the driver's node (which outlives worker nodes): one
    :class:`RunHealth` and ``ledger_shards`` ledger shards (None: :func:`ledger_shards_for` the
    cluster's CPUs). Returns :class:`RunHealthHandles`."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    if ledger_shards is None:
        ledger_shards = ledger_shards_for(ray.cluster_resources().get("CPU", 1))
    options = {
        "num_cpus": 0,
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True),
        # Restarted (saying so, and what was lost) rather than failing every task that calls it.
        "max_restarts": -1,
        "max_task_retries": -1,
    }
    reads = ray.remote(RunHealth).options(**options).remote(stop_after_failed_reads, first_attempt)
    shards = tuple(ray.remote(LedgerShard).options(**options).remote() for _ in range(ledger_shards))
    return RunHealthHandles(reads, shards)
