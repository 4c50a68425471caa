"""Which rows of a labels output count, decided without holding the rows.

An ``image_id`` may have several rows: one per run that labelled it (a changed image relabelled),
and, should an output somehow hold them, several inside one run. The row that counts (the
*winner*) is the latest write: the row of the latest run (``run_started_at``, then ``run_id``);
inside one run the later attempt (shard names ``part-AAA-<digest>``, see
``clipdiy.pipeline.layout``), then the later shard name, then the later row of the shard. Every
reader (the feed, exports, evaluation local and on Ray, previews) asks :func:`build_row_index`,
so they all pick the same row.

The key pass reads only ``image_id``, ``run_started_at`` and ``run_id``, one shard at a time, into
compact Arrow/numpy arrays (no Python object per row; about 16 bytes a row plus the ids while it
runs, sorted once by Arrow) and keeps afterwards:

- ``losers``: for the shards that hold losing rows only, their row numbers (none in the usual
  output, where every image has one row);
- optionally ``sorted_positions``: the winning rows (passing a row filter) in ``image_id`` order,
  as int64 positions into the shards' concatenation (8 bytes a row): the compact index of
  map-style readers and of outputs that must come sorted.

Rows themselves are read shard by shard by the readers, with :meth:`RowIndex.winners` as the mask.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

if TYPE_CHECKING:
    from clipdiy.label_store import Run

KEY_COLUMNS = ("image_id", "run_id", "run_started_at")
_ATTEMPT = re.compile(r"^part-(\d+)-")

#: ``row_filter(table) -> bool array``: which rows of a shard (read with ``filter_columns``) to keep.
RowFilter = Callable[[pa.Table], np.ndarray]


def shard_write_order(path: str) -> tuple[int, str]:
    """Sort key of a run's shards in the order they were written: attempt number, then name
    (shards not named by the job's ``part-AAA-<digest>`` scheme count as attempt 0)."""
    name = posixpath.basename(path)
    match = _ATTEMPT.match(name)
    return (int(match.group(1)) if match else 0, name)


@dataclass
class RowIndex:
    """The outcome of :func:`build_row_index` (see the module docstring).

    ``shards``: (run, shard path) in reading order; ``offsets``: int64, ``len(shards) + 1``, the
    position of each shard's first row in their concatenation; ``losers``: shard number -> sorted
    int64 row numbers that lose; ``sorted_positions``: int64 positions of the kept winners in
    ``image_id`` order (``None`` unless asked for).
    """

    shards: tuple[tuple[Run, str], ...]
    offsets: np.ndarray
    losers: dict[int, np.ndarray] = field(default_factory=dict)
    sorted_positions: np.ndarray | None = None

    @property
    def num_rows(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_winners(self) -> int:
        return self.num_rows - sum(len(v) for v in self.losers.values())

    def winners(self, shard_number: int) -> np.ndarray | None:
        """Bool mask of the winning rows of one shard; ``None`` when every row wins."""
        lost = self.losers.get(shard_number)
        if lost is None:
            return None
        mask = np.ones(int(self.offsets[shard_number + 1] - self.offsets[shard_number]), dtype=bool)
        mask[lost] = False
        return mask

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(shard numbers, row numbers in the shard) of global row positions."""
        positions = np.asarray(positions, dtype=np.int64)
        shard = np.searchsorted(self.offsets, positions, side="right") - 1
        return shard, positions - self.offsets[shard]

    def by_shard(self, positions: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Group positions by shard, in shard order: (shard number, row numbers in the shard,
        indices of those rows in ``positions``)."""
        shard, row = self.locate(positions)
        order = np.argsort(shard, kind="stable")
        bounds = np.flatnonzero(np.diff(shard[order])) + 1
        for group in np.split(order, bounds) if len(order) else []:
            yield int(shard[group[0]]), row[group], group


def build_row_index(
    runs: Sequence[Run],
    *,
    sort_by_id: bool = False,
    row_filter: RowFilter | None = None,
    filter_columns: Sequence[str] = (),
    read: Callable[[Run, str, Sequence[str]], pa.Table] | None = None,
) -> RowIndex:
    """One key pass over the runs' shards (see the module docstring). ``row_filter`` (with the
    extra ``filter_columns`` it reads) narrows ``sorted_positions`` to the rows it keeps. Raises
    ``FileNotFoundError`` when the runs hold no shards."""
    if read is None:
        from clipdiy.label_store import read_shard as read
    shards = tuple((run, shard) for run in runs for shard in run.shards)
    if not shards:
        raise FileNotFoundError("the labels output holds no shards")
    write_rank = np.zeros(len(shards), dtype=np.int32)
    first = 0
    for run in runs:
        for rank, local in enumerate(sorted(range(len(run.shards)), key=lambda i: shard_write_order(run.shards[i]))):
            write_rank[first + local] = rank
        first += len(run.shards)

    columns = list(dict.fromkeys([*KEY_COLUMNS, *filter_columns]))
    ids: list[pa.Array] = []
    started: list[np.ndarray] = []
    run_codes: list[np.ndarray] = []
    writes: list[np.ndarray] = []
    kept: list[np.ndarray] = []
    counts = np.zeros(len(shards), dtype=np.int64)
    code_of: dict[str, int] = {}
    for number, (run, shard) in enumerate(shards):
        table = read(run, shard, columns)
        counts[number] = table.num_rows
        ids.append(table.column("image_id").combine_chunks())
        started.append(pc.cast(table.column("run_started_at"), pa.int64()).to_numpy(zero_copy_only=False))
        encoded = table.column("run_id").combine_chunks().dictionary_encode()
        lookup = np.array([code_of.setdefault(v, len(code_of)) for v in encoded.dictionary.to_pylist()], dtype=np.int32)
        run_codes.append(lookup[encoded.indices.to_numpy(zero_copy_only=False)] if len(lookup) else np.zeros(0, np.int32))
        writes.append(np.full(table.num_rows, write_rank[number], dtype=np.int32))
        if row_filter is not None:
            kept.append(np.asarray(row_filter(table), dtype=bool))
        del table
    offsets = np.zeros(len(shards) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    index = RowIndex(shards=shards, offsets=offsets)
    if offsets[-1] == 0:
        index.sorted_positions = np.zeros(0, dtype=np.int64) if sort_by_id else None
        return index

    run_rank = np.zeros(len(code_of), dtype=np.int32)
    run_rank[np.array([code_of[name] for name in sorted(code_of)], dtype=np.int64)] = np.arange(len(code_of), dtype=np.int32)
    keys = pa.table({
        "image_id": pa.chunked_array(ids, type=pa.string()),
        "started": np.concatenate(started),
        "run": run_rank[np.concatenate(run_codes)],
        "write": np.concatenate(writes),
    })
    del ids, started, run_codes, writes
    # Stable sort: among equal keys (same image, run and shard) the later row stays last.
    order = pc.sort_indices(keys, sort_keys=[("image_id", "ascending"), ("started", "ascending"),
                                             ("run", "ascending"), ("write", "ascending")]).to_numpy()
    sorted_ids = keys.column("image_id").take(order)
    del keys
    last = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        last[:-1] = pc.not_equal(sorted_ids[:-1], sorted_ids[1:]).to_numpy(zero_copy_only=False)
    del sorted_ids
    if not last.all():
        losing = np.sort(order[~last].astype(np.int64))
        shard_of = np.searchsorted(offsets, losing, side="right") - 1
        for number in np.unique(shard_of).tolist():
            index.losers[number] = losing[shard_of == number] - offsets[number]
    if sort_by_id:
        positions = order[last].astype(np.int64)
        if row_filter is not None:
            positions = positions[np.concatenate(kept)[positions]]
        index.sorted_positions = positions
    return index
