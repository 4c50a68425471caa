"""Write realistic labels outputs (the job's exact schema and layout) from label maps, for tests.

The labelling job is tested on its own; these fixtures let the readers of its output (evaluation,
previews, feed) be tested on outputs whose contents are known exactly.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import posixpath
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from clipdiy import rle
from clipdiy.schema import LABEL_SCHEMA_VERSION, label_schema

# The built-in ``voc`` names: the reference's spelling (SPEC 1.5), so that every reader sees "tv/monitor".
VOC_NAMES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "potted plant", "sheep", "sofa", "train", "tv/monitor",
)


@dataclass
class LabelItem:
    """One image's labels. ``label_map`` H x W class ids; ``mask_scores`` per class id (default
    0.5 + class_id / 100); ``saliency`` h x w in [0, 1] (default: 1 where the label is not 0)."""

    image_id: str
    uri: str
    label_map: np.ndarray | None = None
    mask_scores: dict[int, float] | None = None
    saliency: np.ndarray | None = None
    error_kind: str | None = None
    error: str | None = None


def _png(saliency: np.ndarray) -> bytes:
    image = Image.fromarray(np.clip(np.rint(saliency * 255), 0, 255).astype(np.uint8), mode="L")
    scale = 64 / max(image.size)
    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def label_row(item: LabelItem, class_names, run_id: str, started: dt.datetime) -> dict:
    row = {
        "schema_version": LABEL_SCHEMA_VERSION, "run_id": run_id, "run_started_at": started,
        "image_id": item.image_id, "uri": item.uri, "source_size": 1000, "source_etag": None, "source_mtime": started,
        "vocabulary_name": "test", "vocabulary_hash": "0" * 16, "clip_model": "ViT-B-32", "clip_weights": "sha256:test",
        "saliency_backend": "found", "saliency_weights": "test", "mode": "faithful", "clipdiy_version": "0.1.0",
        "status": "ok", "error_kind": None, "error": None, "width": None, "height": None, "class_scores": None,
        "masks": None, "foreground_fraction": None, "saliency_png": None,
    }
    if item.label_map is None:
        row.update(status="error", error_kind=item.error_kind or "corrupt", error=item.error or "cannot decode")
        return row
    label_map = np.asarray(item.label_map)
    height, width = label_map.shape
    counts = np.bincount(label_map.ravel(), minlength=len(class_names))
    masks = []
    for class_id in np.flatnonzero(counts).tolist():
        mask = label_map == class_id
        encoded = rle.encode(mask)
        score = (item.mask_scores or {}).get(class_id, 0.5 + class_id / 100)
        masks.append({
            "class_id": class_id, "class_name": class_names[class_id], "rle_size": encoded["size"],
            "rle_counts": encoded["counts"], "area": int(mask.sum()), "bbox": rle.bbox_of_mask(mask), "score": score,
        })
    saliency = item.saliency if item.saliency is not None else (label_map != 0).astype(np.float32)
    row.update(
        width=width, height=height, masks=masks, class_scores=(counts / counts.sum()).astype(np.float32).tolist(),
        foreground_fraction=float(np.mean(saliency)), saliency_png=_png(saliency),
    )
    return row


def write_labels_output(
    output: str,
    items: list[LabelItem],
    class_names=VOC_NAMES,
    *,
    run_id: str = "run-a",
    started: dt.datetime | None = None,
    finished: bool = True,
    rows_per_shard: int = 4,
    storage_options: dict | None = None,
    columns: dict[str, dict] | None = None,
) -> str:
    """Write one run of ``items`` under ``output/runs/<run_id>/``; the manifest last (when
    ``finished``). Returns the run folder URI. ``columns``: by image id, more column values of
    its row (the image address columns, :data:`ADDRESS_FIELDS`, among them)."""
    started = started or dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    fs, root = fsspec.core.url_to_fs(output, **(storage_options or {}))
    run_dir = posixpath.join(root, "runs", run_id)
    fs.makedirs(run_dir, exist_ok=True)
    rows = [label_row(item, class_names, run_id, started) for item in items]
    for row in rows:
        row.update((columns or {}).get(row["image_id"], {}))
    schema = rows_schema(rows)
    shards = []
    for index in range(0, len(rows), rows_per_shard):
        chunk = rows[index : index + rows_per_shard]
        table = pa.Table.from_pylist(chunk, schema=schema)
        relative = f"runs/{run_id}/part-{index // rows_per_shard:05d}.parquet"
        with fs.open(posixpath.join(root, relative), "wb") as file:
            pq.write_table(table, file)
        ok = sum(r["status"] == "ok" for r in chunk)
        shards.append({"path": relative, "rows": len(chunk), "ok": ok, "error": len(chunk) - ok, "bytes": 0})
    if finished:
        manifest = {
            "schema_version": "1", "run_id": run_id, "status": "finished", "started_at": started.isoformat(),
            "finished_at": started.isoformat(), "input": "test://", "options": {},
            "vocabulary": {"name": "test", "hash": "0" * 16, "class_names": list(class_names)},
            "counts": {"listed": len(rows), "skipped": 0, "seen": len(rows), "ok": sum(r["status"] == "ok" for r in rows),
                       "error": sum(r["status"] != "ok" for r in rows)},
            "shards": shards, "timings": {}, "versions": {}, "label_schema_version": "1",
        }
        with fs.open(posixpath.join(run_dir, "_MANIFEST.json"), "w") as file:
            json.dump(manifest, file)
    return run_dir


#: The image address columns of a label row (schema v2: a shard sample's bytes inside its shard).
ADDRESS_FIELDS = (
    pa.field("source_format", pa.string()), pa.field("source_uri", pa.string()),
    pa.field("source_offset", pa.int64()), pa.field("source_length", pa.int64()),
    pa.field("source_row_group", pa.int32()), pa.field("source_row", pa.int64()),
)


def rows_schema(rows: list[dict]) -> pa.Schema:
    """The label schema, plus the address columns the rows use that it does not have yet."""
    schema = label_schema()
    used = {key for row in rows for key in row}
    for field in ADDRESS_FIELDS:
        if field.name in used and field.name not in schema.names:
            schema = schema.append(field)
    return schema


def write_image(path, rgb: np.ndarray) -> str:
    Image.fromarray(rgb).save(path)
    return str(path)


def add_shard(output: str, run_id: str, name: str, items: list[LabelItem], class_names=VOC_NAMES, *,
              started: dt.datetime | None = None) -> str:
    """Write one more shard ``name`` into a run written by :func:`write_labels_output` and list
    it in the run's manifest (e.g. a later attempt's ``part-002-<digest>.parquet``)."""
    started = started or dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    fs, root = fsspec.core.url_to_fs(output)
    relative = f"runs/{run_id}/{name}"
    rows = [label_row(item, class_names, run_id, started) for item in items]
    with fs.open(posixpath.join(root, relative), "wb") as file:
        pq.write_table(pa.Table.from_pylist(rows, schema=label_schema()), file)
    manifest_path = posixpath.join(root, "runs", run_id, "_MANIFEST.json")
    if fs.exists(manifest_path):
        with fs.open(manifest_path, "r") as file:
            manifest = json.load(file)
        ok = sum(r["status"] == "ok" for r in rows)
        manifest["shards"].append({"path": relative, "rows": len(rows), "ok": ok, "error": len(rows) - ok, "bytes": 0})
        with fs.open(manifest_path, "w") as file:
            json.dump(manifest, file)
    return relative
