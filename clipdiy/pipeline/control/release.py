"""Clean-up after a run stopped early: end its inference actors, and wait (bounded) until its
actors and tasks have given their CPUs and GPUs back to Ray."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


#: After a run left early (an error, the error budget, the lock lost), how long ``_label`` waits
#: for the run's actors and tasks to give their CPUs/GPUs back, so that a next run in the same
#: Ray (tests, benchmarks, a notebook) does not find them taken.
RELEASE_WAIT_S = 60.0


_RELEASED_RESOURCES = ("CPU", "GPU", "memory")


def free_resources() -> dict[str, float]:
    """The cluster's free CPUs, GPUs and reservable memory now (Ray omits a resource at zero)."""
    import ray

    available = ray.available_resources()
    return {name: float(available.get(name, 0.0)) for name in _RELEASED_RESOURCES}


def _drop_frames(error: BaseException | None) -> None:
    """Drop the local variables of the finished frames ``error`` (and its causes) went through.

    An error raised out of the streaming execution carries the frames of Ray Data's scheduling
    thread, and through them the executor, whose in-flight tasks hold the actor handles of the
    pool: as long as the error lives (and after, in reference cycles only the garbage collector
    breaks), Ray keeps those actors and their CPUs. A frame still running (that thread unwinding)
    cannot be cleared yet, so this is repeated while waiting. The traceback stays printable.
    """
    import traceback

    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def wait_for_release(before: dict[str, float], error: BaseException | None, timeout_s: float = RELEASE_WAIT_S) -> bool:
    """Wait (bounded) until the free resources are back to ``before`` (capped at the cluster's
    total, which may shrink), letting go of what ``error`` holds of the stopped execution.
    True when they are back; a warning when the wait runs out."""
    import gc

    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        _drop_frames(error)
        gc.collect()  # the stopped executor's own reference cycles, so that its actors go now
        total = ray.cluster_resources()
        free = free_resources()
        short = {
            name: (free[name], want)
            for name, want in before.items()
            if free[name] < min(want, float(total.get(name, 0.0))) - 1e-6
        }
        if not short:
            return True
        if time.monotonic() >= deadline:
            logger.warning("the stopped run's actors and tasks still hold %s after %.0f s", short, timeout_s)
            return False
        time.sleep(0.5)


def stop_actors(health) -> None:
    """End the inference actors of a run stopped early (they registered with ``health``)."""
    import ray

    try:
        actors = ray.get(health.actors.remote(), timeout=60)
    except ray.exceptions.RayError as error:  # the wait for the resources (next) still bounds the stop
        logger.warning("could not list the stopped run's inference actors: %s", str(error).splitlines()[0])
        return
    for actor in actors:
        ray.kill(actor, no_restart=True)
