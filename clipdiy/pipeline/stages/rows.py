"""Row-building stage (CPU): model outputs -> label rows in exactly ``clipdiy.schema.label_schema()``.

``finalize`` brings each label map back to the original resolution, masks are COCO RLE encoded,
and the soft saliency map is kept as a small 8-bit PNG for previews.

One image whose rows cannot be built costs its own row, as in decode and inference: an exception
while building them is its error row (``too_large`` when out of memory, else ``unsupported``),
and a process killed while building them is counted by the run's attempt ledger
(:mod:`~clipdiy.pipeline.stages.attempts`, stage ``rows``): after ``--max-worker-deaths`` counted
deaths the batch is built image by image and an image that deaths followed gets a
``worker_lost`` row.
"""

from __future__ import annotations

import datetime as dt
import logging
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

import clipdiy
from clipdiy.schema import LABEL_SCHEMA_VERSION, label_schema
from clipdiy.pipeline.stages.attempts import AttemptLedger
from clipdiy.pipeline.stages.expand import ADDRESS_FIELDS
from clipdiy.pipeline.stages.health import is_out_of_memory, one_line_error
from clipdiy.segmentation.segmenter import ModelOutput, Provenance, finalize
from clipdiy.uris import redact_text

logger = logging.getLogger(__name__)

#: Longer side of the saliency preview PNG.
SALIENCY_PREVIEW_SIDE = 64


@dataclass(frozen=True)
class RowContext:
    """What every row of a run shares: who wrote it, with which models and vocabulary."""

    run_id: str
    run_started_at: dt.datetime
    provenance: Provenance
    class_names: tuple[str, ...]


def saliency_preview(saliency: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """The h x w saliency map area-resized to the preview's size (original aspect ratio, longer
    side :data:`SALIENCY_PREVIEW_SIDE`), float32; a map already at that size is returned as is.

    The inference actors apply it before shipping outputs (a 64-px map instead of one at the model
    input size: 600 KB a photo for NACLIP), :func:`saliency_png` again, to the same result."""
    height, width = original_size
    scale = SALIENCY_PREVIEW_SIDE / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 takes (w, h)
    saliency = np.asarray(saliency, dtype=np.float32)
    if saliency.shape == (size[1], size[0]):
        return saliency
    return cv2.resize(saliency, size, interpolation=cv2.INTER_AREA)


def saliency_png(saliency: np.ndarray, original_size: tuple[int, int]) -> bytes:
    """8-bit grayscale PNG of an h x w saliency map in [0, 1], at the original aspect ratio,
    longer side :data:`SALIENCY_PREVIEW_SIDE`."""
    preview = saliency_preview(saliency, original_size)
    ok, encoded = cv2.imencode(".png", np.clip(np.rint(preview * 255.0), 0, 255).astype(np.uint8))
    if not ok:
        raise RuntimeError("PNG encoding of the saliency preview failed")
    return encoded.tobytes()


def label_fields(output: ModelOutput, class_names: Sequence[str]) -> dict[str, Any]:
    """The label columns of one ok row: masks (RLE at the original size), scores, saliency."""
    result = finalize(output, class_names)
    masks = [
        {
            "class_id": mask.class_id,
            "class_name": mask.class_name,
            "rle_size": mask.rle["size"],
            "rle_counts": mask.rle["counts"],
            "area": mask.area,
            "bbox": mask.bbox,
            "score": mask.score,
        }
        for mask in result.masks()
    ]
    return {
        "masks": masks,
        "class_scores": np.asarray(result.class_scores, dtype=np.float32).tolist(),
        "foreground_fraction": float(result.foreground_fraction),
        "saliency_png": saliency_png(output.saliency, output.original_size),
    }


def _error_fields(error: BaseException) -> dict[str, Any]:
    """The error columns of an image whose rows could not be built."""

    kind = "too_large" if is_out_of_memory(error) else "unsupported"
    # A library's exception text may quote a URI it was given (finding 7): redacted as text.
    return {"status": "error", "error_kind": kind,
            "error": redact_text(f"building this image's label row failed: {one_line_error(error)}")}


def build_rows(batch: pa.Table, context: RowContext, health=None, max_worker_deaths: int | None = None) -> pa.Table:
    """Label rows (schema ``label_schema()``) of a batch carrying listing, status and payload columns.

    ``health``: the run's :class:`~clipdiy.pipeline.stages.health_actors.RunHealthHandles` (None: no
    attempt ledger); ``max_worker_deaths``: counted deaths on a batch before it goes image by image."""
    from clipdiy.pipeline.config import DEFAULT_MAX_WORKER_DEATHS
    provenance = context.provenance
    shared = {
        "schema_version": LABEL_SCHEMA_VERSION,
        "run_id": context.run_id,
        "run_started_at": context.run_started_at,
        "vocabulary_name": provenance.vocabulary_name,
        "vocabulary_hash": provenance.vocabulary_hash,
        "clip_model": provenance.clip_model,
        "clip_weights": provenance.clip_weights,
        "saliency_backend": provenance.saliency_backend,
        "saliency_weights": provenance.saliency_weights,
        "mode": provenance.mode,
        "precision": provenance.precision,
        "clipdiy_version": clipdiy.__version__,
        "method": provenance.method,
        "refine": provenance.refine,
    }
    columns = batch.select(
        ["image_id", "uri", "source_size", "source_etag", "source_mtime", "status", "error_kind", "error", "width", "height"]
        + [f.name for f in ADDRESS_FIELDS if f.name in batch.column_names]
    ).to_pylist()
    attempt = AttemptLedger(health, "rows", max_worker_deaths or DEFAULT_MAX_WORKER_DEATHS).begin(
        [row["image_id"] for row in columns])
    payloads = batch.column("payload")
    rows = []
    for index, row in enumerate(columns):
        row.update(shared)
        # Loose objects: no address columns in the batch (source_format "files", the rest null).
        row.setdefault("source_format", "files")
        # ``uri`` holds no credential by construction (the listing's public URI); an error
        # message is free text from libraries: redacted here, where every row is written.
        row["error"] = redact_text(row["error"])
        row.update(masks=None, class_scores=None, foreground_fraction=None, saliency_png=None)
        if row["status"] == "ok":
            if row["image_id"] in attempt.lost:
                row.update(status="error", error_kind="worker_lost", error=attempt.lost_message(row["image_id"]))
            else:
                attempt.start(row["image_id"])
                try:
                    output: ModelOutput = pickle.loads(payloads[index].as_buffer())
                    row.update(label_fields(output, context.class_names))
                except Exception as error:
                    logger.exception("cannot build the label row of %s", row["image_id"])
                    row.update(_error_fields(error), **_NO_LABELS)
        rows.append(row)
    attempt.start(None)  # done with the images: a death while the table is built falls on none
    table = _rows_table(rows)
    attempt.end()
    return table


_NO_LABELS = {"masks": None, "class_scores": None, "foreground_fraction": None, "saliency_png": None}


def _rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """The rows as a table of ``label_schema()``; a row the schema cannot hold (a value out of
    its types' range, say) becomes its error row instead of failing the batch."""
    schema = label_schema()
    try:
        return pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):
        pass
    for row in rows:
        try:
            pa.Table.from_pylist([row], schema=schema)
        except (pa.ArrowException, ValueError, TypeError, OverflowError) as error:
            logger.error("the label row of %s does not fit the schema: %s", row["image_id"], error)
            row.update(_error_fields(error), **_NO_LABELS)
    return pa.Table.from_pylist(rows, schema=schema)
