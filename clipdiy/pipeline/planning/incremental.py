"""Incremental runs: which listed images still need a label (the rules; ``planning`` runs them
on Ray Data).

An image is already labelled by an earlier run when a committed shard of a finished run holds a
row with the same image id *and* the same source version: size, ETag and mtime as listed. A
changed object therefore gets labelled again; its older row stays in its older run (readers
wanting the latest label take the row of the latest ``run_started_at`` per ``image_id``).

Rows of the run being resumed (its earlier attempts) count by image id alone, whatever their
version or status: an object overwritten between two attempts is not labelled twice in one run.

Error rows of earlier runs count as labelled unless the run retries them (``retry_errors``):
``transient`` (the default) retries the kinds a later attempt can cure, a read that failed
after its retries (``unreadable``) and a failed model call (``model``, e.g. out of memory);
``all`` retries every error (after raising ``--max-pixels``, say); ``none`` retries nothing.
``transient`` also retries ``worker_lost`` (a process that died on the image), in at most
:data:`WORKER_LOST_RUNS` runs of the image's version: a later run may have bigger workers.
A read that found no object (``not_found``) is an answer, not a failure: the object is read
again when it is listed with another version (size, ETag, mtime: a new source key), or with
``all``. (An entry of a manifest without version columns has one key whatever its object: once
not found, it is read again only with ``all``.)
An error that a later run cured (an ok row with the same key) stays done.

Everything here works on one Arrow block at a time: the joins that bring an earlier run's rows
next to the listing row they describe are ``planning``'s (Ray Data, hash-partitioned), so no
process holds the labelled keys of the whole output.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipdiy.pipeline.sources.objects import SourceObject, signed_column

logger = logging.getLogger(__name__)

#: The listing as it travels through the pipeline (names as in the label-row schema). ``uri``
#: holds no credential; ``signed_uri`` (see ``SourceObject``) is the only column that may, and
#: only the decode stage reads it; ``listing_entry``: the entry's number in a manifest.
LISTING_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string()),
        pa.field("image_id", pa.string()),
        pa.field("source_size", pa.int64()),
        pa.field("source_etag", pa.string()),
        pa.field("source_mtime", pa.timestamp("us", tz="UTC")),
        pa.field("listing_entry", pa.int64()),
        pa.field("signed_uri", pa.string()),
    ]
)
SIGNED_URI = "signed_uri"
#: A planned row written to a scratch file under OUTPUT: the listing without ``signed_uri``; in
#: its place ``signed_entry``, the number of the manifest entry that holds the row's readable
#: location (null when ``uri`` reads the object), so that no file holds a credential.
SIGNED_ENTRY = "signed_entry"
PLANNED_SCHEMA = pa.schema(
    [*(f for f in LISTING_SCHEMA if f.name not in ("listing_entry", SIGNED_URI)), pa.field(SIGNED_ENTRY, pa.int64())]
)
KEY_COLUMNS = ["image_id", "source_size", "source_etag", "source_mtime"]
_SEPARATOR = "\x1f"

#: Error kinds that a later run may cure: a failed read (after its retries), a failed model call,
#: a read past its time (``timed_out``: retried by ``timed_out_nights`` runs at most).
#: ``not_found`` (the object did not exist) is an answer: read again only as a new version.
TRANSIENT_ERROR_KINDS = ("unreadable", "model", "timed_out")
#: The error kind whose retries are bounded (a store that stalls on one object every night
#: would otherwise cost a deadline every night, forever).
TIMED_OUT = "timed_out"
#: Runs of one image version that may give it ``worker_lost`` (its process died twice while it
#: alone was worked on, for causes Ray could not tell apart from the image's own) before
#: ``transient`` stops retrying it: a later run, on bigger workers or a quieter node, may label it.
WORKER_LOST_RUNS = 3
WORKER_LOST_KIND = "worker_lost"
#: ``retry_errors`` choices: which error rows of earlier runs are labelled again.
RETRY_ERRORS = ("none", "transient", "all")


def source_keys(table: pa.Table, id_column: str = "image_id") -> pa.Array:
    """One string per row identifying an image version: id, size, ETag, mtime (microseconds).
    ``id_column``: ``uri`` for shard inputs, whose listing rows are shards named by URI."""
    table = table.select([id_column, *KEY_COLUMNS[1:]]).rename_columns(KEY_COLUMNS).combine_chunks()
    size = pc.fill_null(pc.cast(table.column("source_size"), pa.string()), "")
    etag = pc.fill_null(table.column("source_etag"), "")
    mtime = pc.fill_null(pc.cast(pc.cast(table.column("source_mtime"), pa.int64()), pa.string()), "")
    keys = pc.binary_join_element_wise(table.column("image_id"), size, etag, mtime, _SEPARATOR)
    return keys.combine_chunks() if isinstance(keys, pa.ChunkedArray) else keys




#: Column holding :func:`source_keys` while the listing is joined with earlier rows.
SOURCE_KEY = "source_key"
#: Joined column: the strongest tag of the finished runs' rows with the listing row's source key
#: (:data:`DONE` beats :data:`RETRY`: an error a later run cured is done); null when none.
EARLIER_RUNS = "earlier_runs_tag"
#: Joined column: non-null when an earlier attempt of this run holds a row with the image id.
THIS_RUN = "this_run_rows"
DONE, RETRY = 2, 1
#: Per shard row: 1 for a ``timed_out`` row; joined (:data:`EARLIER_TIMEOUTS`) as their sum per key.
TIMEOUTS = "timeouts"
#: Joined column: how many ``timed_out`` rows the finished runs hold for the listing row's key.
EARLIER_TIMEOUTS = "earlier_timeouts"
#: Per shard row: 1 for a ``worker_lost`` row; joined (:data:`EARLIER_WORKER_LOST`) as their sum per key.
WORKER_LOST = "worker_lost"
EARLIER_WORKER_LOST = "earlier_worker_lost"
#: Columns of a shard that the planning reads.
SHARD_COLUMNS = [*KEY_COLUMNS, "status", "error_kind"]


def retried_mask(table: pa.Table, retry_errors: str) -> pa.Array:
    """Boolean mask of the rows of a shard that ``retry_errors`` sends back to be labelled."""
    if retry_errors not in RETRY_ERRORS:
        raise ValueError(f"retry_errors must be one of {RETRY_ERRORS}, got {retry_errors!r}")
    table = table.combine_chunks()
    is_error = pc.equal(table.column("status"), "error")
    if retry_errors == "all":
        mask = is_error
    elif retry_errors == "transient":
        kinds = pa.array([*TRANSIENT_ERROR_KINDS, WORKER_LOST_KIND])
        transient = pc.is_in(table.column("error_kind"), value_set=kinds)
        mask = pc.and_(is_error, pc.fill_null(transient, False))
    else:
        mask = pc.and_(is_error, False)
    return mask.combine_chunks() if isinstance(mask, pa.ChunkedArray) else mask


def with_source_key(listing: pa.Table, id_column: str = "image_id") -> pa.Table:
    """Listing rows (:data:`LISTING_SCHEMA`) with their :data:`SOURCE_KEY` column appended."""
    return listing.append_column(SOURCE_KEY, source_keys(listing, id_column))


def earlier_run_tags(shard: pa.Table, retry_errors: str) -> pa.Table:
    """(:data:`SOURCE_KEY`, ``tag``, ``timeouts``) per row of a finished run's shard
    (:data:`SHARD_COLUMNS`): :data:`RETRY` for an error row that ``retry_errors`` retries, else
    :data:`DONE`; ``timeouts``: 1 for a ``timed_out`` row (summed per key: the runs it timed out in);
    ``worker_lost``: 1 for a ``worker_lost`` row (likewise)."""
    keys = source_keys(shard.select(KEY_COLUMNS).cast(pa.schema([LISTING_SCHEMA.field(name) for name in KEY_COLUMNS])))
    tags = pc.if_else(retried_mask(shard, retry_errors), pa.scalar(RETRY, pa.int8()), pa.scalar(DONE, pa.int8()))
    timed_out = pc.fill_null(pc.and_(pc.equal(shard.column("status"), "error"), pc.equal(shard.column("error_kind"), TIMED_OUT)), False)
    lost = pc.fill_null(pc.and_(pc.equal(shard.column("status"), "error"),
                                pc.equal(shard.column("error_kind"), WORKER_LOST_KIND)), False)
    return pa.table({SOURCE_KEY: keys, "tag": tags, TIMEOUTS: pc.cast(timed_out, pa.int64()),
                     WORKER_LOST: pc.cast(lost, pa.int64())})


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

    def add(self, other: ListingCounts) -> None:
        self.listed += other.listed
        self.skipped += other.skipped
        self.resumed += other.resumed
        self.retried += other.retried


def _count(mask: pa.Array) -> int:
    return int(pc.sum(mask).as_py() or 0)


def split_pending(joined: pa.Table, timed_out_nights: int | None = None,
                  worker_lost_runs: int | None = WORKER_LOST_RUNS) -> tuple[pa.Table, ListingCounts]:
    """The rows of a joined listing block that still need a label (:data:`LISTING_SCHEMA`), and
    the block's counts.

    ``joined``: listing rows with :data:`EARLIER_RUNS` and :data:`THIS_RUN` (either may be absent:
    no such rows in OUTPUT). A row done by an earlier run is skipped; else one that this run's
    earlier attempts labelled is resumed; the rest are to do. ``timed_out_nights``: a row to
    retry whose key timed out in this many finished runs is done (its ``timed_out`` row stands);
    ``worker_lost_runs``: likewise for ``worker_lost`` rows. None: no bound (``--retry-errors all``).
    """
    rows = joined.num_rows
    joined = joined.combine_chunks()
    if EARLIER_RUNS in joined.column_names:
        tag = joined.column(EARLIER_RUNS)
        done = pc.fill_null(pc.equal(tag, DONE), False)
        retry = pc.fill_null(pc.equal(tag, RETRY), False)
        if timed_out_nights is not None and EARLIER_TIMEOUTS in joined.column_names:
            spent = pc.fill_null(pc.greater_equal(joined.column(EARLIER_TIMEOUTS), timed_out_nights), False)
            done = pc.or_(done, pc.and_(retry, spent))
            retry = pc.and_(retry, pc.invert(spent))
        if worker_lost_runs is not None and EARLIER_WORKER_LOST in joined.column_names:
            spent = pc.fill_null(pc.greater_equal(joined.column(EARLIER_WORKER_LOST), worker_lost_runs), False)
            done = pc.or_(done, pc.and_(retry, spent))
            retry = pc.and_(retry, pc.invert(spent))
    else:
        done = retry = pa.array(np.zeros(rows, dtype=bool))
    if THIS_RUN in joined.column_names:
        this_run = pc.is_valid(joined.column(THIS_RUN))
    else:
        this_run = pa.array(np.zeros(rows, dtype=bool))
    resumed = pc.and_(pc.invert(done), this_run)
    todo = pc.invert(pc.or_(done, this_run))
    counts = ListingCounts(listed=rows, skipped=_count(done), resumed=_count(resumed), retried=_count(pc.and_(todo, retry)))
    return joined.filter(todo).select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA), counts


def planned_rows(pending: pa.Table) -> pa.Table:
    """Listing rows (:data:`LISTING_SCHEMA`) as a plan file stores them (:data:`PLANNED_SCHEMA`):
    the signed location replaced by a pointer to its manifest entry (shard inputs: and their
    :data:`SKIP_IDS`)."""
    signed = pc.is_valid(pending.column(SIGNED_URI))
    entry = pc.if_else(signed, pending.column("listing_entry"), pa.scalar(None, pa.int64()))
    planned = pending.append_column(SIGNED_ENTRY, entry).select(PLANNED_SCHEMA.names).cast(PLANNED_SCHEMA)
    if "skip_ids" in pending.column_names:
        planned = planned.append_column("skip_ids", pending.column("skip_ids"))
    return planned


def listing_table(sources: list[SourceObject]) -> pa.Table:
    """Listing rows (:data:`LISTING_SCHEMA`) of ``sources``."""
    return pa.table(
        {
            "uri": [s.uri for s in sources],
            "image_id": [s.image_id for s in sources],
            "source_size": [s.size for s in sources],
            "source_etag": [s.etag for s in sources],
            "source_mtime": [s.mtime for s in sources],
            "listing_entry": [s.listing_entry for s in sources],
            SIGNED_URI: signed_column(sources),
        },
        schema=LISTING_SCHEMA,
    )


def listing_blocks(sources: Iterator[SourceObject], block_rows: int, limit: int | None = None) -> Iterator[pa.Table]:
    """Listing blocks of ``block_rows`` rows (the last one shorter) of the first ``limit`` of
    ``sources``, in listing order; one block's objects are held at a time."""
    buffer: list[SourceObject] = []
    for listed, source in enumerate(sources):
        if limit is not None and listed >= limit:
            break
        buffer.append(source)
        if len(buffer) >= block_rows:
            yield listing_table(buffer)
            buffer.clear()
    if buffer:
        yield listing_table(buffer)


