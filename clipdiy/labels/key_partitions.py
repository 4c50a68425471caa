"""Key tables larger than memory, split on local disk into ``image_id`` ranges.

A :class:`KeySpill` takes record batches of keys (an ``image_id`` string column plus any fixed-width
columns) one at a time, appends them to an Arrow IPC file in its own temporary directory (removed
on close, also on error) and keeps a bounded, evenly spread sample of their ids.
:meth:`KeySpill.partitions` then hands them back as :class:`Partition` s of at most ``limit`` rows,
**in ascending ``image_id`` order** (Arrow's byte order, the order of ``pc.sort_indices``), every
row of one id in the same partition; so sorting each partition alone and concatenating gives the
global id order.

Partitioning is by id range, not by hash, so that the concatenation is globally sorted without a
merge. Splitters are quantiles of the sample; each splitter value gets a partition of its own
(ids ``< s0``, ``== s0``, between ``s0`` and ``s1``, ``== s1``...), which makes skew harmless: an
id repeated more often than ``limit`` ends alone in a *single-id* partition (which the caller
reads batch by batch, :meth:`Partition.batches`), and a range partition still over ``limit`` is
split again with a sample of its own rows (each split shrinks it: its splitters are ids it holds).
Memory: one chunk of at most ``limit`` rows, the sample (at most ``sample_size`` ids) and the
bucket number of each row of the chunk; never all keys.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Self

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

logger = logging.getLogger(__name__)

#: Most splitters of one split (the partitions are 2 x this + 1 files open at once).
MAX_SPLITTERS = 255
#: Most ids the sample holds.
SAMPLE_SIZE = 65_536
#: Rows whose buckets one binary search finds at once.
_SEARCH_ROWS = 65_536


class StrideSample:
    """Every ``stride``-th id of those added, ``stride`` doubling whenever more than ``size`` are
    held: evenly spread over everything added, deterministic, bounded."""

    def __init__(self, size: int):
        self.size, self.stride, self.seen = max(1, size), 1, 0
        self._chunks: list[pa.Array] = []
        self._held = 0

    def add(self, ids: pa.Array) -> None:
        first = (-self.seen) % self.stride  # the next multiple of the stride, counted over all ids added
        self.seen += len(ids)
        picked = ids.take(pa.array(np.arange(first, len(ids), self.stride, dtype=np.int64)))
        self._chunks.append(picked)
        self._held += len(picked)
        while self._held > self.size:
            held = self.ids()
            self._chunks = [held.take(pa.array(np.arange(0, len(held), 2, dtype=np.int64)))]
            self._held = len(self._chunks[0])
            self.stride *= 2

    def ids(self) -> pa.Array:
        return pa.concat_arrays(self._chunks) if self._chunks else pa.array([], pa.string())


def splitters(sample: pa.Array, parts: int) -> pa.Array:
    """At most ``parts - 1`` distinct, ascending ids cutting ``sample`` into ``parts`` equal runs."""
    sample = sample.drop_null()
    if len(sample) == 0 or parts < 2:
        return pa.array([], sample.type)
    ordered = sample.take(pc.sort_indices(sample))
    cuts = ordered.take(pa.array((np.arange(1, parts, dtype=np.int64) * len(ordered)) // parts))
    unique = pc.unique(cuts)
    return unique.take(pc.sort_indices(unique))


def bucket_of(ids: pa.Array, cuts: pa.Array) -> np.ndarray:
    """Bucket (int64) of each id: ``2k`` for ids strictly between ``cuts[k-1]`` and ``cuts[k]``,
    ``2k + 1`` for ids equal to ``cuts[k]``; ascending with the id. Null ids go last (as
    ``sort_indices`` puts them). A vectorised binary search, ``log2(len(cuts)) + 1`` Arrow compares."""
    n = len(ids)
    below = np.zeros(n, dtype=np.int64)  # number of cuts <= id, searched in [below, above]
    above = np.full(n, len(cuts), dtype=np.int64)
    while True:
        active = below < above
        if not active.any():
            break
        middle = (below + above) // 2
        at_or_below = pc.less_equal(cuts.take(pa.array(np.minimum(middle, len(cuts) - 1))), ids)
        at_or_below = at_or_below.fill_null(True).to_numpy(zero_copy_only=False)
        below = np.where(active & at_or_below, middle + 1, below)
        above = np.where(active & ~at_or_below, middle, above)
    equal = np.zeros(n, dtype=bool)
    has_cut = below > 0
    if has_cut.any():
        nearest = cuts.take(pa.array(np.maximum(below - 1, 0)))
        equal = pc.equal(nearest, ids).fill_null(False).to_numpy(zero_copy_only=False) & has_cut
    return 2 * below - equal


@dataclass
class Partition:
    """One id range (or one id, ``single_id``) of the spilled keys: ``rows`` rows in an IPC file."""

    path: str
    rows: int
    single_id: bool

    def batches(self, max_rows: int | None = None) -> Iterator[pa.RecordBatch]:
        """The partition's rows, batch by batch (none longer than ``max_rows``)."""
        with pa.OSFile(self.path, "rb") as file:
            for batch in pa.ipc.open_stream(file):
                step = max_rows or max(1, len(batch))
                for first in range(0, len(batch), step):
                    yield batch.slice(first, step)

    def read(self) -> pa.Table:
        with pa.OSFile(self.path, "rb") as file:
            return pa.ipc.open_stream(file).read_all()


