"""The aggregates of one night (one finished run of a labels output), computed shard by shard.

:class:`NightStats` holds what the run report plots and compares about a run: its row counts,
errors by kind, the models that wrote it, per-class pixels and images won, and histograms of
mask scores, image scores and foreground fractions. Each is a fixed-size sum over the run's own
rows (every row it wrote, whatever later runs did), so a run's aggregates never change once it
is finished: :mod:`clipdiy.labels.report_cache` keeps them under OUTPUT, computed once.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: The row columns that say which model wrote a row; their values, hashed, are its fingerprint.
MODEL_COLUMNS = ("method", "clip_model", "clip_weights", "saliency_backend", "saliency_weights", "mode",
                 "precision", "refine")
#: Columns the aggregation reads (the saliency PNG and the RLE strings stay in the files).
AGGREGATE_COLUMNS = ("status", "error_kind", "masks", "foreground_fraction", *MODEL_COLUMNS)
#: Mask fields the aggregation reads.
MASK_FIELDS = ("class_id", "area", "score")
#: The manifest fields a night keeps (what the page shows); the rest (its shard list: one entry
#: per shard, 100k at 100M images) would make the report's memory grow with the history.
NIGHT_MANIFEST_FIELDS = ("counts", "timings")
#: The arrays of a night: (name, dtype, length: "classes" or "bins").
_ARRAYS = (("class_pixels", np.float64, "classes"), ("class_wins", np.int64, "classes"),
           ("mask_score_hist", np.int64, "bins"), ("image_score_hist", np.int64, "bins"),
           ("foreground_hist", np.int64, "bins"))


def model_fingerprint(values: dict) -> str:
    """12 hex digits identifying a model configuration (the :data:`MODEL_COLUMNS` values of a row)."""
    text = json.dumps({k: values.get(k) for k in MODEL_COLUMNS}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class NightStats:
    """The aggregates of one night (run). Arrays are indexed by the run's class ids (``class_names``);
    histograms count values in ``bins`` equal bins over [0, 1]."""

    run_id: str
    started_at: str
    class_names: tuple[str, ...]
    bins: int
    manifest: dict
    rows: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    models: dict[str, dict] = field(default_factory=dict)  # fingerprint -> model column values
    model_rows: dict[str, int] = field(default_factory=dict)  # fingerprint -> rows
    class_pixels: np.ndarray | None = None  # float64, pixels per class over ok rows
    class_wins: np.ndarray | None = None  # int64, images each class wins
    mask_score_hist: np.ndarray | None = None
    image_score_hist: np.ndarray | None = None
    foreground_hist: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.class_names)
        self.class_pixels = np.zeros(n, np.float64)
        self.class_wins = np.zeros(n, np.int64)
        self.mask_score_hist = np.zeros(self.bins, np.int64)
        self.image_score_hist = np.zeros(self.bins, np.int64)
        self.foreground_hist = np.zeros(self.bins, np.int64)

    @property
    def counts(self) -> dict:
        return self.manifest.get("counts", {})

    @property
    def timings(self) -> dict:
        return self.manifest.get("timings", {})

    @property
    def model(self) -> str:
        """The night's model fingerprint (several joined by '+' if its rows disagree)."""
        return "+".join(sorted(self.models)) or "none"

    @property
    def labelled(self) -> bool:
        """Whether the night labelled any image (a night of skips only has no model, no shares)."""
        return self.ok > 0

    def model_value(self, column: str) -> str:
        values = sorted({str(v.get(column)) for v in self.models.values()})
        return "/".join(values) if values else ""

    @property
    def pixel_share(self) -> np.ndarray:
        total = self.class_pixels.sum()
        return self.class_pixels / total if total else np.zeros_like(self.class_pixels)

    @property
    def win_share(self) -> np.ndarray:
        total = self.class_wins.sum()
        return self.class_wins / total if total else np.zeros(len(self.class_wins))

    def to_document(self) -> dict:
        """The night as plain JSON values; :meth:`from_document` reads it back exactly (floats
        as JSON writes them: shortest repr, read back to the same float64)."""
        return {
            "run_id": self.run_id, "started_at": self.started_at, "class_names": list(self.class_names),
            "bins": self.bins, "manifest": {k: self.manifest[k] for k in NIGHT_MANIFEST_FIELDS if k in self.manifest},
            "rows": self.rows, "ok": self.ok, "errors": dict(self.errors), "models": self.models,
            "model_rows": dict(self.model_rows),
            **{name: getattr(self, name).tolist() for name, _, _ in _ARRAYS},
        }

    @classmethod
    def from_document(cls, document: dict) -> NightStats:
        """The night of :meth:`to_document`; ``ValueError`` on any value it could not have
        written (a wrong type, a length off, a negative count, counts that do not add up)."""
        try:
            night = cls(str(document["run_id"]), str(document["started_at"]),
                        tuple(_strings(document["class_names"])), int(document["bins"]), dict(document["manifest"]))
            night.rows, night.ok = int(document["rows"]), int(document["ok"])
            night.errors = {str(k): int(v) for k, v in dict(document["errors"]).items()}
            night.models = {str(k): dict(v) for k, v in dict(document["models"]).items()}
            night.model_rows = {str(k): int(v) for k, v in dict(document["model_rows"]).items()}
            for name, dtype, length in _ARRAYS:
                values = np.asarray(document[name], dtype=dtype)
                expected = len(night.class_names) if length == "classes" else night.bins
                if values.shape != (expected,) or not np.isfinite(values).all() or (values < 0).any():
                    raise ValueError(f"{name}: not {expected} finite counts")
                setattr(night, name, values)
        except (KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"not a night's aggregates: {type(error).__name__}: {error}") from error
        if set(night.manifest) - set(NIGHT_MANIFEST_FIELDS) or not all(isinstance(v, dict) for v in night.manifest.values()):
            raise ValueError("manifest: only counts and timings, as objects")
        counts = [night.rows, night.ok, *night.errors.values(), *night.model_rows.values()]
        if min(counts) < 0 or night.ok > night.rows or sum(night.errors.values()) != night.rows - night.ok:
            raise ValueError("row counts do not add up")
        if set(night.models) != set(night.model_rows) or sum(night.model_rows.values()) != night.rows:
            raise ValueError("the models' rows do not add up to the night's")
        if night.class_wins.sum() > night.ok or night.bins < 1:
            raise ValueError("more images won than labelled")
        return night