# ----------------------------------------------------------------------------- shard inputs
#
# A tar shard or Parquet file is one listing row and many label rows. Planning is per shard: a
# shard is compared with the rows whose ``source_uri`` is its URI (rows of v1 and of loose
# files have none). Per finished run's rows, a sample's tag is its strongest (an error a later
# run cured is done); a shard is done when every sample row it has is done, else it is read
# again, skipping the samples that are (``skip_ids``). Rows of this run's earlier attempts
# count by image id alone, as for loose objects: a shard they touched is read again, skipping
# the samples they wrote (a run killed mid-shard resumes to exactly once).

#: Joined column of a shard: ids of its samples that finished runs labelled (tag DONE).
EARLIER_DONE_IDS = "earlier_done_ids"
#: Joined column of a shard: ids of its samples that this run's earlier attempts wrote.
ATTEMPT_IDS = "attempt_ids"
#: Planned column of a shard: image ids not to label again (read by stages/expand.py).
SKIP_IDS = "skip_ids"
#: Columns of a shard that the planning of shard inputs reads.
SHARD_SAMPLE_COLUMNS = [*SHARD_COLUMNS, "uri", "source_uri"]


def shard_uris(shard: pa.Table) -> pa.Array:
    """The URI of the shard each row came from (``source_uri``; rows without one, none: null)."""
    if "source_uri" not in shard.column_names:
        return pa.nulls(shard.num_rows, pa.string())
    return shard.column("source_uri").combine_chunks()


