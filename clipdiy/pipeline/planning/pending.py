"""Planning a run on Ray Data: the listing, anti-joined against OUTPUT's rows, as a dataset.

Two shapes, both with driver memory that does not grow with the corpus:

- **Nothing labelled yet** (no shard in OUTPUT that could count): the listing itself is the
  labelling job's input. It streams (:func:`listing_dataset`) in blocks of ``block_rows``, so
  the first images are decoded while the listing goes on.
- **Otherwise**: the listing is joined with the earlier rows by Ray Data's hash-partitioned
  joins (``Dataset.join``, Ray >= 2.60, see pyproject.toml; ``left_outer`` on the source key against the finished
  runs' rows, deduplicated by a hash ``groupby``; ``left_outer`` on the image id against this
  run's earlier attempts), each of ``num_partitions`` partitions joined on its own; the rules of
  :func:`~clipdiy.pipeline.planning.incremental.split_pending` pick the rows still to label, which are
  written to ``OUTPUT/runs/<run_id>/_PLAN/<attempt>/pending-*.parquet``. The driver keeps one
  small stats row per written file; the labelling reads the files back (:func:`pending_dataset`).
  Time is linear in listed + labelled rows: every row is hashed once per join.

The listing of a prefix is spread over the cluster: one task splits it into parts (key ranges on
S3, folders elsewhere: :func:`~clipdiy.pipeline.sources.listing_parts.listing_parts`) and up to
``listing_tasks`` tasks list the parts at
once, so a bucket of 100M objects is not paged through by one client, one page after another.
A ``limit`` (the first N in listing order) keeps one task listing in order.

Joins need the ``polars`` package on the workers (Ray Data's join kernel).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import posixpath
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from clipdiy.locations import Location, as_location
from clipdiy.output_layout import OutputLayout
from clipdiy.pipeline.planning.incremental import (
    EARLIER_RUNS,
    EARLIER_TIMEOUTS,
    EARLIER_WORKER_LOST,
    LISTING_SCHEMA,
    SHARD_COLUMNS,
    SIGNED_ENTRY,
    SIGNED_URI,
    SOURCE_KEY,
    SHARD_SAMPLE_COLUMNS,
    THIS_RUN,
    TIMEOUTS,
    WORKER_LOST,
    WORKER_LOST_RUNS,
    ListingCounts,
    attempt_sample_ids,
    earlier_run_tags,
    earlier_sample_tags,
    shard_attempt_state,
    shard_earlier_state,
    split_pending_shards,
    listing_blocks,
    planned_rows,
    split_pending,
    with_source_key,
)
from clipdiy.pipeline.sources.key_ranges import SPLIT_MIN_KEYS
from clipdiy.pipeline.sources.formats import iter_shard_sources
from clipdiy.pipeline.sources.listing import iter_sources
from clipdiy.pipeline.sources.listing_parts import (
    ListingPart,
    iter_part_sources,
    listing_parts,
)
from clipdiy.pipeline.sources.manifests import (
    is_manifest_input,
    manifest_entries_estimate,
)
from clipdiy.storage import StorageOptions

logger = logging.getLogger(__name__)

PLAN_DIR = "_PLAN"
PENDING_PREFIX = "pending-"
#: Rows (listed + labelled) per join partition: a partition's hash table stays tens of MB.
ROWS_PER_PARTITION = 250_000
MAX_PARTITIONS = 1024
#: Shard files read by one task of the labelled-rows dataset.
SHARDS_PER_READ = 16
#: Number of a manifest entry in the manifest (``SourceObject.listing_entry``).
LISTING_SEQ = "listing_entry"
FIRST_SEQ = "first_listing_seq"
#: Parts a prefix is split into per listing task (small folders finish early: balance the rest).
PARTS_PER_LISTING_TASK = 4
#: Parts per block out of the splitting task.
PARTS_PER_BLOCK = 64
#: Listing rows per block on the way into the joins (few, large blocks for the shuffle).
JOIN_BLOCK_ROWS = 16384


@dataclass(frozen=True)
class PlanTarget:
    """Where a run's plan goes and what it is planned from (picklable: travels to workers)."""

    input_uri: Location  # as given (str accepted): travels pickled, never in a column
    output_uri: Location
    storage: StorageOptions
    run_id: str
    attempt: int
    retry_errors: str
    block_rows: int  # listing rows per block handed to the labelling (decode tasks take whole blocks)
    limit: int | None = None
    listing_tasks: int = 16  # parts of a prefix listed at once (each task mostly waits on the store)
    input_format: str = "files"  # files: a row per image; webdataset, parquet: a row per shard or file
    split_min_keys: int = SPLIT_MIN_KEYS  # S3 keys below which a key range is not split further
    timed_out_nights: int | None = None  # finished runs with a timed_out row after which an object is not retried

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_uri", as_location(self.input_uri))
        object.__setattr__(self, "output_uri", as_location(self.output_uri))

    @property
    def shards(self) -> bool:
        """The listing rows are shards (tars, Parquet files), planned per shard."""
        return self.input_format != "files"

    def plan_dir(self, layout: OutputLayout) -> str:
        return layout.path("runs", self.run_id, PLAN_DIR, f"{self.attempt:03d}")

    def retry_bounds(self) -> tuple[int | None, int | None]:
        """(finished runs with a ``timed_out`` row, with a ``worker_lost`` row) after which an image
        is not retried: bounds of ``transient`` retries only (``all`` retries every error)."""
        if self.retry_errors != "transient":
            return None, None
        return self.timed_out_nights, WORKER_LOST_RUNS


