"""Run bookkeeping under OUTPUT/runs/<run_id>: the run state (``_RUN.json``, written at each
start) and the run manifest (``_MANIFEST.json``, per ``schemas/run_manifest.v1.json``, written
last). A run folder without a manifest is an unfinished run; the next start resumes it.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import importlib.metadata
import math
import os
import platform
import secrets
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import clipdiy
from clipdiy.errors import ClipdiyError
from clipdiy.output_layout import OutputLayout
from clipdiy.storage import StorageOptions
from clipdiy.schema import LABEL_SCHEMA_VERSION, MANIFEST_SCHEMA_FILE, MANIFEST_SCHEMA_VERSION, schema_document


class RunConflictError(ClipdiyError, ValueError):
    """The requested run cannot start: finished already, or another run is unfinished."""


@dataclass(frozen=True)
class RunPlan:
    """Which run this start is: its id, the attempt number (1 = first start) and start time."""

    run_id: str
    attempt: int
    started_at: dt.datetime
    resumed: bool


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_run_id(now: dt.datetime | None = None) -> str:
    now = now or utc_now()
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def finished_run_ids(layout: OutputLayout) -> list[str]:
    return [run_id for run_id in layout.run_ids() if layout.exists(layout.manifest_path(run_id))]


def fingerprint_differences(current: dict[str, Any], recorded: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the entries where two fingerprints differ, sorted.

    A key one side lacks counts as None there, so a run started before a new, unset option
    existed (say ``model.saliency_max_side``) still resumes after an upgrade.
    """
    differing = []
    for key in sorted(set(current) | set(recorded)):
        mine, theirs = current.get(key), recorded.get(key)
        if isinstance(mine, dict) and isinstance(theirs, dict):
            differing += fingerprint_differences(mine, theirs, f"{prefix}{key}.")
        elif mine != theirs:
            differing.append(f"{prefix}{key}")
    return differing


def plan_run(layout: OutputLayout, requested: str | None, fingerprint: dict[str, Any]) -> RunPlan:
    """Resume the unfinished run of OUTPUT if there is one, else start a new one.

    ``fingerprint`` (input and model provenance) must match the unfinished run's: resuming a run
    with another input or other models would mix labels within one run.
    """
    finished = set(finished_run_ids(layout))
    unfinished = [run_id for run_id in layout.run_ids() if run_id not in finished]
    if requested is not None:
        if requested in finished:
            raise RunConflictError(f"run {requested} in {layout.uri} is already finished; pass a new --run-id or omit it")
        others = [run_id for run_id in unfinished if run_id != requested]
        if others:
            raise RunConflictError(
                f"{layout.uri} holds the unfinished run {others[0]}: resume it first (omit --run-id, or pass --run-id {others[0]})"
            )
        run_id = requested
    elif len(unfinished) > 1:
        raise RunConflictError(f"{layout.uri} holds several unfinished runs ({', '.join(unfinished)}); resume one with --run-id")
    else:
        run_id = unfinished[0] if unfinished else new_run_id()

    state = layout.read_json(layout.run_state_path(run_id))
    if state is None:
        return RunPlan(run_id=run_id, attempt=1, started_at=utc_now(), resumed=False)
    differing = fingerprint_differences(fingerprint, state.get("fingerprint", {}))
    if differing:
        raise RunConflictError(
            f"the unfinished run {run_id} in {layout.uri} was started with a different {', '.join(differing)}; "
            "resume it with the same input and model options"
        )
    return RunPlan(
        run_id=run_id,
        attempt=len(state.get("attempts", [])) + 1,
        started_at=dt.datetime.fromisoformat(state["started_at"]),
        resumed=True,
    )


def write_run_state(layout: OutputLayout, plan: RunPlan, fingerprint: dict[str, Any], options: dict[str, Any]) -> None:
    """Record this start in ``_RUN.json`` (attempts accumulate across resumes)."""
    path = layout.run_state_path(plan.run_id)
    state = layout.read_json(path) or {
        "run_id": plan.run_id,
        "started_at": plan.started_at.isoformat(),
        "fingerprint": fingerprint,
        "attempts": [],
    }
    state["options"] = options
    state["attempts"].append(
        {"attempt": plan.attempt, "started_at": utc_now().isoformat(), "host": socket.gethostname(), "pid": os.getpid()}
    )
    layout.write_json_atomic(path, state)


#: Shards whose rows one stats task counts, :data:`READS_PER_STATS_TASK` at a time (each read
#: waits on the store: a footer and a column). Few, large tasks: a task costs more to start than
#: a shard costs to count.
SHARDS_PER_STATS_TASK = 256
READS_PER_STATS_TASK = 16


