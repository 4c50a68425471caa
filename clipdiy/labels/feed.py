"""The feed to downstream training: labels outputs as (image, label map) pairs, and exporters.

- :class:`LabelDataset` (map-style) and :class:`LabelIterableDataset` (streams shard by shard,
  split over DataLoader workers and distributed ranks) for PyTorch; :func:`read_labels` for Ray
  Data. All read one or more labels outputs; an ``image_id`` labelled by several runs comes from
  the latest run (the latest write: :mod:`clipdiy.labels.row_index`). None holds the rows: the
  map-style dataset keeps an index of 8 bytes a row, the others read shard by shard.
- :func:`export_coco` writes a COCO instances JSON (one RLE annotation per class mask) and
  :func:`export_voc_masks` semantic PNGs in VOC palette form, for detectron2, mmsegmentation and
  the like.

What :class:`FeedFilter` does, precisely:

- Images: only rows of finished runs (``finished_only``, the default) with ``status = ok``, whose
  ``foreground_fraction`` >= ``min_foreground_fraction``, and, when ``classes`` is given or
  ``min_class_score`` > 0, that hold at least one non-background class mask of the subset with
  a score >= ``min_class_score``.
- Pixels (label value 255 = ignore): the output stores one confidence per class mask (its
  ``score``: the mean class probability over the mask's pixels at model resolution), not one per
  pixel. So a pixel's label confidence is the score of the class mask it belongs to, and
  ``ignore_below`` sets every pixel of a mask whose score is below it to 255. Pixels of
  non-background classes outside ``classes`` are set to 255 too (they are objects of another
  class, so teaching them as background would be wrong). Class ids stay the vocabulary's ids.

Items are ``(image, label)``: H x W x 3 uint8 RGB (EXIF orientation applied, as the job saw it)
and H x W uint8 class ids (255 = ignore), both numpy; pass ``transform(image, label)`` to turn
them into tensors or augment them.
"""

from __future__ import annotations

import json
import os
import posixpath
import random
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch.utils.data

from clipdiy.image_address import ADDRESS_COLUMNS
from clipdiy.labels.evaluation import normalise_name
from clipdiy.labels.image_copies import relative_path, write_copy
from clipdiy.labels.palette import IGNORE, palette_png_bytes
from clipdiy.labels.row_index import RowIndex, build_row_index
from clipdiy.labels.runs import Run, list_runs, read_shard, vocabulary_of
from clipdiy.labels.store import decode_label_map, iter_rows, iter_winning_shards, load_image
from clipdiy.storage import StorageOptions, open_filesystem

#: Columns the feed reads (the saliency PNG is left in the files), and where a shard has them
#: the image's address (:data:`~clipdiy.image_address.ADDRESS_COLUMNS`).
FEED_COLUMNS = ("image_id", "uri", "run_id", "run_started_at", "status", "width", "height", "masks",
                "foreground_fraction", "class_scores")


@dataclass(frozen=True)
class FeedFilter:
    """Which images and pixels the feed yields (see the module docstring for the exact rules)."""

    finished_only: bool = True
    classes: tuple[str, ...] | None = None
    min_class_score: float = 0.0
    min_foreground_fraction: float = 0.0
    ignore_below: float | None = None