@dataclass
class Plan:
    """What the labelling reads: ``dataset`` (listing rows still to label, or None when there are
    none) and ``counts`` (None while the listing streams: nothing is known before it ends)."""

    dataset: object | None
    counts: ListingCounts | None
    plan_dir: str | None = None


# ----------------------------------------------------------------------------- Ray Data UDFs


def _list_input(
    batch: pa.Table, *, input_uri: Location, storage: StorageOptions, block_rows: int, limit: int | None, numbered: bool,
    keyed: bool, input_format: str = "files",
) -> Iterator[pa.Table]:
    # The batch's one row (the input's public form) starts the task; the input itself comes
    # as a Location in fn_kwargs, so no Arrow column ever holds its readable form.
    for _ in range(batch.num_rows):
        if input_format != "files":
            # Shards (10,000 for 100M images): one listing task, a row per shard, keyed by URI.
            for block in listing_blocks(iter_shard_sources(input_uri, input_format, storage), block_rows, limit):
                yield with_source_key(block, "uri") if keyed else block
            continue
        # Numbered: a manifest's repeated entries stay, for _first_entries to drop on the cluster
        # (every manifest entry has its number, LISTING_SEQ, from the listing).
        for block in listing_blocks(iter_sources(input_uri, storage, unique=not numbered), block_rows, limit):
            yield with_source_key(block) if keyed else block


def _split_listing(
    batch: pa.Table, *, input_uri: Location, storage: StorageOptions, min_parts: int,
    split_min_keys: int = SPLIT_MIN_KEYS,
) -> Iterator[pa.Table]:
    for _ in range(batch.num_rows):
        parts = listing_parts(input_uri, storage, min_parts=min_parts, split_min_keys=split_min_keys)
        while chunk := list(itertools.islice(parts, PARTS_PER_BLOCK)):
            yield pa.table(
                {
                    "input": pa.array([input_uri.public] * len(chunk), pa.string()),
                    "folder": pa.array([part.folder for part in chunk], pa.string()),
                    "recursive": pa.array([part.recursive for part in chunk], pa.bool_()),
                    "start_after": pa.array([part.start_after for part in chunk], pa.string()),
                    "end_at": pa.array([part.end_at for part in chunk], pa.string()),
                }
            )


