"""Which rows of a labels output count, decided without holding the rows.

An ``image_id`` may have several rows: one per run that labelled it (a changed image relabelled),
and, should an output somehow hold them, several inside one run. The row that counts (the
*winner*) is the latest write: the row of the latest run (``run_started_at``, then ``run_id``);
inside one run the later attempt (shard names ``part-AAA-<digest>``, see
``clipdiy.output_layout``), then the later shard name, then the later row of the shard. One
exception: a human correction (``source = human``, imported from Label Studio by
``jobs/review.py``, in a run of its own) wins over the model rows of the image version it
corrected: rows are compared first by the run that labelled the image version
(``corrected_run_started_at`` for a human row, ``run_started_at`` for a model row), then human
before model, then as above. A model row of a later run (the image changed and was labelled
again) still wins over an older correction; nothing is overwritten. Every
reader (the feed, exports, evaluation local and on Ray, previews) asks :func:`build_row_index`,
so they all pick the same row.

The key pass reads only ``image_id``, ``run_started_at`` and ``run_id``, one shard at a time, into
compact Arrow/numpy keys (no Python object per row; about 24 bytes a row plus the id). Up to
``max_keys_in_memory`` rows they are held and sorted once by Arrow; above it they go to local
disk and come back as ``image_id`` ranges of at most that many rows
(:mod:`clipdiy.labels.key_partitions`), each sorted and resolved alone by the same code, so memory is
bounded by the threshold, not by the output. Either way it keeps afterwards:

- ``losers``: for the shards that hold losing rows only, their row numbers (none in the usual
  output, where every image has one row);
- optionally ``sorted_positions``: the winning rows (passing a row filter) in ``image_id`` order,
  as int64 positions into the shards' concatenation (8 bytes a row): the compact index of
  map-style readers and of outputs that must come sorted.

Rows themselves are read shard by shard by the readers, with :meth:`RowIndex.winners` as the mask.
"""

from __future__ import annotations

import contextlib
import posixpath
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipdiy.labels.key_partitions import KeySpill
from clipdiy.labels.runs import Run, read_shard

