"""Reading labels outputs: runs, manifests, rows, and the masks and saliency inside them.

A labels output is the folder the labelling job writes (``schemas/``): ``OUTPUT/runs/<run_id>/``
holds a run's Parquet shards and, written last, ``_MANIFEST.json``; a run without it is
unfinished. Every reader of labels (evaluation, previews, the training feed) goes through here,
so they agree on which rows count: the rows of the chosen runs, and for an ``image_id`` with
several rows (a changed image relabelled by a later run) the latest write: the row of the latest
run (``run_started_at``, then ``run_id``), inside one run the later attempt's
(:mod:`clipdiy.labels.row_index`, which decides it from the key columns alone). Readers read shard by
shard (:func:`iter_winning_shards`, :func:`ray_dataset`); :func:`read_rows` is for small outputs.

Any fsspec URI works (local paths, ``s3://``, ``gs://``...); ``storage`` (a
:class:`~clipdiy.storage.StorageOptions`, non-secret settings; credentials come from the
environment) says how to reach object storage, as for the labelling job.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from clipdiy import rle
from clipdiy.image_address import DEFAULT_MAX_IMAGE_BYTES, ImageAddress, fetch_image_bytes
from clipdiy.labels.palette import IGNORE
from clipdiy.labels.row_index import RowIndex, build_row_index
from clipdiy.labels.runs import Run, list_runs, read_shard
from clipdiy.schema import label_schema
from clipdiy.storage import StorageOptions

def latest_rows(table: pa.Table) -> pa.Table:
    """Keep one row per ``image_id``: the one of the latest run (``run_started_at``, then
    ``run_id``), and among rows of one run the last in the table (see :mod:`clipdiy.labels.row_index`)."""
    if table.num_rows == 0:
        return table
    keys = pa.table({
        "image_id": table.column("image_id"),
        "started": pc.cast(table.column("run_started_at"), pa.int64()),
        "run_id": table.column("run_id"),
    })
    order = pc.sort_indices(keys, sort_keys=[("image_id", "ascending"), ("started", "ascending"), ("run_id", "ascending")])
    sorted_ids = keys.column("image_id").take(order)
    last = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        last[:-1] = pc.not_equal(sorted_ids[:-1], sorted_ids[1:]).to_numpy(zero_copy_only=False)
    return table.take(pa.array(np.sort(order.to_numpy()[last])))


def iter_winning_shards(
    runs: Sequence[Run], index: RowIndex | None = None, columns: Sequence[str] | None = None,
    optional: Sequence[str] = (),
) -> Iterator[tuple[int, pa.Table]]:
    """(shard number, the shard's winning rows) for every shard of the runs, one shard at a time
    (``optional``: see :func:`~clipdiy.labels.runs.read_shard`)."""
    index = index or build_row_index(runs)
    for number, (run, shard) in enumerate(index.shards):
        table = read_shard(run, shard, columns, optional)
        mask = index.winners(number)
        yield number, table if mask is None else table.filter(pa.array(mask))


def read_rows(
    outputs: str | Sequence[str] | Sequence[Run],
    *,
    finished_only: bool = True,
    columns: Sequence[str] | None = None,
    storage: StorageOptions | None = None,
) -> pa.Table:
    """All rows of the chosen runs, one per ``image_id`` (latest run wins), in one table: for
    small outputs; readers of large ones stream with :func:`iter_winning_shards`."""
    runs = _as_runs(outputs, finished_only, storage)
    wanted = None
    if columns is not None:
        wanted = list(dict.fromkeys([*columns, "image_id", "run_id", "run_started_at"]))
    if not any(run.shards for run in runs):
        raise FileNotFoundError("the labels output holds no " + ("finished runs" if finished_only else "shards"))
    tables = [table for _, table in iter_winning_shards(runs, columns=wanted)]
    return pa.concat_tables(tables, promote_options="default")


def _as_runs(outputs: Any, finished_only: bool, storage: StorageOptions | None) -> list[Run]:
    if isinstance(outputs, Run):
        return [outputs]
    if not isinstance(outputs, str) and outputs and all(isinstance(o, Run) for o in outputs):
        return list(outputs)
    return list_runs(outputs, finished_only=finished_only, storage=storage)


def iter_rows(table: pa.Table, batch_size: int = 64) -> Iterator[dict]:
    """The rows of a table as dicts, a batch at a time (masks as lists of dicts)."""
    for batch in table.to_batches(max_chunksize=batch_size):
        yield from batch.to_pylist()


def decode_label_map(row: dict, *, fill: int = IGNORE, dtype: Any = np.uint16) -> np.ndarray:
    """H x W class ids of an ok row, painted from its per-class RLE masks.

    The masks of a row are disjoint and cover the image; a pixel no mask covers gets ``fill``.
    """
    if row.get("status") != "ok" or row.get("masks") is None:
        raise ValueError(f"row {row.get('image_id')!r} has no labels (status {row.get('status')!r})")
    height, width = int(row["height"]), int(row["width"])
    label_map = np.full((height, width), fill, dtype=dtype)
    for mask in row["masks"]:
        size = [int(v) for v in mask["rle_size"]]
        if size != [height, width]:
            raise ValueError(f"row {row['image_id']!r}: mask of class {mask['class_id']} is {size}, image is {[height, width]}")
        label_map[rle.decode({"size": size, "counts": mask["rle_counts"]})] = mask["class_id"]
    return label_map


def decode_saliency(png: bytes | None, size: tuple[int, int] | None = None) -> np.ndarray | None:
    """The soft saliency map of a row (h x w float32 in [0, 1]); resized bilinearly to ``size``
    = (H, W) when given. ``None`` when the row has none."""
    if png is None:
        return None
    image = Image.open(io.BytesIO(png)).convert("L")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32) / 255.0


def load_image(source: ImageAddress | dict | str, storage: StorageOptions | None = None, *,
               max_bytes: int | None = DEFAULT_MAX_IMAGE_BYTES) -> np.ndarray:
    """The source image of a row: H x W x 3 uint8 RGB, EXIF orientation applied (as the job reads it).

    ``source``: the row itself (a dict with its ``uri`` and, for a shard's sample, its address
    columns), an :class:`~clipdiy.image_address.ImageAddress`, or a loose object's URI. The bytes
    come from one ranged read of the image's address (:mod:`clipdiy.image_address`), never from
    reading its shard; :class:`~clipdiy.image_address.ImageFetchError` (a ``ValueError``) names
    the image id when the address is stale or out of bounds."""
    data = fetch_image_bytes(source, storage, max_bytes=max_bytes)
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    return np.asarray(image.convert("RGB"))


def stem(image_id: str) -> str:
    """File name without folders and extension: the key that matches labels to ground truth."""
    return posixpath.splitext(posixpath.basename(image_id.replace("\\", "/")))[0]


def stems(image_ids: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """:func:`stem` of every id, in Arrow (no Python object per id)."""
    names = pc.replace_substring_regex(pc.replace_substring(image_ids, "\\", "/"), pattern=r"(?s)^.*/", replacement="")
    # posixpath.splitext: the extension is the last dot and what follows, unless the name's
    # only dots lead it (".hidden" has none).
    return pc.replace_substring_regex(names, pattern=r"(?s)^(\.*[^.].*)\.[^.]*$", replacement=r"\1")


def ok_rows(rows: Iterable[dict]) -> Iterator[dict]:
    return (r for r in rows if r.get("status") == "ok")


#: Most blocks :func:`ray_dataset` hands Ray at once (one block holds a few shards beyond this).
MAX_READ_BLOCKS = 2000


def ray_dataset(runs: Sequence[Run], *, columns: Sequence[str] | None = None, index: RowIndex | None = None,
                optional: Sequence[str] = ()) -> Any:
    """The rows of the runs as a ``ray.data.Dataset`` read in parallel, one per ``image_id``
    (the latest write: the driver reads only the key columns to decide, :mod:`clipdiy.labels.row_index`).

    Each read task gets its shards' paths and, only for a shard holding losing rows, their row
    numbers; nothing in a task grows with the output."""
    import ray.data

    if not runs:
        raise FileNotFoundError("no runs to read")
    index = index or build_row_index(runs)
    filesystems: list[Any] = []
    fs_number: dict[int, int] = {}
    for run, _ in index.shards:
        fs_number.setdefault(id(run.fs), len(filesystems))
        if len(filesystems) < len(fs_number):
            filesystems.append(run.fs)
    tasks = [{"fs": fs_number[id(run.fs)], "path": shard,
              "losers": index.losers.get(number, np.zeros(0, np.int64)).tolist()}
             for number, (run, shard) in enumerate(index.shards)]
    dataset = ray.data.from_items(tasks, override_num_blocks=min(len(tasks), MAX_READ_BLOCKS))
    return dataset.map_batches(_ReadWinners(filesystems, columns, optional), batch_format="pyarrow", batch_size=1,
                               udf_modifying_row_count=True)  # one shard in, its winning rows out


class _ReadWinners:
    """``map_batches`` function: shard descriptors -> the shards' winning rows (picklable)."""

    def __init__(self, filesystems: Sequence[Any], columns: Sequence[str] | None, optional: Sequence[str] = ()):
        self.filesystems, self.columns = list(filesystems), list(columns) if columns else None
        self.optional = list(optional)

    def __call__(self, tasks: pa.Table) -> pa.Table:
        tables = []
        for task in tasks.to_pylist():
            with self.filesystems[task["fs"]].open(task["path"], "rb") as file:
                parquet = pq.ParquetFile(file)
                columns = self.columns
                present = set(parquet.schema_arrow.names)
                wanted = [c for c in self.optional if c not in (columns or ())]
                if columns is not None:
                    columns = columns + [c for c in wanted if c in present]
                table = parquet.read(columns=columns)
            schema = label_schema()
            for name in wanted:  # a shard predating a column the schema has: nulls, as read_shard
                if name not in present and name in schema.names:
                    table = table.append_column(schema.field(name), pa.nulls(table.num_rows, schema.field(name).type))
            if task["losers"]:
                mask = np.ones(table.num_rows, dtype=bool)
                mask[np.asarray(task["losers"], dtype=np.int64)] = False
                table = table.filter(pa.array(mask))
            tables.append(table)
        return pa.concat_tables(tables)
