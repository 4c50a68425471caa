"""Scoring a labels output against ground truth, by the paper's protocol (SPEC section 4).

Protocol, per image: the ground-truth map is resized so its short side is ``short_side`` (448)
px with nearest-neighbour sampling; the predicted label map (decoded from the row's RLE masks,
original resolution) is resized to that same size, nearest; predicted class ids are mapped to
ground-truth ids by name (:func:`class_mapping`); GT pixels of 255 are ignored. The pixel counts
go into one confusion matrix for the whole data set (rows GT class, columns predicted class, plus
a last column for pixels no predicted class covers), from which

- IoU_c = TP_c / (GT_c + Pred_c - TP_c); mIoU = mean over all classes, background included, of
  the classes that occur in the ground truth or the prediction. A class absent from both has
  no defined IoU (0/0): it is reported as NaN (``null`` in JSON) and left out of the mean, as
  the usual (mmsegmentation) protocol does;
- pixel accuracy = correct pixels / non-ignored GT pixels.

Per image, for finding bad labels: the same metrics from the image's own confusion matrix, and
the foreground/background IoU of the saliency alone (the row's ``saliency_png`` resized
bilinearly to the GT size and thresholded at 0.5, against GT non-background). Rows whose image has
no ground truth are counted as unmatched; GT images without an ok row are counted as missing
(label errors or never labelled) and are not in the confusion matrix.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipdiy.errors import VocabularyError
from clipdiy.labels.ground_truth import GroundTruth, resize_nearest, short_side_size
from clipdiy.labels.palette import IGNORE
from clipdiy.labels.row_index import RowIndex, build_row_index
from clipdiy.labels.runs import Run, list_runs, read_shard, vocabulary_of
from clipdiy.labels.store import (
    decode_label_map,
    decode_saliency,
    iter_rows,
    iter_winning_shards,
    stem,
    stems,
)
from clipdiy.storage import StorageOptions

SHORT_SIDE = 448
SALIENCY_THRESHOLD = 0.5
#: Below this many images, ``evaluate`` runs in-process; above, on Ray (unless told).
LOCAL_BELOW = 200
#: How many unmatched and missing image ids a report names.
UNMATCHED_EXAMPLES = 20


def normalise_name(name: str) -> str:
    """Class-name key for matching: lower case, letters and digits only ("TV monitor" = "tvmonitor")."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def class_mapping(pred_names: Sequence[str], gt_names: Sequence[str], explicit: Mapping[str, str] | None = None) -> np.ndarray:
    """Lookup table: predicted class id -> ground-truth class id, matched by name.

    ``explicit`` maps predicted names to GT names where they differ (e.g. ``{"motorbike":
    "motorcycle"}``); every other name must match after :func:`normalise_name`. Raises
    :class:`VocabularyError` naming every class of either side left without a partner.
    """
    gt_index = {normalise_name(n): i for i, n in enumerate(gt_names)}
    overrides = {normalise_name(k): normalise_name(v) for k, v in (explicit or {}).items()}
    unknown_targets = sorted(v for v in overrides.values() if v not in gt_index)
    if unknown_targets:
        raise VocabularyError(f"the class mapping names ground-truth classes that do not exist: {unknown_targets}")
    lut = np.full(len(pred_names), -1, dtype=np.int64)
    for pred_id, name in enumerate(pred_names):
        key = overrides.get(normalise_name(name), normalise_name(name))
        lut[pred_id] = gt_index.get(key, -1)
    unmatched_pred = [pred_names[i] for i in np.flatnonzero(lut < 0)]
    unmatched_gt = [n for i, n in enumerate(gt_names) if i not in set(lut.tolist())]
    if unmatched_pred or unmatched_gt:
        raise VocabularyError(
            "vocabulary and ground truth classes do not match: "
            f"predicted classes without a ground-truth class: {unmatched_pred}; "
            f"ground-truth classes no predicted class maps to: {unmatched_gt}. "
            "Pass a class mapping file (JSON/YAML {predicted name: ground-truth name}) with --class-map."
        )
    return lut


