"""Ray Data's retry options of a map stage, passed the one way Ray 2.60 still takes them.

Ray 2.60 deprecates ``**ray_remote_args`` on ``Dataset.map_batches`` ("use the named remote
parameters instead") and names ``num_cpus``, ``num_gpus``, ``memory``, ``resources``,
``label_selector``... but not ``max_retries`` (tasks) nor ``max_restarts`` / ``max_task_retries``
(actors), whose defaults are infinite. The job needs them finite (the attempt ledger,
``stages/attempts.py``), so :func:`map_batches_retried` passes exactly these three the old way and
hides the one deprecation warning that this causes, for that call only. Every other option must be
a named parameter of the installed ``map_batches``: anything else raises here, and any other Ray
deprecation from ``clipdiy`` fails the test suite (``filterwarnings`` in ``pyproject.toml``).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping
from typing import Any

#: The remote options that Ray 2.60 takes only through ``**ray_remote_args``.
RETRY_OPTIONS = frozenset({"max_retries", "max_restarts", "max_task_retries"})


def _named_parameters() -> frozenset[str]:
    import ray.data

    parameters = inspect.signature(ray.data.Dataset.map_batches).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD)


def map_batches_retried(dataset, fn, *, retries: Mapping[str, int], **named: Any):
    """``dataset.map_batches(fn, **named)`` with ``retries`` (keys from :data:`RETRY_OPTIONS`) as
    remote options. Raises TypeError for a retry option or a named argument it does not know."""
    from ray.util.annotations import RayDeprecationWarning

    unknown = set(retries) - RETRY_OPTIONS
    if unknown:
        raise TypeError(f"not a retry option of a map stage: {', '.join(sorted(unknown))}")
    unnamed = set(named) - _named_parameters()
    if unnamed:  # would travel as deprecated ray_remote_args, hidden by the filter below
        raise TypeError(f"not a named parameter of Dataset.map_batches: {', '.join(sorted(unnamed))}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated", category=RayDeprecationWarning)
        return dataset.map_batches(fn, **named, **retries)