KEY_COLUMNS = ("image_id", "run_id", "run_started_at")
#: Keys of human corrections (absent from shards written before they existed: read as null).
REVIEW_KEY_COLUMNS = ("source", "corrected_run_started_at")
#: Rows whose keys the key pass holds in memory at most (about 200 bytes each at the peak of the
#: sort, ids of ~40 characters: 2M rows ~ 435 MB; ``benchmarks/bench_readers.py --key-pass``);
#: above it the keys go to local disk (about 70 bytes a row) and come back by id range.
MAX_KEYS_IN_MEMORY = 2_000_000
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
    max_keys_in_memory: int | None = None,
    spill_dir: str | None = None,
) -> RowIndex:
    """One key pass over the runs' shards (see the module docstring). ``row_filter`` (with the
    extra ``filter_columns`` it reads) narrows ``sorted_positions`` to the rows it keeps. Above
    ``max_keys_in_memory`` rows (default :data:`MAX_KEYS_IN_MEMORY`) the keys go to local disk
    (``spill_dir``, default the system's temporary folder) and are resolved id range by id range.
    Raises ``FileNotFoundError`` when the runs hold no shards. A custom ``read`` (synthetic
    keys, in benchmarks and tests) is asked for :data:`KEY_COLUMNS` only: its rows are model rows."""
    review_keys: tuple[str, ...] = ()
    if read is None:
        read = read_shard
        review_keys = REVIEW_KEY_COLUMNS
    limit = MAX_KEYS_IN_MEMORY if max_keys_in_memory is None else int(max_keys_in_memory)
    if limit < 1:
        raise ValueError(f"max_keys_in_memory must be at least 1, not {limit}")
    shards = tuple((run, shard) for run in runs for shard in run.shards)
    if not shards:
        raise FileNotFoundError("the labels output holds no shards")
    write_rank = np.zeros(len(shards), dtype=np.int32)
    first = 0
    for run in runs:
        for rank, local in enumerate(sorted(range(len(run.shards)), key=lambda i: shard_write_order(run.shards[i]))):
            write_rank[first + local] = rank
        first += len(run.shards)

    columns = list(dict.fromkeys([*KEY_COLUMNS, *review_keys, *filter_columns]))
    schema = _key_schema(row_filter is not None)
    counts = np.zeros(len(shards), dtype=np.int64)
    code_of: dict[str, int] = {}
    held: list[pa.RecordBatch] = []  # the keys while they fit in memory
    with contextlib.ExitStack() as cleanup:
        spill: KeySpill | None = None
        total = 0
        for number, (run, shard) in enumerate(shards):
            table = read(run, shard, columns)
            batch = _key_batch(table, total, int(write_rank[number]), code_of, row_filter, schema)
            counts[number] = table.num_rows
            total += table.num_rows
            del table
            if spill is None and total > limit:
                spill = cleanup.enter_context(KeySpill(schema, limit, directory=spill_dir))
                for kept in held:
                    spill.write(kept)
                held = []
            if spill is None:
                held.append(batch)
            else:
                spill.write(batch)
            del batch

        offsets = np.zeros(len(shards) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        index = RowIndex(shards=shards, offsets=offsets)
        run_rank = np.zeros(len(code_of), dtype=np.int32)
        run_rank[np.array([code_of[name] for name in sorted(code_of)], dtype=np.int64)] = np.arange(len(code_of), dtype=np.int32)
        found = _Outcome(int(offsets[-1]), sort_by_id)
        if spill is None:
            if offsets[-1] > 0:
                found.add(*_resolve(pa.Table.from_batches(held, schema), run_rank))
            del held
        else:
            # Id-range partitions, in id order: their winners, concatenated, are in global id order.
            for part in spill.partitions():
                if part.single_id and part.rows > limit:
                    found.add(*_resolve_one_id(part.batches(limit), run_rank))
                else:
                    found.add(*_resolve(part.read(), run_rank))

    if found.losing:
        lost = np.sort(np.concatenate(found.losing))
        shard_of = np.searchsorted(offsets, lost, side="right") - 1
        for number in np.unique(shard_of).tolist():
            index.losers[number] = lost[shard_of == number] - offsets[number]
    if sort_by_id:
        index.sorted_positions = found.sorted_positions()
    return index


def _key_schema(filtered: bool) -> pa.Schema:
    """The keys of one row: its id, its run (start, then a code of ``run_id`` mapped to the rank
    of the name at the end), its shard's write rank in the run, its global position and whether
    the row filter keeps it."""
    fields = [("image_id", pa.string()), ("basis", pa.int64()), ("human", pa.int8()), ("started", pa.int64()),
              ("run", pa.int32()), ("write", pa.int32()), ("position", pa.int64())]
    return pa.schema(fields + ([("kept", pa.bool_())] if filtered else []))


def _key_batch(table: pa.Table, first: int, write_rank: int, code_of: dict[str, int], row_filter: RowFilter | None,
               schema: pa.Schema) -> pa.RecordBatch:
    """The keys of one shard's rows (``first``: the global position of its first row)."""
    encoded = table.column("run_id").combine_chunks().dictionary_encode()
    lookup = np.array([code_of.setdefault(v, len(code_of)) for v in encoded.dictionary.to_pylist()], dtype=np.int32)
    n = table.num_rows
    started = pc.cast(table.column("run_started_at"), pa.int64()).combine_chunks()
    if "source" in table.column_names:
        human = pc.equal(table.column("source").combine_chunks(), "human").fill_null(False)
        corrected = pc.cast(table.column("corrected_run_started_at").combine_chunks(), pa.int64())
        # The run that labelled the image version: a human row's corrected run, else the row's own.
        basis = pc.if_else(human, corrected, started).fill_null(started)
    else:
        human, basis = pa.array(np.zeros(n, dtype=bool)), started
    columns = [
        pc.cast(table.column("image_id"), pa.string()).combine_chunks(),
        basis,
        pc.cast(human, pa.int8()),
        started,
        lookup[encoded.indices.to_numpy(zero_copy_only=False)] if len(lookup) else np.zeros(0, np.int32),
        np.full(n, write_rank, dtype=np.int32),
        np.arange(first, first + n, dtype=np.int64),
    ]
    if row_filter is not None:
        columns.append(np.asarray(row_filter(table), dtype=bool))
    return pa.RecordBatch.from_arrays([pa.array(c) if isinstance(c, np.ndarray) else c for c in columns], schema=schema)


#: The order that decides the winner: the last row of an id in this order wins.
_RULE = ("image_id", "basis", "human", "started", "run", "write", "position")


def _resolve(keys: pa.Table, run_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(losing positions, winning positions in ``image_id`` order, those the filter drops left
    out) of a key table holding every row of its ids. The one place the rule is applied: sorted
    by id, then the image version's run start, human before model, run start, run name, shard
    write rank and position (later row), the last row of each id wins."""
    positions = keys.column("position").to_numpy()
    if len(positions) == 0:
        return positions, positions
    ordered = pa.table({
        "image_id": keys.column("image_id"),
        "basis": keys.column("basis"),
        "human": keys.column("human"),
        "started": keys.column("started"),
        "run": run_rank[keys.column("run").to_numpy()],
        "write": keys.column("write"),
        "position": positions,
    })
    order = pc.sort_indices(ordered, sort_keys=[(name, "ascending") for name in _RULE]).to_numpy()
    sorted_ids = ordered.column("image_id").take(order)
    del ordered
    last = np.ones(len(order), dtype=bool)
    if len(order) > 1:
        last[:-1] = pc.not_equal(sorted_ids[:-1], sorted_ids[1:]).to_numpy(zero_copy_only=False)
    del sorted_ids
    won = order[last]
    if "kept" in keys.column_names:
        won = won[keys.column("kept").to_numpy()[won]]
    return positions[order[~last]], positions[won]


def _resolve_one_id(batches: Iterator[pa.RecordBatch], run_rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_resolve` for the rows of one id read batch by batch (an id with more rows than fit
    in memory): the winner is the lexicographic maximum of the rule's keys."""
    best: tuple[int, ...] | None = None
    best_kept = True
    positions: list[np.ndarray] = []
    for batch in batches:
        position = batch.column("position").to_numpy()
        keys = (batch.column("basis").to_numpy(), batch.column("human").to_numpy(), batch.column("started").to_numpy(),
                run_rank[batch.column("run").to_numpy()], batch.column("write").to_numpy(), position)
        top = int(np.lexsort(keys[::-1])[-1])
        candidate = tuple(int(k[top]) for k in keys)
        if best is None or candidate > best:
            best = candidate
            best_kept = "kept" not in batch.schema.names or bool(batch.column("kept")[top].as_py())
        positions.append(position)
    if best is None:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty
    every = np.concatenate(positions)
    winner = np.array([best[-1]] if best_kept else [], dtype=np.int64)
    return every[every != best[-1]], winner


class _Outcome:
    """What the partitions' resolutions add up to: losing positions (few, as chunks) and the
    winners in id order, written into one buffer of a position per row (8 bytes a row, the size
    of the result: concatenating chunks at the end would need twice that)."""

    def __init__(self, rows: int, sort_by_id: bool):
        self.losing: list[np.ndarray] = []
        self._winners = np.empty(rows, dtype=np.int64) if sort_by_id else None
        self._count = 0

    def add(self, lost: np.ndarray, won: np.ndarray) -> None:
        if len(lost):
            self.losing.append(lost)
        if self._winners is not None:
            self._winners[self._count:self._count + len(won)] = won
            self._count += len(won)

    def sorted_positions(self) -> np.ndarray:
        winners, self._winners = self._winners, None
        winners.resize(self._count, refcheck=False)  # shrinks in place
        return winners