@dataclass(frozen=True)
class EvalContext:
    """What scoring one image needs (picklable, shipped once to Ray tasks)."""

    ground_truth: GroundTruth
    lut: np.ndarray
    short_side: int = SHORT_SIDE

    @property
    def num_classes(self) -> int:
        return len(self.ground_truth.class_names)


def score_row(row: dict, context: EvalContext) -> dict:
    """Per-image result of one ok label row: its sparse confusion counts and per-image metrics.

    ``confusion_index`` are flat indices into the K x (K + 1) matrix, ``confusion_count`` their
    pixel counts; ``saliency_confusion`` = [bg->bg, bg->fg, fg->bg, fg->fg] (GT -> saliency).
    """
    k = context.num_classes
    gt = context.ground_truth.load(stem(row["image_id"]))
    pred_ids = decode_label_map(row).astype(np.int64)
    _check_same_aspect(row["image_id"], pred_ids.shape, gt.shape)
    size = short_side_size(*gt.shape, context.short_side)
    gt = resize_nearest(gt, size).astype(np.int64)
    lut = np.full(max(int(pred_ids.max()) + 1, len(context.lut)), k, dtype=np.int64)
    lut[: len(context.lut)] = context.lut
    pred = lut[resize_nearest(pred_ids, size)]
    valid = gt != IGNORE
    codes = gt[valid] * (k + 1) + pred[valid]
    index, count = np.unique(codes, return_counts=True)
    confusion = np.zeros((k, k + 1), dtype=np.int64)
    confusion.flat[index] = count
    metrics = confusion_metrics(confusion)
    result = {
        "image_id": row["image_id"],
        "run_id": row["run_id"],
        "confusion_index": index.astype(np.int64),
        "confusion_count": count.astype(np.int64),
        "miou": metrics["miou"],
        "pixel_accuracy": metrics["pixel_accuracy"],
        "saliency_confusion": np.zeros(4, dtype=np.int64),
        "saliency_iou": math.nan,
        "gt_classes": sorted(set(np.unique(gt[valid]).tolist())),
        "pred_classes": sorted(set(np.unique(pred).tolist()) - {k}),
    }
    saliency = decode_saliency(row.get("saliency_png"), size)
    if saliency is not None:
        fg_pred = (saliency >= SALIENCY_THRESHOLD)[valid]
        fg_gt = gt[valid] != 0
        sal = np.bincount(fg_gt.astype(np.int64) * 2 + fg_pred, minlength=4).astype(np.int64)
        result["saliency_confusion"] = sal
        result["saliency_iou"] = _iou(sal[3], sal[2] + sal[3] + sal[1])
    return result


def _check_same_aspect(image_id: str, pred: tuple[int, ...], gt: tuple[int, ...]) -> None:
    # Different sizes are fine (nearest resize), a different shape means the wrong picture (or
    # an orientation the labels and the ground truth disagree on): no score would mean anything.
    if abs(pred[0] / pred[1] - gt[0] / gt[1]) > 0.02 * gt[0] / gt[1]:
        raise ValueError(f"labels of {image_id!r} are {pred[0]} x {pred[1]} but its ground truth is {gt[0]} x {gt[1]}: "
                         "not the same picture (or EXIF orientation differs)")


def _iou(tp: float, union: float) -> float:
    return float(tp) / float(union) if union else math.nan


def confusion_metrics(confusion: np.ndarray) -> dict[str, Any]:
    """IoU per class (NaN where the class is in neither GT nor prediction), mIoU, pixel accuracy
    and mean class accuracy (fractions) of a K x (K + 1) confusion matrix."""
    k = confusion.shape[0]
    tp = np.diag(confusion[:, :k]).astype(np.float64)
    gt_pixels = confusion.sum(axis=1).astype(np.float64)
    pred_pixels = confusion[:, :k].sum(axis=0).astype(np.float64)
    union = gt_pixels + pred_pixels - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        accuracy = np.where(gt_pixels > 0, tp / gt_pixels, np.nan)
    total = gt_pixels.sum()
    return {
        "iou": iou,
        "class_accuracy": accuracy,
        "gt_pixels": gt_pixels.astype(np.int64),
        "pred_pixels": pred_pixels.astype(np.int64),
        "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
        "pixel_accuracy": float(tp.sum() / total) if total else math.nan,
        "mean_class_accuracy": float(np.nanmean(accuracy)) if np.isfinite(accuracy).any() else math.nan,
    }


