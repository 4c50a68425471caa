"""Where the inference actors run: GPU or CPU, how many GPUs each, and the pool's upper bound.

Rules (``LabelJobConfig.device``):

- ``auto`` against a cluster (``--address`` or ``RAY_ADDRESS``, which ``ray job submit`` sets):
  GPU actors, whether or not a GPU node is up yet. An autoscaling cluster starts its GPU nodes
  when the job asks for a GPU; the job waits at most ``gpu_wait_s`` for the first one.
- ``auto`` on an embedded local Ray (no address): GPU actors when this machine has a GPU, else
  CPU actors (nothing will ever join a local Ray, so there is nothing to wait for).
- ``gpu``: GPU actors, on a cluster or locally; ``cpu``: CPU actors.

The pool's upper bound (``max_actors``, unless the user set it) is what the cluster can provide
at most: its largest GPU count divided by the GPUs per actor. That count comes from the cluster's
autoscaling configuration: the one the autoscaler reports to Ray (KubeRay, autoscaler v2), else
the ``ray up`` cluster file (``cluster_config``; on a ``ray up`` head, where ``ray job submit``
runs the driver, ``~/ray_bootstrap_config.yaml``). A cluster whose configuration is not known
(a static cluster) gives the GPUs it has now. A configuration without any GPU node type is
refused at once; a GPU that does not join within ``gpu_wait_s`` is refused then.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from clipdiy.errors import GpuUnavailableError

logger = logging.getLogger(__name__)

#: What ``ray up`` writes on the head node (and passes to ``ray start --autoscaling-config``).
RAY_UP_BOOTSTRAP_CONFIG = "~/ray_bootstrap_config.yaml"

DEVICES = ("auto", "gpu", "cpu")

#: Seconds between two looks at the cluster's resources while waiting for a GPU node.
GPU_POLL_S = 2.0


@dataclass(frozen=True)
class InferencePlacement:
    """The inference pool's resources: ``gpus_per_actor`` (0: CPU actors) and ``max_actors``."""

    gpus_per_actor: float
    max_actors: int
    on_cluster: bool
    max_source: str  # where max_actors came from, for the log line

    @property
    def uses_gpu(self) -> bool:
        return self.gpus_per_actor > 0


def on_cluster(address: str | None) -> bool:
    """True when the job runs against a cluster (an address given, or ``RAY_ADDRESS`` set)."""
    return bool(address or os.environ.get("RAY_ADDRESS"))


def max_gpus_in_cluster_file(path: str | os.PathLike) -> int:
    """The most GPUs a ``ray up`` cluster file's nodes can hold at once: the head's, plus the
    workers' GPU nodes up to each type's ``max_workers``, within the file's ``max_workers``."""
    import yaml

    config = yaml.safe_load(Path(path).expanduser().read_text()) or {}
    types = config.get("available_node_types") or {}
    head_type = config.get("head_node_type")
    cluster_max = int(config.get("max_workers", 2))  # Ray's default when the file omits it
    head_gpus = int((types.get(head_type) or {}).get("resources", {}).get("GPU", 0))
    per_type = []
    for name, node_type in types.items():
        if name == head_type:
            continue
        gpus = int((node_type.get("resources") or {}).get("GPU", 0))
        if gpus > 0:
            per_type.append((min(int(node_type.get("max_workers", cluster_max)), cluster_max), gpus))
    worker_gpus = sum(count * gpus for count, gpus in per_type)
    if per_type:  # all worker types together never exceed the cluster's max_workers nodes
        worker_gpus = min(worker_gpus, cluster_max * max(gpus for _, gpus in per_type))
    return head_gpus + worker_gpus


def max_gpus_reported_to_ray() -> int | None:
    """The most GPUs the autoscaling configuration reported to Ray allows (KubeRay, autoscaler
    v2), or None when none was reported. Ray Data's own autoscaler reads the same record."""
    from ray._private.state import state

    try:
        resources = state.get_max_resources_from_cluster_config()
    except Exception as error:  # noqa: BLE001 - a private API: any failure means "unknown", never a refusal
        logger.debug("no cluster config from Ray: %s", error)
        return None
    if not resources:
        return None
    return int(resources.get("GPU", 0))