def _list_parts(
    batch: pa.Table, *, input_uri: Location, storage: StorageOptions, block_rows: int, keyed: bool
) -> Iterator[pa.Table]:
    for row in batch.to_pylist():
        part = ListingPart(row["folder"], row["recursive"], row["start_after"], row["end_at"])
        for block in listing_blocks(iter_part_sources(input_uri, part, storage), block_rows):
            yield with_source_key(block) if keyed else block


def _read_earlier_tags(batch: pa.Table, *, output_uri: str, storage: StorageOptions, retry_errors: str) -> pa.Table:
    layout = OutputLayout.open(output_uri, storage)
    tables = [
        earlier_run_tags(pq.read_table(path, columns=SHARD_COLUMNS, filesystem=layout.fs), retry_errors)
        for path in batch.column("path").to_pylist()
    ]
    return pa.concat_tables(tables)


def _read_present(path: str, fs, columns: list[str]) -> pa.Table:
    """The ``columns`` of a shard file that it has (rows of schema v1 have no ``source_uri``)."""
    with fs.open(path, "rb") as handle:
        parquet = pq.ParquetFile(handle)
        present = set(parquet.schema_arrow.names)
        return parquet.read(columns=[c for c in columns if c in present])


def _read_earlier_sample_tags(batch: pa.Table, *, output_uri: str, storage: StorageOptions, retry_errors: str) -> pa.Table:
    layout = OutputLayout.open(output_uri, storage)
    tables = [
        earlier_sample_tags(_read_present(path, layout.fs, SHARD_SAMPLE_COLUMNS), retry_errors)
        for path in batch.column("path").to_pylist()
    ]
    return pa.concat_tables(tables)


def _read_attempt_sample_ids(batch: pa.Table, *, output_uri: str, storage: StorageOptions) -> pa.Table:
    layout = OutputLayout.open(output_uri, storage)
    tables = [attempt_sample_ids(_read_present(path, layout.fs, ["image_id", "source_uri"]))
              for path in batch.column("path").to_pylist()]
    return pa.concat_tables(tables)


def _read_image_ids(batch: pa.Table, *, output_uri: str, storage: StorageOptions) -> pa.Table:
    layout = OutputLayout.open(output_uri, storage)
    tables = [pq.read_table(path, columns=["image_id"], filesystem=layout.fs) for path in batch.column("path").to_pylist()]
    return pa.concat_tables(tables)


def _mark_this_run(batch: pa.Table) -> pa.Table:
    return pa.table({"image_id": batch.column("image_id"), THIS_RUN: pa.array([True] * batch.num_rows, pa.bool_())})


def _write_pending(batch: pa.Table, *, target: PlanTarget) -> pa.Table:
    if target.shards:
        pending, counts = split_pending_shards(batch)
    else:
        pending, counts = split_pending(batch, *target.retry_bounds())
    # A plan file is under OUTPUT and outlives a crash: it holds no signed location, only the
    # number of the manifest entry that has it (resolved again by pending_dataset).
    planned = planned_rows(pending)
    path = ""
    if pending.num_rows:
        layout = OutputLayout.open(target.output_uri, target.storage)
        path = posixpath.join(target.plan_dir(layout), f"{PENDING_PREFIX}{uuid.uuid4().hex}.parquet")
        sink = pa.BufferOutputStream()
        pq.write_table(planned, sink)
        layout.write_bytes_atomic(path, sink.getvalue().to_pybytes())
    return pa.table(
        {
            "path": [path],
            "todo": [pending.num_rows],
            "signed": [planned.num_rows - planned.column(SIGNED_ENTRY).null_count],
            "listed": [counts.listed],
            "skipped": [counts.skipped],
            "resumed": [counts.resumed],
            "retried": [counts.retried],
        }
    )


def _read_pending(batch: pa.Table, *, output_uri: str, storage: StorageOptions, block_rows: int) -> Iterator[pa.Table]:
    layout = OutputLayout.open(output_uri, storage)
    for path in batch.column("path").to_pylist():
        with layout.fs.open(path, "rb") as handle:
            for rows in pq.ParquetFile(handle).iter_batches(batch_size=block_rows):
                yield pa.Table.from_batches([rows])