class _Selector:
    """A :class:`FeedFilter` bound to a vocabulary: decides images, builds label maps (picklable)."""

    def __init__(self, class_names: Sequence[str], feed_filter: FeedFilter):
        self.class_names = tuple(class_names)
        self.filter = feed_filter
        self.subset: frozenset[int] | None = None
        if feed_filter.classes is not None:
            index = {normalise_name(n): i for i, n in enumerate(self.class_names)}
            unknown = [c for c in feed_filter.classes if normalise_name(c) not in index]
            if unknown:
                raise ValueError(f"classes {unknown} are not in the labels' vocabulary {list(self.class_names)}")
            self.subset = frozenset(index[normalise_name(c)] for c in feed_filter.classes)

    def _in_subset(self, class_id: int) -> bool:
        return self.subset is None or class_id in self.subset

    def keep(self, row: dict) -> bool:
        f = self.filter
        if row.get("status") != "ok" or not row.get("masks"):
            return False
        if (row.get("foreground_fraction") or 0.0) < f.min_foreground_fraction:
            return False
        if self.subset is None and f.min_class_score <= 0:
            return True
        return any(m["class_id"] != 0 and self._in_subset(m["class_id"]) and m["score"] >= f.min_class_score
                   for m in row["masks"])

    @property
    def filter_columns(self) -> tuple[str, ...]:
        """The columns :meth:`keep_table` reads."""
        return ("status", "foreground_fraction", "masks")

    def keep_table(self, table: pa.Table) -> np.ndarray:
        """:meth:`keep` of every row of a table (bool array), in Arrow and numpy."""
        f = self.filter
        keep = pc.equal(table.column("status"), "ok").fill_null(False).to_numpy(zero_copy_only=False)
        masks = table.column("masks").combine_chunks()
        keep &= pc.list_value_length(masks).fill_null(0).to_numpy(zero_copy_only=False) > 0
        fraction = pc.cast(table.column("foreground_fraction"), pa.float64()).fill_null(0.0).to_numpy(zero_copy_only=False)
        keep &= ~(fraction < f.min_foreground_fraction)
        if self.subset is None and f.min_class_score <= 0:
            return keep
        flat = pc.list_flatten(masks)
        parents = pc.list_parent_indices(masks).to_numpy(zero_copy_only=False)
        class_id = pc.struct_field(flat, "class_id").to_numpy(zero_copy_only=False)
        score = pc.cast(pc.struct_field(flat, "score"), pa.float64()).to_numpy(zero_copy_only=False)
        good = (class_id != 0) & (score >= f.min_class_score)
        if self.subset is not None:
            good &= np.isin(class_id, sorted(self.subset))
        has = np.zeros(table.num_rows, dtype=bool)
        has[parents[good]] = True
        return keep & has

    def kept_masks(self, row: dict) -> list[dict]:
        """The masks whose pixels keep their label (others become 255)."""
        threshold = self.filter.ignore_below
        return [m for m in row["masks"]
                if (m["class_id"] == 0 or self._in_subset(m["class_id"])) and (threshold is None or m["score"] >= threshold)]

    def label_map(self, row: dict) -> np.ndarray:
        """H x W uint8 class ids, 255 where ignored."""
        if len(self.class_names) > IGNORE:
            raise ValueError(f"a vocabulary of {len(self.class_names)} classes does not fit uint8 labels with 255 = ignore")
        kept = {m["class_id"] for m in self.kept_masks(row)}
        label = decode_label_map(row, dtype=np.uint8)
        if len(kept) < len(row["masks"]):
            label[~np.isin(label, list(kept))] = IGNORE
        return label


def _runs(outputs: str | Sequence[str], feed_filter: FeedFilter, storage: StorageOptions | None) -> list[Run]:
    runs = list_runs(outputs, finished_only=feed_filter.finished_only, storage=storage)
    if not runs:
        raise FileNotFoundError(f"no {'finished ' if feed_filter.finished_only else ''}runs in {outputs}")
    return runs


def _kept_index(runs: Sequence[Run], selector: _Selector) -> RowIndex:
    """The winning rows the selector keeps, in ``image_id`` order (a compact index)."""
    return build_row_index(runs, sort_by_id=True, row_filter=selector.keep_table, filter_columns=selector.filter_columns)