def earlier_sample_tags(shard: pa.Table, retry_errors: str) -> pa.Table:
    """(:data:`SOURCE_KEY` of the row's shard version, ``image_id``, ``tag``, ``timeouts``,
    ``worker_lost``) per row of a finished run's shard file that came from a shard input (the
    columns as :func:`earlier_run_tags` gives them for loose objects)."""
    uris = shard_uris(shard)
    keyed = pa.table({"uri": uris, **{name: shard.column(name) for name in KEY_COLUMNS[1:]}})
    keyed = keyed.cast(pa.schema([pa.field("uri", pa.string()), *(LISTING_SCHEMA.field(n) for n in KEY_COLUMNS[1:])]))
    tags = earlier_run_tags(shard.select(SHARD_COLUMNS), retry_errors)
    table = pa.table({SOURCE_KEY: source_keys(keyed, "uri"), "image_id": shard.column("image_id"),
                      "tag": tags.column("tag"), TIMEOUTS: tags.column(TIMEOUTS), WORKER_LOST: tags.column(WORKER_LOST)})
    return table.filter(pc.is_valid(uris))


def shard_earlier_state(rows: pa.Table, timed_out_nights: int | None = None,
                        worker_lost_runs: int | None = WORKER_LOST_RUNS) -> pa.Table:
    """One row for the sample rows of one shard version (``map_groups``): its tag (:data:`DONE`
    when every sample is done, else :data:`RETRY`) and the ids of its done samples.

    A sample (or the shard's own row, when its stream failed) is done when a finished run
    labelled it, or when its retries are spent: ``timed_out`` in ``timed_out_nights`` runs, or
    ``worker_lost`` in ``worker_lost_runs`` runs, as :func:`split_pending` bounds loose objects
    (None: no bound)."""
    per_sample = rows.group_by("image_id").aggregate([("tag", "max"), (TIMEOUTS, "sum"), (WORKER_LOST, "sum")])
    done = pc.equal(per_sample.column("tag_max"), DONE)
    retry = pc.equal(per_sample.column("tag_max"), RETRY)
    for column, bound in ((f"{TIMEOUTS}_sum", timed_out_nights), (f"{WORKER_LOST}_sum", worker_lost_runs)):
        if bound is not None:
            done = pc.or_(done, pc.and_(retry, pc.greater_equal(per_sample.column(column), bound)))
    done_ids = pc.sort_indices(per_sample.filter(done), sort_keys=[("image_id", "ascending")])
    done_ids = per_sample.filter(done).column("image_id").take(done_ids)
    tag = DONE if len(done_ids) == per_sample.num_rows else RETRY
    return pa.table({SOURCE_KEY: [rows.column(SOURCE_KEY)[0].as_py()], EARLIER_RUNS: pa.array([tag], pa.int8()),
                     EARLIER_DONE_IDS: pa.array([done_ids.to_pylist()], pa.list_(pa.string()))})