# ----------------------------------------------------------------------------- datasets


def listing_dataset(target: PlanTarget, block_rows: int, *, numbered: bool = False, keyed: bool = False):
    """The listing of ``target.input_uri`` as a dataset, streamed in blocks of ``block_rows``:
    a prefix in parts by up to ``target.listing_tasks`` tasks at once (any order); with a
    ``limit``, or for a glob or manifest, by one task in listing order. ``numbered`` (a manifest,
    no limit): repeated entries are kept and every row gets its :data:`LISTING_SEQ`. ``keyed``:
    with :data:`SOURCE_KEY`, computed by the listing tasks (a task of its own per block would
    have no CPU to bound how many run at once)."""
    import ray.data

    source = ray.data.from_items([{"input": target.input_uri.public}])
    # No CPU reserved by the listing tasks: they wait on the store, and a CPU held by a listing
    # that backpressure pauses could starve the decode tasks that drain it.
    if target.limit is not None or numbered or target.shards:
        listing = source.map_batches(
            _list_input,
            fn_kwargs={"input_uri": target.input_uri, "storage": target.storage, "block_rows": block_rows,
                       "limit": target.limit, "numbered": numbered,
                       "keyed": keyed, "input_format": target.input_format},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0,
        )
    else:
        parts = source.map_batches(
            _split_listing,
            fn_kwargs={"input_uri": target.input_uri, "storage": target.storage,
                       "min_parts": PARTS_PER_LISTING_TASK * target.listing_tasks,
                       "split_min_keys": target.split_min_keys},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0,
        )
        listing = parts.repartition(target_num_rows_per_block=1).map_batches(  # a part per task
            _list_parts,
            fn_kwargs={"input_uri": target.input_uri, "storage": target.storage, "block_rows": block_rows, "keyed": keyed},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=0,
            compute=ray.data.TaskPoolStrategy(size=target.listing_tasks),
        )
    # A task's outputs are coalesced up to the byte-sized target block (~1M listing rows, which
    # one decode task would then take whole): the streaming repartition keeps the blocks small.
    return listing.repartition(target_num_rows_per_block=block_rows)


def _list_shards(batch: pa.Table, *, output_uri: str, storage: StorageOptions) -> Iterator[pa.Table]:
    layout = OutputLayout.open(output_uri, storage)
    for run_id in batch.column("run_id").to_pylist():
        paths = layout.shard_paths(run_id)
        for start in range(0, len(paths), SHARDS_PER_READ):
            yield pa.table({"path": pa.array(paths[start : start + SHARDS_PER_READ], pa.string())})


def shard_paths_dataset(target: PlanTarget, run_ids: list[str]):
    """The committed shard paths of ``run_ids``, listed by Ray tasks (one per run) and kept in the
    object store (materialised: counted, then read), in blocks of :data:`SHARDS_PER_READ` paths.
    The driver holds the run ids only, never a path per shard."""
    import ray.data

    paths = ray.data.from_items([{"run_id": run_id} for run_id in run_ids], override_num_blocks=len(run_ids))
    paths = paths.map_batches(
        _list_shards,
        fn_kwargs={"output_uri": target.output_uri, "storage": target.storage},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,  # waits on the store's listing; bounded below, as a 0-CPU task has no CPU to bound it
        compute=ray.data.TaskPoolStrategy(size=target.listing_tasks),
    )
    # A task's outputs are coalesced into large blocks: split them back, one read task per block.
    return paths.repartition(target_num_rows_per_block=SHARDS_PER_READ).materialize()


def _first_entries(listing, partitions: int):
    """One row per image id of a numbered manifest listing: its first entry, as the listing of
    a manifest gives it (a hash ``groupby`` for each id's first number, joined back), so no
    process holds a set of the manifest's ids."""
    from ray.data.aggregate import Min

    firsts = listing.groupby("image_id", num_partitions=partitions).aggregate(Min(LISTING_SEQ, alias_name=FIRST_SEQ))
    return listing.join(firsts, "inner", partitions, on=("image_id", LISTING_SEQ), right_on=("image_id", FIRST_SEQ))


