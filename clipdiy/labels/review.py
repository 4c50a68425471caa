"""Doubtful images to Label Studio and corrections back (``jobs/review.py``).

Export: the rows the feed would yield (:class:`~clipdiy.labels.feed.FeedFilter`), lowest mean mask score
first (area-weighted, as the report's image score), ``count`` of them, become Label Studio tasks:
``data`` holds the image URL (for a sample inside a WebDataset shard or a Parquet file, which
Label Studio cannot open, a copy fetched by the row's address, :func:`export_images`) and the
row's identity (``image_id``, ``run_id``); ``predictions``
holds one prediction per task, with the row's model fingerprint as ``model_version``, its mean
mask score as ``score``, and one ``brushlabels`` result per class mask (Label Studio's brush RLE,
:mod:`clipdiy.labels.brush`) scored with the mask's score. A labelling config (XML) names the
vocabulary's classes.

Import (:func:`clipdiy.pipeline.control.corrections.import_corrections`, the writing half, with the job's
run machinery): Label Studio's JSON export becomes rows marked ``source = human`` (the annotator's id, the
time the annotation was saved) in a run of its own under OUTPUT, written as the job writes runs
(shards, then the manifest last, under the output's lock). Each row copies the identity of the
row it corrects (uri, source size/etag/mtime, size, vocabulary, model columns) and records the
image version corrected (``corrected_run_started_at``), so the readers (:mod:`clipdiy.labels.row_index`)
prefer it over the model rows of that version; nothing the model wrote is touched. A corrected
row's masks are the annotation's brush regions (score 1.0: a person drew them); pixels no region
covers are in no mask, so the feed yields them as 255 (ignore); where regions overlap the later
one wins.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipdiy import rle
from clipdiy.image_address import FILES, ImageAddress
from clipdiy.labels import brush
from clipdiy.labels.feed import FeedFilter, _runs, _Selector
from clipdiy.labels.image_copies import write_copy
from clipdiy.labels.palette import IGNORE, class_colour
from clipdiy.labels.report import _Lowest, mean_mask_scores, model_fingerprint
from clipdiy.labels.row_index import build_row_index
from clipdiy.labels.runs import Run, read_shard, vocabulary_of
from clipdiy.schema import LABEL_SCHEMA_VERSION, label_schema
from clipdiy.storage import StorageOptions, open_filesystem

#: The names of the config's tags, which every result refers to.
FROM_NAME, TO_NAME = "label", "image"
#: Mask score of a human-drawn mask.
HUMAN_SCORE = 1.0


# ---------------------------------------------------------------- export

def labelling_config(class_names: Sequence[str]) -> str:
    """Label Studio labelling config: the image and one brush label per class, in the palette's
    colours (the previews' colours)."""
    labels = "\n".join(
        f'    <Label value="{html.escape(name, quote=True)}" background="#{"%02x%02x%02x" % class_colour(i)}"/>'
        for i, name in enumerate(class_names))
    return (f'<View>\n  <Image name="{TO_NAME}" value="$image" zoom="true"/>\n'
            f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">\n{labels}\n  </BrushLabels>\n</View>\n')


def image_url(uri: str, local_files_root: str | None = None) -> str:
    """The URL Label Studio shows for a row's image: under ``local_files_root`` (Label Studio's
    ``LOCAL_FILES_DOCUMENT_ROOT``, with local file serving on) a ``/data/local-files/?d=`` URL, the
    relative path percent-encoded (``&``, ``#``, ``+``, ``%``, spaces and non-ASCII in a file name would
    otherwise end or change the query; a name that is not UTF-8 keeps its bytes); any other URI as
    it is (``s3://`` and ``gs://`` are resolved by a cloud storage connected to the project)."""
    if local_files_root:
        root = os.path.abspath(local_files_root)
        path = os.path.abspath(uri[len("file://"):] if uri.startswith("file://") else uri)
        if os.path.commonpath([root, path]) == root:
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            return "/data/local-files/?d=" + urllib.parse.quote(relative, safe="/", errors="surrogateescape")
    return uri


def _mask_result(mask: dict, height: int, width: int) -> dict:
    decoded = rle.decode({"size": [int(v) for v in mask["rle_size"]], "counts": mask["rle_counts"]})
    return {
        "id": f"class-{mask['class_id']}", "from_name": FROM_NAME, "to_name": TO_NAME, "type": "brushlabels",
        "origin": "prediction", "original_width": width, "original_height": height, "image_rotation": 0,
        "score": float(mask["score"]),
        "value": {"format": "rle", "rle": brush.encode(decoded), "brushlabels": [mask["class_name"]]},
    }


def task_of(row: dict, score: float, local_files_root: str | None = None, image: str | None = None) -> dict:
    """One Label Studio task with the row's masks as its prediction. ``image``: where the
    exported copy of a shard sample's image is (:func:`export_images`); None: the row's ``uri``."""
    height, width = int(row["height"]), int(row["width"])
    started = row["run_started_at"]
    return {
        "data": {"image": image_url(image or row["uri"], local_files_root), "image_id": row["image_id"], "uri": row["uri"],
                 "run_id": row["run_id"], "run_started_at": started.isoformat() if started else None},
        "predictions": [{
            "model_version": model_fingerprint(row), "score": float(score),
            "result": [_mask_result(m, height, width) for m in row["masks"]],
        }],
    }


def select_rows(runs: Sequence[Run], feed_filter: FeedFilter, count: int, class_names: Sequence[str]) -> list[tuple[dict, float]]:
    """(row, mean mask score) of the ``count`` rows the feed keeps with the lowest mean mask
    score, lowest first; shard by shard, holding ``count`` candidates at most."""
    selector = _Selector(class_names, feed_filter)
    index = build_row_index(runs)
    lowest = _Lowest(count)
    columns = list(dict.fromkeys([*selector.filter_columns, "masks"]))
    for number, (run, shard) in enumerate(index.shards):
        table = read_shard(run, shard, columns)
        keep = selector.keep_table(table)
        winners = index.winners(number)
        if winners is not None:
            keep &= winners
        scores = mean_mask_scores(table)
        positions = np.flatnonzero(keep & np.isfinite(scores))
        lowest.offer(scores[positions], number, positions)
    chosen = []
    for score, shard, row in zip(lowest.score.tolist(), lowest.shard.tolist(), lowest.row.tolist()):
        run, path = index.shards[shard]
        chosen.append((read_shard(run, path).slice(row, 1).to_pylist()[0], score))
    return chosen


def images_folder(tasks_uri: str) -> str:
    """Where :func:`export_tasks` puts the images of shard samples by default: beside the tasks
    JSON, ``<tasks without .json>_images/``."""
    return (tasks_uri[:-5] if tasks_uri.endswith(".json") else tasks_uri).rstrip("/") + "_images"


def export_images(rows: Sequence[dict], images_to: str, storage: StorageOptions | None = None) -> list[str | None]:
    """For each row whose image lies inside a shard (a WebDataset member or a Parquet cell,
    which Label Studio cannot open), a copy of its image fetched by the row's address (one
    ranged read, :mod:`clipdiy.labels.image_copies`) under ``images_to``; the copies' URIs, None
    for a loose object (Label Studio opens its ``uri`` itself)."""
    written: list[str | None] = []
    fs = root = None
    for row in rows:
        if ImageAddress.from_row(row).format == FILES:
            written.append(None)
            continue
        if fs is None:
            fs, root = open_filesystem(images_to, storage)
        written.append(images_to.rstrip("/") + "/" + write_copy(row, fs, root, storage))
    return written


def export_tasks(outputs: str | Sequence[str], tasks_uri: str, config_uri: str, *, feed_filter: FeedFilter = FeedFilter(),
                 count: int = 100, local_files_root: str | None = None, storage: StorageOptions | None = None,
                 images_to: str | None = None) -> dict:
    """Write the tasks JSON and the labelling config; returns a summary. The images of shard
    samples are fetched by address and written to ``images_to`` (default :func:`images_folder`),
    which the tasks name."""
    runs = _runs(outputs, feed_filter, storage)
    class_names = vocabulary_of(runs)
    chosen = select_rows(runs, feed_filter, count, class_names)
    images = export_images([row for row, _ in chosen], images_to or images_folder(tasks_uri), storage)
    tasks = [task_of(row, score, local_files_root, image) for (row, score), image in zip(chosen, images)]
    for uri, text in ((tasks_uri, json.dumps(tasks)), (config_uri, labelling_config(class_names))):
        fs, path = open_filesystem(uri, storage)
        fs.pipe_file(path, text.encode("utf-8"))
    return {"tasks": len(tasks), "masks": sum(len(t["predictions"][0]["result"]) for t in tasks),
            "images_written": sum(image is not None for image in images),
            "lowest_score": chosen[0][1] if chosen else None, "highest_score": chosen[-1][1] if chosen else None}


# ---------------------------------------------------------------- import

@dataclass(frozen=True)
class Correction:
    """One annotation read from a Label Studio export: the row it corrects (``run_id`` and
    ``image_id``), the annotator, when it was saved, and its brush results."""

    image_id: str
    run_id: str
    annotator: str
    annotated_at: dt.datetime
    results: tuple[dict, ...]


def _time(value: str | None) -> dt.datetime:
    if not value:
        return dt.datetime.now(dt.timezone.utc)
    parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)


def corrections(export: list[dict]) -> list[Correction]:
    """The latest submitted (not cancelled) annotation of every task that has one."""
    found = []
    for task in export:
        annotations = [a for a in task.get("annotations") or [] if not a.get("was_cancelled")]
        if not annotations:
            continue
        latest = max(annotations, key=lambda a: (_time(a.get("updated_at") or a.get("created_at")), a.get("id") or 0))
        who = latest.get("completed_by")
        annotator = who.get("id") if isinstance(who, dict) else who
        data = task.get("data") or {}
        if "image_id" not in data or "run_id" not in data:
            raise ValueError(f"task {task.get('id')}: its data lacks image_id/run_id (not exported by jobs/review.py)")
        found.append(Correction(data["image_id"], data["run_id"], f"label-studio:{annotator}",
                                _time(latest.get("updated_at") or latest.get("created_at")),
                                tuple(r for r in latest.get("result") or [] if r.get("type", "").lower() == "brushlabels")))
    return found


def latest_per_image(found: Sequence[Correction], rows: dict[tuple[str, str], tuple[dict, object]]) -> list[Correction]:
    """One correction per image: a row exported twice (two Label Studio tasks, one import run
    twice, or two exports of one image from different runs) would otherwise give two human rows
    for one image in one run. The correction of the newest image version wins (the version a
    human row corrects: see :func:`human_row`), then the latest saved annotation, then the later
    task in the export."""
    def version(c: Correction):
        row = rows[(c.run_id, c.image_id)][0]
        basis = row.get("corrected_run_started_at") if row.get("source") == "human" else row.get("run_started_at")
        return basis or dt.datetime.min.replace(tzinfo=dt.timezone.utc)

    chosen: dict[str, tuple[tuple, Correction]] = {}
    for order, c in enumerate(found):
        key = (version(c), c.annotated_at, order)
        if c.image_id not in chosen or key > chosen[c.image_id][0]:
            chosen[c.image_id] = (key, c)
    return [c for _, c in chosen.values()]


def corrected_label_map(correction: Correction, height: int, width: int, class_names: Sequence[str]) -> np.ndarray:
    """H x W uint16 class ids of the annotation's brush regions (IGNORE where none); later
    regions over earlier ones."""
    index = {name: i for i, name in enumerate(class_names)}
    label = np.full((height, width), IGNORE, np.uint16)
    for result in correction.results:
        value = result["value"]
        names = value.get("brushlabels") or []
        if len(names) != 1 or names[0] not in index:
            raise ValueError(f"{correction.image_id}: a brush region labelled {names}, not one class of the vocabulary")
        if (int(result["original_height"]), int(result["original_width"])) != (height, width):
            raise ValueError(f"{correction.image_id}: annotated at {result['original_width']} x "
                             f"{result['original_height']}, the row is {width} x {height}")
        label[brush.decode(value["rle"], height, width)] = index[names[0]]
    return label


def human_row(row: dict, correction: Correction, label: np.ndarray, class_names: Sequence[str], run_id: str,
              started: dt.datetime) -> dict:
    """The human row correcting ``row``: its identity, the annotation's masks."""
    masks = []
    for class_id in np.unique(label[label != IGNORE]).tolist():
        mask = label == class_id
        encoded = rle.encode(mask)
        masks.append({"class_id": class_id, "class_name": class_names[class_id], "rle_size": encoded["size"],
                      "rle_counts": encoded["counts"], "area": int(mask.sum()), "bbox": rle.bbox_of_mask(mask),
                      "score": HUMAN_SCORE})
    basis = row.get("corrected_run_started_at") if row.get("source") == "human" else row["run_started_at"]
    labelled = label != IGNORE
    new = {name: row.get(name) for name in label_schema().names}
    new.update(
        schema_version=LABEL_SCHEMA_VERSION, run_id=run_id, run_started_at=started, status="ok", error_kind=None,
        error=None, class_scores=None, masks=masks, saliency_png=None,
        foreground_fraction=float((labelled & (label != 0)).sum() / max(1, labelled.sum())),
        source="human", annotator=correction.annotator, annotated_at=correction.annotated_at,
        corrected_run_started_at=basis,
    )
    return new


def _corrected_rows(runs: Sequence[Run], wanted: dict[str, set[str]]) -> dict[tuple[str, str], tuple[dict, Run]]:
    """The rows the corrections were made on, by (run_id, image_id), read from their runs' shards."""
    found: dict[tuple[str, str], tuple[dict, Run]] = {}
    for run in runs:
        ids = wanted.get(run.run_id)
        if not ids:
            continue
        for shard in run.shards:
            id_column = read_shard(run, shard, ["image_id"]).column("image_id")
            hits = np.flatnonzero(pc.is_in(id_column, value_set=pa.array(sorted(ids))).to_numpy(zero_copy_only=False))
            if hits.size:
                for row in read_shard(run, shard).take(pa.array(hits)).to_pylist():
                    found[(run.run_id, row["image_id"])] = (row, run)
    return found
