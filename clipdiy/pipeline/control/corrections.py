"""Human corrections into a labels output: a Label Studio JSON export written as a run of
``source = human`` rows, with the job's own run machinery (shards, manifest last, the output's
lock). Reading the export and building the rows is :mod:`clipdiy.labels.review`'s."""

from __future__ import annotations

import json
import posixpath

import pyarrow as pa

from clipdiy.labels.report import MODEL_COLUMNS
from clipdiy.labels.review import _corrected_rows, corrected_label_map, corrections, human_row, latest_per_image
from clipdiy.labels.runs import list_runs
from clipdiy.output_layout import OutputLayout
from clipdiy.pipeline.control.lock import OutputLock
from clipdiy.pipeline.planning.manifest import RunPlan, build_manifest, new_run_id, utc_now, write_manifest
from clipdiy.pipeline.stages.writer import MANIFEST_SHARD_FIELDS, ShardTarget, write_shard
from clipdiy.schema import label_schema
from clipdiy.storage import StorageOptions, open_filesystem


def import_corrections(export_uri: str, output: str, *, storage: StorageOptions | None = None,
                       run_id: str | None = None) -> dict:
    """Write the corrections of a Label Studio JSON export into ``output`` as a run of human rows.
    Returns a summary (the run id, rows written, tasks without annotation)."""
    fs, path = open_filesystem(export_uri, storage)
    with fs.open(path, "rb") as file:
        export = json.load(file)
    if not isinstance(export, list):
        raise ValueError(f"{export_uri} is not a Label Studio JSON export (a list of tasks)")
    found = corrections(export)
    if not found:
        raise ValueError(f"{export_uri} holds no submitted annotation")
    runs = list_runs(output, storage=storage)
    wanted: dict[str, set[str]] = {}
    for c in found:
        wanted.setdefault(c.run_id, set()).add(c.image_id)
    rows = _corrected_rows(runs, wanted)
    missing = [(c.run_id, c.image_id) for c in found if (c.run_id, c.image_id) not in rows]
    if missing:
        raise ValueError(f"{len(missing)} annotated rows are not in {output}'s finished runs, e.g. {missing[0]}")
    annotated = len(found)  # tasks with an annotation; several may correct one image
    found = latest_per_image(found, rows)

    vocabularies = {json.dumps(rows[(c.run_id, c.image_id)][1].manifest.get("vocabulary", {}), sort_keys=True)
                    for c in found}
    if len(vocabularies) > 1:
        raise ValueError("the annotated rows come from runs with different vocabularies; import them separately")
    vocabulary = json.loads(vocabularies.pop())
    started = utc_now()
    run_id = run_id or f"{new_run_id(started)}-human"
    new_rows = []
    for correction in found:
        row, run = rows[(correction.run_id, correction.image_id)]
        names = run.class_names or ()
        label = corrected_label_map(correction, int(row["height"]), int(row["width"]), names)
        new_rows.append(human_row(row, correction, label, names, run_id, started))
    table = pa.Table.from_pylist(new_rows, schema=label_schema())
    layout = OutputLayout.open(output, storage)
    with OutputLock(layout, run_id, stale_after_s=60.0, heartbeat_s=10.0):
        stats = write_shard(table, target=ShardTarget(output=output, storage=storage or StorageOptions(), run_id=run_id,
                                                      attempt=1))
        manifest = build_manifest(
            plan=RunPlan(run_id=run_id, attempt=1, started_at=started, resumed=False),
            input_uri=export_uri,
            options={"source": "human", "tool": "label-studio", "export": export_uri,
                     "model_columns": list(MODEL_COLUMNS)},
            vocabulary=vocabulary,
            counts={"listed": len(export), "skipped": len(export) - annotated, "retried": 0, "seen": table.num_rows,
                    "ok": table.num_rows, "error": 0, "attempts": 1},
            shards=[{k: v for k, v in record.items() if k in MANIFEST_SHARD_FIELDS} for record in stats.to_pylist()],
            timings={"total": round((utc_now() - started).total_seconds(), 3), "listing": 0.0,
                     "labelling": 0.0, "images_per_second": 0.0},
        )
        write_manifest(layout, manifest)
    return {"run_id": run_id, "rows": table.num_rows, "tasks": len(export), "without_annotation": len(export) - annotated,
            "path": posixpath.join(output, "runs", run_id)}