def _strings(values) -> list[str]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("class_names: not a list of names")
    return values


def _histogram(values: np.ndarray, bins: int) -> np.ndarray:
    values = values[np.isfinite(values)]
    return np.histogram(np.clip(values, 0.0, 1.0), bins=bins, range=(0.0, 1.0))[0].astype(np.int64)


def mean_mask_scores(table: pa.Table) -> np.ndarray:
    """Each row's image score: the area-weighted mean of its mask scores (float64, NaN for rows
    without masks), from the ``masks`` column alone."""
    masks = table.column("masks").combine_chunks()
    flat = pc.list_flatten(masks)
    parents = pc.list_parent_indices(masks).to_numpy(zero_copy_only=False).astype(np.int64)
    area = pc.struct_field(flat, "area").to_numpy(zero_copy_only=False).astype(np.float64)
    score = pc.cast(pc.struct_field(flat, "score"), pa.float64()).to_numpy(zero_copy_only=False)
    weighted = np.bincount(parents, weights=score * area, minlength=table.num_rows)
    total = np.bincount(parents, weights=area, minlength=table.num_rows)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, weighted / np.where(total > 0, total, 1), np.nan)


def _aggregate_shard(night: NightStats, table: pa.Table) -> np.ndarray:
    """Merge one shard's rows into ``night``; returns each row's image score (area-weighted mean
    of its mask scores; NaN for rows without masks)."""
    n = table.num_rows
    night.rows += n
    status = table.column("status")
    is_ok = pc.equal(status, "ok").fill_null(False)
    night.ok += int(pc.sum(is_ok).as_py() or 0)
    kinds = pc.value_counts(table.filter(pc.invert(is_ok)).column("error_kind").fill_null("unknown"))
    for entry in kinds.to_pylist():
        night.errors[entry["values"]] = night.errors.get(entry["values"], 0) + int(entry["counts"])
    present = [c for c in MODEL_COLUMNS if c in table.column_names]
    models = table.select(present).group_by(present).aggregate([([], "count_all")])
    for values in models.to_pylist():
        count = values.pop("count_all")
        fingerprint = model_fingerprint(values)
        night.models.setdefault(fingerprint, values)
        night.model_rows[fingerprint] = night.model_rows.get(fingerprint, 0) + int(count)

    masks = table.column("masks").combine_chunks()
    flat = pc.list_flatten(masks)
    parents = pc.list_parent_indices(masks).to_numpy(zero_copy_only=False).astype(np.int64)
    class_id = pc.struct_field(flat, "class_id").to_numpy(zero_copy_only=False).astype(np.int64)
    area = pc.struct_field(flat, "area").to_numpy(zero_copy_only=False).astype(np.float64)
    score = pc.cast(pc.struct_field(flat, "score"), pa.float64()).to_numpy(zero_copy_only=False)
    classes = len(night.class_names)
    if class_id.size and int(class_id.max()) >= classes:
        raise ValueError(f"run {night.run_id}: class id {int(class_id.max())} outside its vocabulary of {classes} classes")
    night.class_pixels += np.bincount(class_id, weights=area, minlength=classes)
    night.mask_score_hist += _histogram(score, night.bins)
    if class_id.size:
        # The winner of an image: its largest non-background mask; background (class 0) only wins
        # images that hold nothing else. Sort by (row, rank key) and take each row's last mask.
        key = np.where(class_id == 0, -1.0, area)
        order = np.lexsort((key, parents))
        last = np.ones(order.size, bool)
        last[:-1] = parents[order][1:] != parents[order][:-1]
        night.class_wins += np.bincount(class_id[order][last], minlength=classes)
    image_score = mean_mask_scores(table)
    night.image_score_hist += _histogram(image_score, night.bins)
    fraction = pc.cast(table.column("foreground_fraction"), pa.float64()).to_numpy(zero_copy_only=False)
    night.foreground_hist += _histogram(np.asarray(fraction, np.float64), night.bins)
    return image_score
