"""Incremental runs: which listed images still need a label.

An image is already labelled when a committed shard of a finished run (or of the run being
resumed) holds a row with the same image id *and* the same source version: size, ETag and
mtime as listed. A changed object therefore gets labelled again; its older row stays in its
older run (readers wanting the latest label take the row of the latest ``run_started_at`` per
``image_id``).

Both sides stay columnar: the labelled keys are one Arrow string array, the listing is
processed in Arrow chunks, and the anti-join is ``pyarrow.compute.is_in`` per chunk, so the
driver never holds a Python object per image of a large bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipdiy.pipeline.layout import OutputLayout
from clipdiy.pipeline.storage import SourceObject

logger = logging.getLogger(__name__)

#: The listing as it travels through the pipeline (names as in the label-row schema).
LISTING_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("source_size", pa.int64()),
        pa.field("source_etag", pa.string()),
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
    ]
)
KEY_COLUMNS = ["image_id", "source_size", "source_etag", "source_mtime"]
_SEPARATOR = "\x1f"


def source_keys(table: pa.Table) -> pa.Array:
    """One string per row identifying an image version: id, size, ETag, mtime (microseconds)."""
    table = table.select(KEY_COLUMNS).combine_chunks()
    size = pc.fill_null(pc.cast(table.column("source_size"), pa.string()), "")
    etag = pc.fill_null(table.column("source_etag"), "")
    mtime = pc.fill_null(pc.cast(pc.cast(table.column("source_mtime"), pa.int64()), pa.string()), "")
    keys = pc.binary_join_element_wise(table.column("image_id"), size, etag, mtime, _SEPARATOR)
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


def _shard_keys(layout: OutputLayout, path: str) -> pa.Array:
    table = pq.read_table(path, columns=KEY_COLUMNS, filesystem=layout.fs)
    return source_keys(table.cast(LISTING_SCHEMA.remove(LISTING_SCHEMA.get_field_index("uri"))))


def labelled_keys(layout: OutputLayout, run_ids: Iterable[str], threads: int = 8) -> pa.Array:
    """The source keys of every row in the committed shards of ``run_ids``."""
    paths = [path for run_id in run_ids for path in layout.shard_paths(run_id)]
    if not paths:
        return pa.array([], pa.string())
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        arrays = list(pool.map(lambda p: _shard_keys(layout, p), paths))
    return pa.concat_arrays(arrays)


@dataclass
class ListingCounts:
    """listed: images in the input (after ``limit``); skipped: of those, already labelled by
    other runs; resumed: labelled by earlier attempts of this run; todo: still to label."""

    listed: int = 0
    skipped: int = 0
    resumed: int = 0

    @property
    def todo(self) -> int:
        return self.listed - self.skipped - self.resumed


def _listing_table(sources: list[SourceObject]) -> pa.Table:
    return pa.table(
        {
            "uri": [s.uri for s in sources],
            "image_id": [s.image_id for s in sources],
            "source_size": [s.size for s in sources],
            "source_etag": [s.etag for s in sources],
            "source_mtime": [s.mtime for s in sources],
        },
        schema=LISTING_SCHEMA,
    )


def _drop_done(table: pa.Table, done: pa.Array) -> tuple[pa.Table, int]:
    if not len(done) or not table.num_rows:
        return table, 0
    kept = table.filter(pc.invert(pc.is_in(source_keys(table), value_set=done)))
    return kept, table.num_rows - kept.num_rows


def pending_blocks(
    sources: Iterator[SourceObject],
    counts: ListingCounts,
    *,
    done_by_other_runs: pa.Array,
    done_by_this_run: pa.Array,
    block_rows: int,
    limit: int | None = None,
    chunk_rows: int = 16384,
) -> Iterator[pa.Table]:
    """Blocks of at most ``block_rows`` listing rows that still need labels, in listing order.

    Reads ``sources`` ``chunk_rows`` at a time (only the first ``limit``) and updates ``counts``.
    """
    buffer: list[SourceObject] = []

    def flush() -> Iterator[pa.Table]:
        table = _listing_table(buffer)
        buffer.clear()
        counts.listed += table.num_rows
        table, skipped = _drop_done(table, done_by_other_runs)
        counts.skipped += skipped
        table, resumed = _drop_done(table, done_by_this_run)
        counts.resumed += resumed
        for start in range(0, table.num_rows, block_rows):
            yield table.slice(start, block_rows)

    for source in sources:
        if limit is not None and counts.listed + len(buffer) >= limit:
            break
        buffer.append(source)
        if len(buffer) >= chunk_rows:
            yield from flush()
    if buffer:
        yield from flush()
