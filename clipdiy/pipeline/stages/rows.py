"""Row-building stage (CPU): model outputs -> label rows in exactly ``clipdiy.schema.label_schema()``.

``finalize`` brings each label map back to the original resolution, masks are COCO RLE encoded,
and the soft saliency map is kept as a small 8-bit PNG for previews.
"""

from __future__ import annotations

import datetime as dt
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa

import clipdiy
from clipdiy.schema import LABEL_SCHEMA_VERSION, label_schema
from clipdiy.pipeline.stages.expand import ADDRESS_FIELDS
from clipdiy.segmentation.segmenter import ModelOutput, Provenance, finalize
from clipdiy.uris import redact_text

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


def build_rows(batch: pa.Table, context: RowContext) -> pa.Table:
    """Label rows (schema ``label_schema()``) of a batch carrying listing, status and payload columns."""
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
            output: ModelOutput = pickle.loads(payloads[index].as_buffer())
            row.update(label_fields(output, context.class_names))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=label_schema())