def _partitions(rows: int) -> int:
    return max(1, min(MAX_PARTITIONS, math.ceil(rows / ROWS_PER_PARTITION)))


def plan_pending(target: PlanTarget, earlier_run_ids: list[str], estimated_rows_per_shard: int) -> Plan:
    """Plan ``target``'s run: see the module docstring. ``earlier_run_ids``: the finished runs
    whose rows count by source version; ``estimated_rows_per_shard`` sizes the join partitions."""
    from ray.data.aggregate import Max, Sum

    layout = OutputLayout.open(target.output_uri, target.storage)
    earlier = shard_paths_dataset(target, earlier_run_ids) if earlier_run_ids else None
    attempts = shard_paths_dataset(target, [target.run_id])
    earlier_shards = earlier.count() if earlier is not None else 0
    attempt_shards = attempts.count()
    # A manifest may list an image twice; without a limit its repeats are dropped on the cluster.
    unique = not target.shards and is_manifest_input(target.input_uri, target.storage) and target.limit is None
    listed = manifest_entries_estimate(target.input_uri, target.storage) if unique else 0
    # The listing of a prefix is not known before it is read: size the partitions by the
    # labelled side, which nightly runs over a growing corpus track closely.
    partitions = _partitions(max(listed, (earlier_shards + attempt_shards) * max(1, estimated_rows_per_shard)))
    if not earlier_shards and not attempt_shards:
        if not unique:
            return Plan(dataset=listing_dataset(target, target.block_rows), counts=None)
        listing = _first_entries(listing_dataset(target, JOIN_BLOCK_ROWS, numbered=True), partitions)
        listing = listing.select_columns(LISTING_SCHEMA.names).repartition(target_num_rows_per_block=target.block_rows)
        return Plan(dataset=listing, counts=None)

    joined = listing_dataset(target, JOIN_BLOCK_ROWS, numbered=unique, keyed=True)
    if unique:
        joined = _first_entries(joined, partitions)
    if target.shards:
        joined = _join_shard_states(target, joined, earlier if earlier_shards else None,
                                    attempts if attempt_shards else None, partitions)
    if earlier_shards and not target.shards:
        tags = earlier.map_batches(
            _read_earlier_tags,
            fn_kwargs={"output_uri": target.output_uri, "storage": target.storage, "retry_errors": target.retry_errors},
            batch_size=SHARDS_PER_READ,
            batch_format="pyarrow",
        )
        # One row per key (repeated error rows would repeat the listing row in the join).
        tags = tags.groupby(SOURCE_KEY, num_partitions=partitions).aggregate(
            Max("tag", alias_name=EARLIER_RUNS), Sum(TIMEOUTS, alias_name=EARLIER_TIMEOUTS),
            Sum(WORKER_LOST, alias_name=EARLIER_WORKER_LOST))
        joined = joined.join(tags, "left_outer", partitions, on=(SOURCE_KEY,))
    if attempt_shards and not target.shards:
        ids = attempts.map_batches(
            _read_image_ids,
            fn_kwargs={"output_uri": target.output_uri, "storage": target.storage},
            batch_size=SHARDS_PER_READ,
            batch_format="pyarrow",
        )
        ids = ids.groupby("image_id", num_partitions=partitions).count().map_batches(_mark_this_run, batch_format="pyarrow")
        joined = joined.join(ids, "left_outer", partitions, on=("image_id",))

    plan_dir = target.plan_dir(layout)
    remove_plans(layout, target.run_id)
    counts = ListingCounts()
    files: list[dict] = []
    signed = 0
    stats = joined.map_batches(_write_pending, fn_kwargs={"target": target}, batch_size=None, batch_format="pyarrow")
    for batch in stats.iter_batches(batch_size=None, batch_format="pyarrow"):
        for record in batch.to_pylist():
            counts.add(ListingCounts(record["listed"], record["skipped"], record["resumed"], record["retried"]))
            signed += record["signed"]
            if record["todo"]:
                files.append({"path": record["path"]})
    if not files:
        return Plan(dataset=None, counts=counts, plan_dir=plan_dir)
    dataset = pending_dataset(target, files, resolve_signed=signed > 0, partitions=_partitions(counts.listed))
    return Plan(dataset=dataset, counts=counts, plan_dir=plan_dir)