def shard_records(
    layout: OutputLayout, run_id: str, known: dict[str, dict], *, storage: StorageOptions | None = None, tasks: int = 16
) -> list[dict]:
    """One record per committed shard of a run: path (relative), rows, ok, error, bytes.

    ``known`` holds the records of shards this process wrote. The others (earlier attempts of a
    resumed run: up to one per 1,000 images) are counted on the cluster, by at most ``tasks``
    Ray tasks at once, each reading the ``status`` column of up to :data:`SHARDS_PER_STATS_TASK`
    shards, :data:`READS_PER_STATS_TASK` at a time; the driver only lists the run's folder
    (sizes come with the listing) and collects the records, which the manifest holds anyway.
    """
    listed = layout.shard_sizes(run_id)
    unknown = [(path, size) for path, size in listed if layout.relative(path) not in known]
    counted = {record["path"]: record for record in _count_shards_on_cluster(layout, unknown, storage, tasks)}
    records = []
    for path, _ in listed:
        relative = layout.relative(path)
        records.append(dict(known.get(relative) or counted[relative]))
    return records


def _count_shards_on_cluster(
    layout: OutputLayout, shards: list[tuple[str, int]], storage: StorageOptions | None, tasks: int
) -> list[dict]:
    if not shards:
        return []
    import ray.data

    items = [{"path": path, "bytes": size} for path, size in shards]
    stats = ray.data.from_items(items, override_num_blocks=math.ceil(len(items) / SHARDS_PER_STATS_TASK)).map_batches(
        _count_shards,
        fn_kwargs={"output_uri": layout.uri, "storage": storage},
        batch_size=SHARDS_PER_STATS_TASK,
        batch_format="pyarrow",
        num_cpus=0,  # waits on the store; the pool below bounds how many run at once
        compute=ray.data.TaskPoolStrategy(size=max(1, tasks)),
    )
    return [record for batch in stats.iter_batches(batch_format="pyarrow", batch_size=None) for record in batch.to_pylist()]


def _count_shards(batch: pa.Table, *, output_uri: str, storage: StorageOptions | None) -> pa.Table:
    layout = OutputLayout.open(output_uri, storage)

    def count(path: str, size: int) -> dict:
        status = pq.read_table(path, columns=["status"], filesystem=layout.fs).column("status")
        ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
        return {"path": layout.relative(path), "rows": len(status), "ok": ok, "error": len(status) - ok, "bytes": size}

    with concurrent.futures.ThreadPoolExecutor(READS_PER_STATS_TASK) as pool:
        records = list(pool.map(count, batch.column("path").to_pylist(), batch.column("bytes").to_pylist()))
    return pa.Table.from_pylist(records, schema=SHARD_RECORD_SCHEMA)


SHARD_RECORD_SCHEMA = pa.schema(
    [("path", pa.string()), ("rows", pa.int64()), ("ok", pa.int64()), ("error", pa.int64()), ("bytes", pa.int64())]
)


def package_versions() -> dict[str, str]:
    versions = {"clipdiy": clipdiy.__version__, "python": platform.python_version()}
    for name, dist in (("ray", "ray"), ("torch", "torch"), ("open_clip", "open_clip_torch"), ("timm", "timm")):
        try:
            versions[name] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def build_manifest(
    *,
    plan: RunPlan,
    input_uri: str,
    options: dict[str, Any],
    vocabulary: dict[str, Any],
    counts: dict[str, int],
    shards: Iterable[dict],
    timings: dict[str, float],
) -> dict[str, Any]:
    """The manifest document, with exactly the keys of ``schemas/run_manifest.v1.json``."""
    document = {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "run_id": plan.run_id,
        "status": "finished",
        "started_at": plan.started_at.isoformat(),
        "finished_at": utc_now().isoformat(),
        "input": input_uri,
        "options": options,
        "vocabulary": vocabulary,
        "counts": counts,
        "shards": list(shards),
        "timings": timings,
        "versions": package_versions(),
        "label_schema_version": LABEL_SCHEMA_VERSION,
    }
    expected = [field["name"] for field in schema_document(MANIFEST_SCHEMA_FILE)["fields"]]
    if sorted(document) != sorted(expected):
        raise RuntimeError(f"manifest keys {sorted(document)} differ from the schema's {sorted(expected)}")
    return document


def write_manifest(layout: OutputLayout, document: dict[str, Any]) -> str:
    """Write the manifest last; from then on the run counts as finished. Returns its path."""
    path = layout.manifest_path(document["run_id"])
    layout.write_json_atomic(path, document)
    return path