def max_gpus_of_cluster(cluster_config: str | None) -> tuple[int | None, str]:
    """(most GPUs the cluster can have, where that came from); (None, ...) when unknown."""
    reported = max_gpus_reported_to_ray()
    if reported is not None:
        return reported, "the autoscaling config reported to Ray"
    path = cluster_config or RAY_UP_BOOTSTRAP_CONFIG
    if Path(path).expanduser().is_file():
        return max_gpus_in_cluster_file(path), f"cluster file {path}"
    if cluster_config:
        raise GpuUnavailableError(f"--cluster-config {cluster_config}: no such file")
    return None, "unknown"


def wait_for_gpus(
    needed: float,
    timeout_s: float,
    resources: Callable[[], dict],
    request: Callable[[list[dict]], None] | None = None,
    poll_s: float = GPU_POLL_S,
) -> bool:
    """Wait until the cluster has ``needed`` GPUs, asking the autoscaler for them; False when
    ``timeout_s`` passes first. The request is withdrawn before returning, so that it never
    keeps GPU nodes up after the job (the actors' own demand then keeps them)."""
    if resources().get("GPU", 0) >= needed:
        return True
    if request is not None:
        # Whole GPUs: Ray before 2.5x accepts only int bundle values (a fraction fits in one GPU).
        request([{"GPU": math.ceil(needed)}])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            if resources().get("GPU", 0) >= needed:
                return True
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
        return resources().get("GPU", 0) >= needed
    finally:
        if request is not None:
            request([])


def _request_resources(bundles: list[dict]) -> None:
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)


def plan_placement(
    device: str,
    gpus_per_actor: float | None,
    max_actors: int | None,
    address: str | None,
    gpu_wait_s: float,
    cluster_config: str | None = None,
) -> InferencePlacement:
    """Resolve the pool's resources against the connected Ray (see the module docstring).

    Raises :class:`GpuUnavailableError` when GPU actors are due and the cluster cannot have a GPU.
    """
    import ray

    cluster = on_cluster(address)
    gpus_now = ray.cluster_resources().get("GPU", 0)
    if device == "cpu" or gpus_per_actor == 0:
        gpus = 0.0
    elif device == "gpu" or cluster:
        gpus = float(gpus_per_actor or 1.0)
    else:  # auto on a local Ray: today's behaviour, CUDA when present
        gpus = float(gpus_per_actor or 1.0) if gpus_now > 0 else 0.0

    if gpus == 0:
        return InferencePlacement(0.0, max_actors or 1, cluster, "--max-actors" if max_actors else "default (CPU)")

    change = "--device cpu runs inference on CPUs"
    if not cluster:
        if gpus_now < gpus:
            raise GpuUnavailableError(
                f"GPU inference asked for (--device gpu) but this machine has {gpus_now:g} GPU(s); {change}"
            )
        max_gpus, source = gpus_now, "this machine's GPUs"
    else:
        max_gpus, source = max_gpus_of_cluster(cluster_config)
        if max_gpus is not None and max_gpus < gpus and gpus_now < gpus:
            raise GpuUnavailableError(
                f"GPU inference asked for but the cluster has no GPU node type ({source} allows {max_gpus:g} "
                f"GPUs, {gpus:g} needed per actor); {change}"
            )
        if gpus_now < gpus:
            logger.info(
                "waiting up to %.0f s for a GPU node to join the cluster (--gpu-wait-seconds)", gpu_wait_s
            )
            if not wait_for_gpus(gpus, gpu_wait_s, ray.cluster_resources, _request_resources):
                raise GpuUnavailableError(
                    f"GPU inference asked for but no GPU node joined the cluster within {gpu_wait_s:g} s; "
                    f"--gpu-wait-seconds waits longer, {change}"
                )
            gpus_now = ray.cluster_resources().get("GPU", 0)
        if max_gpus is None:
            max_gpus, source = gpus_now, "the GPUs in the cluster now (pass --max-actors to allow more)"
    if max_actors:
        return InferencePlacement(gpus, max_actors, cluster, "--max-actors")
    return InferencePlacement(gpus, max(1, math.floor(max_gpus / gpus + 1e-9)), cluster, source)