def _join_shard_states(target: PlanTarget, joined, earlier, attempts, partitions: int):
    """The shard listing joined with, per shard, what finished runs (by shard version) and this
    run's earlier attempts (by shard URI) labelled of it (``incremental``'s shard rules): one
    row per shard on each side, grouped by a hash shuffle, never in one process."""
    if earlier is not None:
        tags = earlier.map_batches(
            _read_earlier_sample_tags,
            fn_kwargs={"output_uri": target.output_uri, "storage": target.storage, "retry_errors": target.retry_errors},
            batch_size=SHARDS_PER_READ,
            batch_format="pyarrow",
        )
        timed_out_nights, worker_lost_runs = target.retry_bounds()
        states = tags.groupby(SOURCE_KEY, num_partitions=partitions).map_groups(
            shard_earlier_state, batch_format="pyarrow",
            fn_kwargs={"timed_out_nights": timed_out_nights, "worker_lost_runs": worker_lost_runs})
        joined = joined.join(states, "left_outer", partitions, on=(SOURCE_KEY,))
    if attempts is not None:
        ids = attempts.map_batches(
            _read_attempt_sample_ids,
            fn_kwargs={"output_uri": target.output_uri, "storage": target.storage},
            batch_size=SHARDS_PER_READ,
            batch_format="pyarrow",
        )
        states = ids.groupby("uri", num_partitions=partitions).map_groups(shard_attempt_state, batch_format="pyarrow")
        joined = joined.join(states, "left_outer", partitions, on=("uri",))
    return joined


def _signed_locations(batch: pa.Table) -> pa.Table:
    """(``signed_entry``, ``image_id``, ``signed_uri``) of the listing rows that hold a signed location."""
    signed = batch.filter(pc.is_valid(batch.column(SIGNED_URI)))
    return pa.table({SIGNED_ENTRY: signed.column(LISTING_SEQ), "image_id": signed.column("image_id"),
                     SIGNED_URI: signed.column(SIGNED_URI)})


def pending_dataset(target: PlanTarget, files: list[dict], *, resolve_signed: bool = False, partitions: int = 1):
    """The planned rows, read back a row group (``block_rows`` rows) at a time.

    ``resolve_signed``: some rows' readable locations are signed (a manifest of presigned URLs),
    which no plan file holds: the manifest is listed again and joined on (entry number, image
    id) to give them their ``signed_uri`` (null when the manifest no longer has that entry: the
    decode stage then writes an error row)."""
    import ray.data

    pending = ray.data.from_items(files, override_num_blocks=len(files)).map_batches(
        _read_pending,
        fn_kwargs={"output_uri": target.output_uri, "storage": target.storage, "block_rows": target.block_rows},
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=target.listing_tasks),
    )
    if resolve_signed:
        # Every entry, in manifest order, numbered as when planned (a limit counts unique ids).
        listing = listing_dataset(dataclasses.replace(target, limit=None), JOIN_BLOCK_ROWS, numbered=True)
        locations = listing.map_batches(_signed_locations, batch_format="pyarrow", num_cpus=0)
        pending = pending.join(locations, "left_outer", partitions, on=(SIGNED_ENTRY, "image_id"))
    return pending.repartition(target_num_rows_per_block=target.block_rows)


def remove_plans(layout: OutputLayout, run_id: str) -> None:
    """Delete a run's plan files (scratch: only the attempt that wrote them reads them)."""
    path = layout.path("runs", run_id, PLAN_DIR)
    layout.fs.invalidate_cache(path)
    try:
        layout.fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