def score_batch(batch: pa.Table | Iterable[dict], context: EvalContext) -> list[dict]:
    """Score a batch of ok label rows (a table or dicts)."""
    rows = iter_rows(batch) if isinstance(batch, pa.Table) else batch
    return [score_row(row, context) for row in rows]


def _score_arrow(batch: pa.Table, context: EvalContext) -> pa.Table:
    results = score_batch(batch, context)
    columns = {
        "image_id": [r["image_id"] for r in results],
        "confusion_index": [r["confusion_index"].tolist() for r in results],
        "confusion_count": [r["confusion_count"].tolist() for r in results],
        "saliency_confusion": [r["saliency_confusion"].tolist() for r in results],
        "miou": [r["miou"] for r in results],
        "pixel_accuracy": [r["pixel_accuracy"] for r in results],
        "saliency_iou": [r["saliency_iou"] for r in results],
        "gt_classes": [r["gt_classes"] for r in results],
        "pred_classes": [r["pred_classes"] for r in results],
    }
    return pa.table(columns, schema=pa.schema([
        ("image_id", pa.string()), ("confusion_index", pa.list_(pa.int64())), ("confusion_count", pa.list_(pa.int64())),
        ("saliency_confusion", pa.list_(pa.int64())), ("miou", pa.float64()), ("pixel_accuracy", pa.float64()),
        ("saliency_iou", pa.float64()), ("gt_classes", pa.list_(pa.int64())), ("pred_classes", pa.list_(pa.int64())),
    ]))


class _ScoreArrow:
    """``map_batches`` function: label rows -> per-image results (picklable)."""

    def __init__(self, context: EvalContext, keep: frozenset[str]):
        self.context, self.keep = context, keep

    def __call__(self, batch: pa.Table) -> pa.Table:
        mask = pa.array([i in self.keep for i in batch.column("image_id").to_pylist()], type=pa.bool_())
        return _score_arrow(batch.filter(mask), self.context)