class KeySpill:
    """Key batches on local disk (see the module docstring). A context manager: the directory and
    every file in it are removed on exit."""

    def __init__(self, schema: pa.Schema, limit: int, *, directory: str | None = None, sample_size: int = SAMPLE_SIZE):
        if limit < 1:
            raise ValueError(f"a partition must hold at least one row, not {limit}")
        self.schema, self.limit, self.rows = schema, limit, 0
        self._directory = tempfile.TemporaryDirectory(prefix="clipdiy-keys-", dir=directory)
        self._files = 0
        self._sample_size = max(1, min(sample_size, limit))  # the sample is held too: never more than limit ids
        self.sample = StrideSample(self._sample_size)
        self._source = self._new_path()
        self._writer = pa.ipc.new_stream(self._source, schema)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._directory.cleanup()

    def _new_path(self) -> str:
        self._files += 1
        return os.path.join(self._directory.name, f"keys-{self._files}.arrow")

    def write(self, batch: pa.RecordBatch) -> None:
        if len(batch) == 0:
            return
        self._writer.write_batch(batch)
        self.rows += len(batch)
        self.sample.add(batch.column("image_id"))

    def partitions(self) -> Iterator[Partition]:
        """The spilled keys as partitions of at most ``limit`` rows (single-id ones excepted), in id
        order. Each partition's file is removed once the next one is asked for."""
        self._writer.close()
        self._writer = None
        pending = [Partition(self._source, self.rows, single_id=False)]
        sample: pa.Array | None = self.sample.ids()
        while pending:
            part = pending.pop()
            if part.rows <= self.limit or part.single_id:
                yield part
                os.remove(part.path)
                continue
            if sample is None:
                sample = self._sample_of(part)
            cuts = splitters(sample, min(MAX_SPLITTERS + 1, math.ceil(2 * part.rows / self.limit)))
            sample = None
            if len(cuts) == 0:  # every id is null: no order to split by
                logger.warning("%d keys without an image_id exceed the %d held in memory; reading them at once",
                               part.rows, self.limit)
                yield part
                os.remove(part.path)
                continue
            children = self._split(part, cuts)
            os.remove(part.path)
            pending.extend(reversed(children))  # popped in ascending id order

    def _sample_of(self, part: Partition) -> pa.Array:
        sample = StrideSample(self._sample_size)
        for batch in part.batches():
            sample.add(batch.column("image_id"))
        return sample.ids()

    def _split(self, part: Partition, cuts: pa.Array) -> list[Partition]:
        """Scatter a partition's rows into the buckets of ``cuts``, chunk by chunk (at most
        ``limit`` rows, so each bucket gets few, large IPC messages)."""
        paths: dict[int, str] = {}
        writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        rows: dict[int, int] = {}
        try:
            for chunk in _chunks(part.batches(self.limit), self.limit):
                ids = chunk.column("image_id").combine_chunks()
                # In slices: each compare of the search materialises one cut per row.
                buckets = np.concatenate([bucket_of(ids.slice(first, _SEARCH_ROWS), cuts)
                                          for first in range(0, len(ids), _SEARCH_ROWS)])
                order = np.argsort(buckets, kind="stable")  # keeps the rows' order inside a bucket
                sorted_buckets = buckets[order]
                grouped = chunk.take(pa.array(order)).combine_chunks()  # one take; each bucket a slice of it
                del chunk, ids
                starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_buckets)) + 1])
                ends = np.append(starts[1:], len(order))
                for start, end in zip(starts.tolist(), ends.tolist()):
                    bucket = int(sorted_buckets[start])
                    if bucket not in writers:
                        paths[bucket] = self._new_path()
                        writers[bucket] = pa.ipc.new_stream(paths[bucket], self.schema)
                        rows[bucket] = 0
                    writers[bucket].write_table(grouped.slice(start, end - start))
                    rows[bucket] += end - start
                del grouped
        finally:
            for writer in writers.values():
                writer.close()
        return [Partition(paths[b], rows[b], single_id=b % 2 == 1) for b in sorted(paths)]


def _chunks(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.Table]:
    """Consecutive batches gathered into tables of at most ``size`` rows (batches no longer than it)."""
    held: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        if held and rows + len(batch) > size:
            yield pa.Table.from_batches(held)
            held, rows = [], 0
        held.append(batch)
        rows += len(batch)
    if held:
        yield pa.Table.from_batches(held)
