"""Incremental runs: which listed images still need a label.

An image is already labelled when a committed shard of a finished run (or of the run being
resumed) holds a row with the same image id *and* the same source version: size, ETag and
mtime as listed. A changed object therefore gets labelled again; its older row stays in its
older run (readers wanting the latest label take the row of the latest ``run_started_at`` per
``image_id``).

Error rows of earlier runs count as labelled unless the run retries them (``retry_errors``):
``transient`` (the default) retries the kinds a later attempt can cure, a read that failed
after its retries (``unreadable``) and a failed model call (``model``, e.g. out of memory);
``all`` retries every error (after raising ``--max-pixels``, say); ``none`` retries nothing.
Rows of the run being resumed always count, so a run never holds two rows for one image.

Both sides stay columnar: the labelled keys are one Arrow string array, the listing is
processed in Arrow chunks, and the anti-join is ``pyarrow.compute.is_in`` per chunk, so the
driver never holds a Python object per image of a large bucket.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
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

#: Error kinds that a later run may cure: a failed read (after its retries), a failed model call.
TRANSIENT_ERROR_KINDS = ("unreadable", "model")
#: ``retry_errors`` choices: which error rows of earlier runs are labelled again.
RETRY_ERRORS = ("none", "transient", "all")


def source_keys(table: pa.Table) -> pa.Array:
    """One string per row identifying an image version: id, size, ETag, mtime (microseconds)."""
    table = table.select(KEY_COLUMNS).combine_chunks()
    size = pc.fill_null(pc.cast(table.column("source_size"), pa.string()), "")
    etag = pc.fill_null(table.column("source_etag"), "")
    mtime = pc.fill_null(pc.cast(pc.cast(table.column("source_mtime"), pa.int64()), pa.string()), "")
    keys = pc.binary_join_element_wise(table.column("image_id"), size, etag, mtime, _SEPARATOR)
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys


@dataclass(frozen=True)
class LabelledKeys:
    """Source keys of earlier rows: ``done`` need no label; ``retry`` are error rows to redo."""

    done: pa.Array
    retry: pa.Array


def _retried(table: pa.Table, retry_errors: str) -> pa.Array:
    """Boolean mask of the rows of a shard that ``retry_errors`` sends back to be labelled."""
    if retry_errors not in RETRY_ERRORS:
        raise ValueError(f"retry_errors must be one of {RETRY_ERRORS}, got {retry_errors!r}")
    is_error = pc.equal(table.column("status"), "error")
    if retry_errors == "all":
        return is_error
    if retry_errors == "transient":
        transient = pc.is_in(table.column("error_kind"), value_set=pa.array(TRANSIENT_ERROR_KINDS))
        return pc.and_(is_error, pc.fill_null(transient, False))
    return pc.and_(is_error, False)


def _shard_keys(layout: OutputLayout, path: str, retry_errors: str) -> tuple[pa.Array, pa.Array]:
    table = pq.read_table(path, columns=[*KEY_COLUMNS, "status", "error_kind"], filesystem=layout.fs)
    keys = source_keys(table.select(KEY_COLUMNS).cast(LISTING_SCHEMA.remove(LISTING_SCHEMA.get_field_index("uri"))))
    retry = _retried(table.combine_chunks(), retry_errors)
    if isinstance(retry, pa.ChunkedArray):
        retry = retry.combine_chunks()
    return keys.filter(pc.invert(retry)), keys.filter(retry)


def labelled_keys(
    layout: OutputLayout, run_ids: Iterable[str], retry_errors: str = "none", threads: int = 8
) -> LabelledKeys:
    """The source keys of the rows in the committed shards of ``run_ids``, split by
    ``retry_errors`` (one of :data:`RETRY_ERRORS`) into done and to-retry."""
    paths = [path for run_id in run_ids for path in layout.shard_paths(run_id)]
    if not paths:
        empty = pa.array([], pa.string())
        return LabelledKeys(done=empty, retry=empty)
    with ThreadPoolExecutor(max_workers=min(threads, len(paths))) as pool:
        pairs = list(pool.map(lambda p: _shard_keys(layout, p, retry_errors), paths))
    done = pa.concat_arrays([d for d, _ in pairs])
    # An image whose error was cured by a later run is done, not retried again.
    retry = pa.concat_arrays([r for _, r in pairs])
    if len(retry) and len(done):
        retry = retry.filter(pc.invert(pc.is_in(retry, value_set=done)))
    return LabelledKeys(done=done, retry=retry)


@dataclass
class ListingCounts:
    """listed: images in the input (after ``limit``); skipped: of those, already labelled by
    other runs; resumed: labelled by earlier attempts of this run; todo: still to label;
    retried: of ``todo``, images whose earlier run gave an error row that is retried."""

    listed: int = 0
    skipped: int = 0
    resumed: int = 0
    retried: int = 0

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


def _member_mask(keys: pa.Array, value_set: pa.Array | None) -> pa.Array:
    """Boolean mask: which ``keys`` are in ``value_set`` (all False for an empty or absent set)."""
    if value_set is None or not len(value_set) or not len(keys):
        return pa.array(np.zeros(len(keys), dtype=bool))
    return pc.is_in(keys, value_set=value_set)


def pending_blocks(
    sources: Iterator[SourceObject],
    counts: ListingCounts,
    *,
    done_by_other_runs: pa.Array,
    done_by_this_run: pa.Array,
    block_rows: int,
    limit: int | None = None,
    chunk_rows: int = 16384,
    retried_errors: pa.Array | None = None,
) -> Iterator[pa.Table]:
    """Blocks of at most ``block_rows`` listing rows that still need labels, in listing order.

    Reads ``sources`` ``chunk_rows`` at a time (only the first ``limit``) and updates ``counts``;
    ``retried_errors`` (keys of earlier error rows being retried) only feeds ``counts.retried``.
    """
    buffer: list[SourceObject] = []

    def flush() -> Iterator[pa.Table]:
        table = _listing_table(buffer)
        buffer.clear()
        counts.listed += table.num_rows
        keys = source_keys(table)  # once per chunk: every membership test below reuses it
        other = _member_mask(keys, done_by_other_runs)
        this = pc.and_(pc.invert(other), _member_mask(keys, done_by_this_run))
        todo = pc.invert(pc.or_(other, this))
        counts.skipped += pc.sum(other).as_py() or 0
        counts.resumed += pc.sum(this).as_py() or 0
        counts.retried += pc.sum(pc.and_(todo, _member_mask(keys, retried_errors))).as_py() or 0
        table = table.filter(todo)
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