@dataclass
class EvaluationReport:
    """Result of :func:`evaluate`. ``confusion``: K x (K + 1) pixel counts (last column: pixels no
    predicted class covers); ``images``: per-image results."""

    class_names: tuple[str, ...]
    confusion: np.ndarray
    saliency_confusion: np.ndarray
    images: list[dict]
    counts: dict[str, int]
    class_sources: dict[str, list[str]]
    backend: str
    seconds: float
    short_side: int = SHORT_SIDE
    unmatched_examples: list[str] = field(default_factory=list)
    missing_examples: list[str] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, Any]:
        return confusion_metrics(self.confusion)

    @property
    def miou(self) -> float:
        """Dataset mIoU as a fraction (x 100 for the paper's numbers)."""
        return self.metrics["miou"]

    def to_dict(self) -> dict:
        m = self.metrics
        sal = self.saliency_confusion
        present = int(np.isfinite(m["iou"]).sum())
        return {
            "protocol": {
                "ground_truth_short_side": self.short_side,
                "resize": "nearest (GT and prediction)",
                "miou": "one confusion matrix over the data set; IoU averaged over all classes incl. background; "
                        "classes absent from both GT and prediction have no IoU (null) and are left out of the mean",
                "saliency": f"saliency_png resized bilinearly to the GT size, >= {SALIENCY_THRESHOLD} = foreground, "
                            "vs GT non-background; ignore pixels left out",
                "units": "percent",
            },
            "backend": self.backend,
            "seconds": round(self.seconds, 3),
            "counts": self.counts,
            "miou": _pct(m["miou"]),
            "classes_in_mean": present,
            "classes_total": len(self.class_names),
            "pixel_accuracy": _pct(m["pixel_accuracy"]),
            "mean_class_accuracy": _pct(m["mean_class_accuracy"]),
            "saliency": {
                "foreground_iou": _pct(_iou(sal[3], sal[1] + sal[2] + sal[3])),
                "background_iou": _pct(_iou(sal[0], sal[0] + sal[1] + sal[2])),
            },
            "classes": [
                {"id": i, "name": name, "iou": _pct(m["iou"][i]), "accuracy": _pct(m["class_accuracy"][i]),
                 "gt_pixels": int(m["gt_pixels"][i]), "pred_pixels": int(m["pred_pixels"][i]),
                 "predicted_as": self.class_sources.get(name, [])}
                for i, name in enumerate(self.class_names)
            ],
            "images": [
                {"image_id": r["image_id"], "miou": _pct(r["miou"]), "pixel_accuracy": _pct(r["pixel_accuracy"]),
                 "saliency_iou": _pct(r["saliency_iou"]),
                 "gt_classes": [self.class_names[c] for c in r["gt_classes"]],
                 "pred_classes": [self.class_names[c] for c in r["pred_classes"]]}
                for r in sorted(self.images, key=lambda r: (_sort_key(r["miou"]), r["image_id"]))
            ],
            "unmatched_examples": self.unmatched_examples,
            "missing_examples": self.missing_examples,
            "confusion": self.confusion.tolist(),
        }

    def table(self, worst: int = 10) -> str:
        """A readable summary: per-class IoU, the dataset numbers, and the worst images."""
        d = self.to_dict()
        lines = [f"{'id':>3}  {'class':<22}{'IoU':>7}{'acc':>7}{'GT px':>12}{'pred px':>12}"]
        for c in d["classes"]:
            lines.append(f"{c['id']:>3}  {c['name'][:21]:<22}{_fmt(c['iou']):>7}{_fmt(c['accuracy']):>7}"
                         f"{c['gt_pixels']:>12}{c['pred_pixels']:>12}")
        n = d["counts"]
        lines += [
            "",
            f"mIoU {_fmt(d['miou'])} over {d['classes_in_mean']} of {d['classes_total']} classes "
            f"({d['classes_total'] - d['classes_in_mean']} absent from GT and prediction, left out)",
            f"pixel accuracy {_fmt(d['pixel_accuracy'])}   mean class accuracy {_fmt(d['mean_class_accuracy'])}",
            f"saliency alone: foreground IoU {_fmt(d['saliency']['foreground_iou'])}   "
            f"background IoU {_fmt(d['saliency']['background_iou'])}",
            f"images: {n['evaluated']} evaluated, {n['label_errors']} label errors, {n['missing']} GT images without labels, "
            f"{n['unmatched']} labelled images without GT   ({self.backend}, {self.seconds:.1f} s)",
        ]
        if d["images"]:
            lines += ["", f"worst {min(worst, len(d['images']))} images by mIoU:"]
            for r in d["images"][:worst]:
                lines.append(f"  {_fmt(r['miou']):>6}  {r['image_id']}")
        return "\n".join(lines)

    def write_json(self, uri: str, storage: StorageOptions | None = None) -> None:
        from clipdiy.storage import open_filesystem

        fs, path = open_filesystem(uri, storage)
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent:
            fs.makedirs(parent, exist_ok=True)
        with fs.open(path, "w") as file:
            json.dump(self.to_dict(), file, indent=1)