class RowView(Sequence):
    """The rows behind a :class:`~clipdiy.labels.row_index.RowIndex`'s ``sorted_positions``, read on
    access (item ``i``: a dict of ``columns``); the last few shards read are cached, nothing else
    is held."""

    def __init__(self, index: RowIndex, columns: Sequence[str] | None = FEED_COLUMNS, cached_shards: int = 2):
        self.index, self.columns, self.cached_shards = index, columns, cached_shards
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()

    def __len__(self) -> int:
        return len(self.index.sorted_positions)

    def _shard(self, number: int) -> pa.Table:
        if number in self._cache:
            self._cache.move_to_end(number)
        else:
            run, shard = self.index.shards[number]
            self._cache[number] = read_shard(run, shard, self.columns, ADDRESS_COLUMNS if self.columns else ())
            while len(self._cache) > self.cached_shards:
                self._cache.popitem(last=False)
        return self._cache[number]

    def __getitem__(self, item: int | slice) -> Any:
        if isinstance(item, slice):
            return [self[i] for i in range(*item.indices(len(self)))]
        position = self.index.sorted_positions[item]  # IndexError past the end, negative from the end
        shard, row = self.index.locate(np.array([position]))
        return self._shard(int(shard[0])).slice(int(row[0]), 1).to_pylist()[0]

    def __iter__(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield self[i]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_cache": OrderedDict()}


def select_rows(
    outputs: str | Sequence[str], feed_filter: FeedFilter = FeedFilter(), storage: StorageOptions | None = None,
    class_names: Sequence[str] | None = None,
) -> tuple[list[dict], tuple[str, ...]]:
    """The rows the filter keeps (latest write per image, sorted by ``image_id``) and the
    vocabulary, all in one list: for small outputs (:class:`LabelDataset` holds an index instead)."""
    runs = _runs(outputs, feed_filter, storage)
    names = tuple(class_names) if class_names is not None else vocabulary_of(runs)
    index = _kept_index(runs, _Selector(names, feed_filter))
    rows: list[dict | None] = [None] * len(index.sorted_positions)
    for shard, row_numbers, slots in index.by_shard(index.sorted_positions):
        run, path = index.shards[shard]
        for slot, row in zip(slots.tolist(), read_shard(run, path, FEED_COLUMNS, ADDRESS_COLUMNS).take(pa.array(row_numbers)).to_pylist()):
            rows[slot] = row
    return rows, names


def _pair(row: dict, selector: _Selector, storage: StorageOptions | None) -> tuple[np.ndarray, np.ndarray]:
    image = load_image(row, storage)  # by the row's address: one ranged read
    if image.shape[:2] != (row["height"], row["width"]):
        raise ValueError(f"{row['uri']} is now {image.shape[1]} x {image.shape[0]}, its labels are "
                         f"{row['width']} x {row['height']}: the image changed since it was labelled; label it again")
    return image, selector.label_map(row)


class LabelDataset(torch.utils.data.Dataset):
    """Map-style dataset of (image, label map) pairs over labels outputs, in ``image_id`` order.

    It holds a compact index (8 bytes a kept row: :mod:`clipdiy.labels.row_index`), not the rows: item
    ``i`` reads its row from its shard (the last shards read are cached) and its image.
    ``records[i]`` is the row behind item ``i`` (read on access)."""

    def __init__(self, outputs: str | Sequence[str], feed_filter: FeedFilter = FeedFilter(), *,
                 transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
                 storage: StorageOptions | None = None, class_names: Sequence[str] | None = None):
        runs = _runs(outputs, feed_filter, storage)
        self.class_names = tuple(class_names) if class_names is not None else vocabulary_of(runs)
        self._selector = _Selector(self.class_names, feed_filter)
        self.records = RowView(_kept_index(runs, self._selector))
        self.transform = transform
        self.storage = storage

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Any:
        image, label = _pair(self.records[index], self._selector, self.storage)
        return self.transform(image, label) if self.transform else (image, label)


class LabelIterableDataset(torch.utils.data.IterableDataset):
    """Streaming dataset: reads one Parquet shard at a time. Shards are split over DataLoader
    workers and over ``world_size`` ranks (pass ``rank``/``world_size`` for distributed
    training); ``shuffle`` shuffles shard order and rows within a shard, from ``seed`` + ``epoch``
    (call :meth:`set_epoch`). The driver reads only key columns up front, to pick the latest write
    of each image; it keeps only the row numbers of losing rows (:mod:`clipdiy.labels.row_index`)."""

    def __init__(self, outputs: str | Sequence[str], feed_filter: FeedFilter = FeedFilter(), *,
                 transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
                 storage: StorageOptions | None = None, class_names: Sequence[str] | None = None,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.runs = _runs(outputs, feed_filter, storage)
        self.class_names = tuple(class_names) if class_names is not None else vocabulary_of(self.runs)
        self._selector = _Selector(self.class_names, feed_filter)
        self._index = build_row_index(self.runs)
        self.transform, self.storage = transform, storage
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.rank, self.world_size = rank, world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[Any]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        order = list(range(len(self._index.shards)))
        rng = random.Random(self.seed + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        part, parts = self.rank * workers + worker, self.world_size * workers
        for position in order[part::parts]:
            run, shard = self._index.shards[position]
            table = read_shard(run, shard, FEED_COLUMNS, ADDRESS_COLUMNS)
            keep = self._selector.keep_table(table)
            winners = self._index.winners(position)
            rows = table.filter(pa.array(keep if winners is None else keep & winners)).to_pylist()
            del table
            if self.shuffle:
                rng.shuffle(rows)
            for row in rows:
                image, label = _pair(row, self._selector, self.storage)
                yield self.transform(image, label) if self.transform else (image, label)


class _PairBatch:
    """``map_batches`` function: label rows -> kept rows with decoded image and label arrays."""

    def __init__(self, selector: _Selector, storage: StorageOptions | None):
        self.selector, self.storage = selector, storage

    def __call__(self, batch: pa.Table) -> dict[str, Any]:
        out: dict[str, list] = {"image_id": [], "uri": [], "run_id": [], "image": [], "label": []}
        for row in iter_rows(batch):
            if not self.selector.keep(row):
                continue
            image, label = _pair(row, self.selector, self.storage)
            for key, value in (("image_id", row["image_id"]), ("uri", row["uri"]), ("run_id", row["run_id"]),
                               ("image", image), ("label", label)):
                out[key].append(value)
        return {k: _column(v) for k, v in out.items()}


def _column(values: list) -> np.ndarray:
    # Ragged image arrays must stay an object array (Ray stores them as variable-shaped tensors).
    column = np.empty(len(values), dtype=object)
    column[:] = values
    return column


def read_labels(outputs: str | Sequence[str], feed_filter: FeedFilter = FeedFilter(), *,
                storage: StorageOptions | None = None, class_names: Sequence[str] | None = None) -> Any:
    """A ``ray.data.Dataset`` of the kept images: columns ``image_id``, ``uri``, ``run_id``,
    ``image`` (H x W x 3 uint8) and ``label`` (H x W uint8, 255 = ignore); shards are read and
    images decoded in parallel Ray tasks."""
    from clipdiy.labels.store import ray_dataset

    runs = _runs(outputs, feed_filter, storage)
    selector = _Selector(tuple(class_names) if class_names is not None else vocabulary_of(runs), feed_filter)
    return ray_dataset(runs, columns=FEED_COLUMNS, optional=ADDRESS_COLUMNS).map_batches(
        _PairBatch(selector, storage), batch_format="pyarrow", batch_size=16, udf_modifying_row_count=True  # drops rows
    )


def _coco_image(row: dict) -> dict:
    """A COCO ``images`` entry without its ``id``."""
    return {"file_name": row["image_id"], "coco_url": row["uri"], "width": int(row["width"]), "height": int(row["height"])}


def _coco_annotations(row: dict, selector: _Selector, include_background: bool) -> list[dict]:
    """A row's COCO annotations without ``id`` and ``image_id``: one per kept class mask."""
    return [{"category_id": int(mask["class_id"]),
             "segmentation": {"size": [int(v) for v in mask["rle_size"]], "counts": mask["rle_counts"]},
             "area": int(mask["area"]), "bbox": [float(v) for v in mask["bbox"]], "iscrowd": 0,
             "score": float(mask["score"])}
            for mask in selector.kept_masks(row) if mask["class_id"] != 0 or include_background]


def _coco_categories(class_names: Sequence[str], include_background: bool) -> list[dict]:
    first = 0 if include_background else 1
    return [{"id": i, "name": n, "supercategory": "background" if i == 0 else "object"}
            for i, n in enumerate(class_names) if i >= first]


_COCO_INFO = {"description": "clipdiy pseudo-labels", "version": "1"}


def coco_document(rows: Sequence[dict], class_names: Sequence[str], feed_filter: FeedFilter = FeedFilter(),
                  *, include_background: bool = False) -> dict:
    """COCO instances document of kept rows: image ids 1..N in ``image_id`` order, one annotation
    per kept class mask (its RLE as the job wrote it), categories = the vocabulary (id = class id;
    background only with ``include_background``)."""
    selector = _Selector(class_names, feed_filter)
    images, annotations = [], []
    for image_number, row in enumerate(rows, start=1):
        images.append({"id": image_number, **_coco_image(row)})
        for annotation in _coco_annotations(row, selector, include_background):
            annotations.append({"id": len(annotations) + 1, "image_id": image_number, **annotation})
    return {"info": dict(_COCO_INFO), "licenses": [], "images": images, "annotations": annotations,
            "categories": _coco_categories(class_names, include_background)}


def _json_tail(value: dict) -> str:
    """``json.dumps(value)`` without its opening brace: what follows the fields written before it."""
    return json.dumps(value)[1:]


def export_coco(outputs: str | Sequence[str], destination: str, feed_filter: FeedFilter = FeedFilter(), *,
                include_background: bool = False, storage: StorageOptions | None = None,
                images_to: str | None = None) -> dict[str, int]:
    """Write the kept labels as a COCO instances JSON at ``destination`` (any fsspec URI): the
    document :func:`coco_document` builds, byte for byte, written without holding it.

    ``images_to``: also write a copy of each kept image there, fetched by its row's address (a
    sample of a WebDataset shard or a Parquet file is no file a framework can open;
    :mod:`clipdiy.labels.image_copies`), and make each ``file_name`` the copy's path below it.

    The rows are read shard by shard; each kept row's image entry and annotations go, as JSON
    text, to two local scratch files, and the document is assembled from them in ``image_id``
    order (the index of :mod:`clipdiy.labels.row_index` gives it), numbering images and annotations."""
    runs = _runs(outputs, feed_filter, storage)
    names = vocabulary_of(runs)
    selector = _Selector(names, feed_filter)
    index = build_row_index(runs, sort_by_id=True)
    fs, path = open_filesystem(destination, storage)
    if posixpath.dirname(path):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
    copies = open_filesystem(images_to, storage) if images_to else None
    # Per row (by position in the shards): where its text starts in the scratch files, -1 = not kept.
    image_at = np.full(index.num_rows, -1, dtype=np.int64)
    annotations_at = np.zeros(index.num_rows, dtype=np.int64)
    with tempfile.TemporaryDirectory(prefix="clipdiy-coco-") as scratch:
        image_file, annotation_file = os.path.join(scratch, "images"), os.path.join(scratch, "annotations")
        with open(image_file, "wb") as images_out, open(annotation_file, "wb") as annotations_out:
            for number, table in iter_winning_shards(runs, index, FEED_COLUMNS, ADDRESS_COLUMNS if images_to else ()):
                positions = np.arange(index.offsets[number], index.offsets[number + 1])
                winners = index.winners(number)
                if winners is not None:
                    positions = positions[winners]
                keep = selector.keep_table(table)
                for position, row in zip(positions[keep].tolist(), table.filter(pa.array(keep)).to_pylist()):
                    image_at[position] = images_out.tell()
                    entry = _coco_image(row)
                    if copies is not None:
                        entry["file_name"] = write_copy(row, *copies, storage)
                    images_out.write((_json_tail(entry) + "\n").encode())
                    annotations_at[position] = annotations_out.tell()
                    tails = [_json_tail(a) for a in _coco_annotations(row, selector, include_background)]
                    annotations_out.write((json.dumps(len(tails)) + "\n" + "".join(t + "\n" for t in tails)).encode())
        counts = {"images": 0, "annotations": 0}
        with fs.open(path, "w") as out, open(image_file, "rb") as images_in, open(annotation_file, "rb") as annotations_in:
            out.write('{"info": ' + json.dumps(_COCO_INFO) + ', "licenses": [], "images": [')
            for position in index.sorted_positions[image_at[index.sorted_positions] >= 0].tolist():
                images_in.seek(image_at[position])
                counts["images"] += 1
                out.write((", " if counts["images"] > 1 else "") + f'{{"id": {counts["images"]}, '
                          + images_in.readline().decode()[:-1])
            out.write('], "annotations": [')
            image_number = 0
            for position in index.sorted_positions[image_at[index.sorted_positions] >= 0].tolist():
                image_number += 1
                annotations_in.seek(annotations_at[position])
                for _ in range(int(annotations_in.readline())):
                    counts["annotations"] += 1
                    out.write((", " if counts["annotations"] > 1 else "")
                              + f'{{"id": {counts["annotations"]}, "image_id": {image_number}, '
                              + annotations_in.readline().decode()[:-1])
            out.write('], "categories": ' + json.dumps(_coco_categories(names, include_background)) + "}")
    return counts


def export_voc_masks(outputs: str | Sequence[str], destination: str, feed_filter: FeedFilter = FeedFilter(), *,
                     storage: StorageOptions | None = None, images_to: str | None = None) -> dict[str, int]:
    """Write one VOC palette PNG per kept image at ``destination/<image_id without extension>.png``
    (255 = ignore), plus ``class_names.txt`` (one name a line, index = pixel value). Reads shard
    by shard. ``images_to``: also a copy of each kept image there, fetched by its row's address
    (:mod:`clipdiy.labels.image_copies`), at its image id's path."""
    runs = _runs(outputs, feed_filter, storage)
    names = vocabulary_of(runs)
    selector = _Selector(names, feed_filter)
    fs, root = open_filesystem(destination, storage)
    fs.makedirs(root, exist_ok=True)
    copies = open_filesystem(images_to, storage) if images_to else None
    written = 0
    for _, table in iter_winning_shards(runs, columns=FEED_COLUMNS, optional=ADDRESS_COLUMNS if images_to else ()):
        for row in table.filter(pa.array(selector.keep_table(table))).to_pylist():
            try:
                relative = posixpath.splitext(relative_path(row["image_id"]))[0] + ".png"
            except ValueError:
                raise ValueError(f"image id {row['image_id']!r} would write outside {destination}") from None
            if copies is not None:
                write_copy(row, *copies, storage)
            path = posixpath.join(root, relative)
            if posixpath.dirname(path):
                fs.makedirs(posixpath.dirname(path), exist_ok=True)
            fs.pipe_file(path, palette_png_bytes(selector.label_map(row)))
            written += 1
    fs.pipe_file(posixpath.join(root, "class_names.txt"), ("\n".join(names) + "\n").encode())
    return {"images": written}