def attempt_sample_ids(shard: pa.Table) -> pa.Table:
    """(``uri`` of the shard, ``image_id``) per row of this run's shard file from a shard input."""
    uris = shard_uris(shard)
    return pa.table({"uri": uris, "image_id": shard.column("image_id")}).filter(pc.is_valid(uris))


def shard_attempt_state(rows: pa.Table) -> pa.Table:
    """One row per shard URI (``map_groups``): the ids this run's earlier attempts wrote."""
    ids = sorted(set(rows.column("image_id").to_pylist()))
    return pa.table({"uri": [rows.column("uri")[0].as_py()], THIS_RUN: [True],
                     ATTEMPT_IDS: pa.array([ids], pa.list_(pa.string()))})


def split_pending_shards(joined: pa.Table) -> tuple[pa.Table, ListingCounts]:
    """The shards of a joined listing block still to read (:data:`LISTING_SCHEMA` and
    :data:`SKIP_IDS`), and the block's counts (in shards: ``skipped`` done by finished runs,
    ``retried`` read again for some of their samples)."""
    rows = joined.num_rows
    joined = joined.combine_chunks()
    names = joined.column_names
    tags = joined.column(EARLIER_RUNS).to_pylist() if EARLIER_RUNS in names else [None] * rows
    earlier = joined.column(EARLIER_DONE_IDS).to_pylist() if EARLIER_DONE_IDS in names else [None] * rows
    attempts = joined.column(ATTEMPT_IDS).to_pylist() if ATTEMPT_IDS in names else [None] * rows
    keep, skip_ids = [], []
    counts = ListingCounts(listed=rows)
    for index, (tag, done_ids, attempt_ids) in enumerate(zip(tags, earlier, attempts, strict=True)):
        if tag == DONE:
            counts.skipped += 1
            continue
        counts.retried += tag == RETRY
        keep.append(index)
        skip_ids.append(sorted(set(done_ids or ()) | set(attempt_ids or ())))
    pending = joined.take(pa.array(keep, pa.int64())).select(LISTING_SCHEMA.names).cast(LISTING_SCHEMA)
    return pending.append_column(SKIP_IDS, pa.array(skip_ids, pa.list_(pa.string()))), counts