def _pct(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else round(100.0 * float(value), 4)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _sort_key(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def evaluate(
    labels: str | Sequence[str],
    ground_truth: GroundTruth,
    *,
    class_map: Mapping[str, str] | None = None,
    class_names: Sequence[str] | None = None,
    use_ray: bool | None = None,
    local_below: int = LOCAL_BELOW,
    short_side: int = SHORT_SIDE,
    finished_only: bool = True,
    storage: StorageOptions | None = None,
) -> EvaluationReport:
    """Score one or more labels outputs against ``ground_truth`` (see the module docstring).

    ``class_names``: the labels' vocabulary (index = class id); by default from the runs'
    manifests. ``use_ray``: ``None`` picks Ray for ``local_below`` images or more (Ray Data maps
    over the shards, the driver sums the per-image confusion matrices); ``False`` runs in-process.
    """
    start = time.perf_counter()
    runs = list_runs(labels, finished_only=finished_only, storage=storage)
    if not runs:
        raise FileNotFoundError(f"no {'finished ' if finished_only else ''}runs in {labels}")
    pred_names = tuple(class_names) if class_names is not None else vocabulary_of(runs)
    lut = class_mapping(pred_names, ground_truth.class_names, class_map)
    context = EvalContext(ground_truth=ground_truth, lut=lut, short_side=short_side)

    index = build_row_index(runs)
    gt_keys = set(ground_truth.keys())
    gt_key_array = pa.array(sorted(gt_keys), type=pa.string())
    by_stem: dict[str, str] = {}
    unmatched_count, unmatched, errors, keep, scored_shards = 0, [], 0, set(), set()
    # Shard by shard over two columns: only rows whose stem has ground truth become Python
    # objects (at most one per GT image); the others are counted.
    for number, table in iter_winning_shards(runs, index, ["image_id", "status"]):
        matched = pc.is_in(stems(table.column("image_id")), value_set=gt_key_array).to_numpy(zero_copy_only=False)
        if len(unmatched) < UNMATCHED_EXAMPLES and not matched.all():
            unmatched.extend(table.column("image_id").filter(pa.array(~matched))[: UNMATCHED_EXAMPLES - len(unmatched)].to_pylist())
        unmatched_count += int((~matched).sum())
        hits = table.filter(pa.array(matched))
        for image_id, status in zip(hits.column("image_id").to_pylist(), hits.column("status").to_pylist()):
            key = stem(image_id)
            if key in by_stem:
                raise ValueError(f"labels {by_stem[key]!r} and {image_id!r} both match ground truth {key!r}; evaluate them separately")
            by_stem[key] = image_id
            if status == "ok":
                keep.add(image_id)
                scored_shards.add(number)
            else:
                errors += 1
    missing = sorted(gt_keys - {stem(i) for i in keep})

    if use_ray is None:
        use_ray = len(keep) >= local_below
    images = _score_on_ray(runs, index, context, frozenset(keep)) if use_ray else _score_locally(index, scored_shards, context, keep)

    k = context.num_classes
    confusion = np.zeros(k * (k + 1), dtype=np.int64)
    saliency = np.zeros(4, dtype=np.int64)
    for result in images:
        np.add.at(confusion, np.asarray(result["confusion_index"], dtype=np.int64), np.asarray(result["confusion_count"], dtype=np.int64))
        saliency += np.asarray(result["saliency_confusion"], dtype=np.int64)
    sources: dict[str, list[str]] = {}
    for pred_id, gt_id in enumerate(lut.tolist()):
        sources.setdefault(ground_truth.class_names[gt_id], []).append(pred_names[pred_id])
    return EvaluationReport(
        class_names=tuple(ground_truth.class_names),
        confusion=confusion.reshape(k, k + 1),
        saliency_confusion=saliency,
        images=images,
        counts={"gt_images": len(gt_keys), "evaluated": len(images), "label_errors": errors,
                "missing": len(missing), "unmatched": unmatched_count, "runs": len(runs)},
        class_sources=sources,
        backend="ray" if use_ray else "local",
        seconds=time.perf_counter() - start,
        short_side=short_side,
        unmatched_examples=unmatched,
        missing_examples=missing[:UNMATCHED_EXAMPLES],
    )


def _score_locally(index: RowIndex, shards: set[int], context: EvalContext, keep: set[str]) -> list[dict]:
    """Score the kept rows in this process, reading only the shards that hold them, one at a time."""
    wanted = pa.array(sorted(keep), type=pa.string())
    results = []
    for number in sorted(shards):
        run, path = index.shards[number]
        table = read_shard(run, path)
        winners = index.winners(number)
        keep_rows = pc.is_in(table.column("image_id"), value_set=wanted).to_numpy(zero_copy_only=False)
        results.extend(score_batch(table.filter(pa.array(keep_rows if winners is None else keep_rows & winners)), context))
    return sorted(results, key=lambda r: r["image_id"])


def _score_on_ray(runs: Sequence[Run], index: RowIndex, context: EvalContext, keep: frozenset[str]) -> list[dict]:
    from clipdiy.labels.store import ray_dataset

    dataset = ray_dataset(runs, index=index).map_batches(
        _ScoreArrow(context, keep), batch_format="pyarrow", batch_size=16, udf_modifying_row_count=True  # drops rows
    )
    results = []
    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=256):
        results.extend(batch.to_pylist())
    return sorted(results, key=lambda r: r["image_id"])
