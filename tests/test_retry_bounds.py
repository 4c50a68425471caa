"""Bounded retries hold for samples of shards as for loose objects (issues 25 and 26).

A ``timed_out`` image is retried by ``--timed-out-nights`` finished runs at most, a
``worker_lost`` one by 3, with the default ``--retry-errors transient``; ``all`` retries every
error. The planning of loose objects (per image key) and of shards (per shard version, skipping
its done samples) must decide the same for the same history. Histories are generated; the
expected decision is computed here from the rule as documented, not by the planning code.
"""

from __future__ import annotations

import pyarrow as pa
from hypothesis import given
from hypothesis import strategies as st

from clipdiy.pipeline.planning.incremental import (
    DONE,
    EARLIER_DONE_IDS,
    EARLIER_RUNS,
    EARLIER_TIMEOUTS,
    EARLIER_WORKER_LOST,
    LISTING_SCHEMA,
    RETRY,
    SOURCE_KEY,
    earlier_run_tags,
    earlier_sample_tags,
    shard_earlier_state,
    split_pending,
)
from clipdiy.pipeline.planning.pending import PlanTarget
from clipdiy.storage import StorageOptions

# (status, error_kind) of one row; the kinds a transient retry takes and two it does not.
OUTCOMES = [("ok", None), ("error", "unreadable"), ("error", "model"), ("error", "timed_out"),
            ("error", "worker_lost"), ("error", "corrupt"), ("error", "not_found")]
RETRIED_BY_TRANSIENT = {"unreadable", "model", "timed_out", "worker_lost"}
WORKER_LOST_RUNS = 3  # the documented bound (docs/job/memory-faults.md)
SHARD = "s3://bucket/corpus/00000.tar"


def expected_done(runs: list[str | None], retry_errors: str, timed_out_nights: int | None) -> bool:
    """Whether the image is done after these runs (one outcome each; None: no row that run)."""
    kinds = [kind for kind in runs if kind != "absent"]
    if not kinds:
        return False
    if retry_errors == "none":
        return True
    retried = [kind is not None and (retry_errors == "all" or kind in RETRIED_BY_TRANSIENT) for kind in kinds]
    if not all(retried):
        return True  # some run labelled it, or gave an error that is not retried
    if retry_errors == "all":
        return False
    if timed_out_nights is not None and kinds.count("timed_out") >= timed_out_nights:
        return True
    return kinds.count("worker_lost") >= WORKER_LOST_RUNS


histories = st.lists(  # per sample: its outcome in each finished run ("absent": no row)
    st.lists(st.sampled_from([*(kind for _, kind in OUTCOMES), "absent"]), min_size=1, max_size=5),
    min_size=1, max_size=6,
)


def _rows(history: list[list[str | None]]) -> pa.Table:
    rows = [(f"00000.tar/{i:03d}", kind) for i, runs in enumerate(history) for kind in runs if kind != "absent"]
    n = len(rows)
    return pa.table({
        "image_id": [r[0] for r in rows], "status": ["ok" if r[1] is None else "error" for r in rows],
        "error_kind": pa.array([r[1] for r in rows], pa.string()),
        "source_size": pa.array([10] * n, pa.int64()), "source_etag": ["e"] * n,
        "source_mtime": pa.array([0] * n, pa.timestamp("us", tz="UTC")),
        "uri": [SHARD] * n, "source_uri": [SHARD] * n,
    })


def _bounds(retry_errors: str, timed_out_nights: int | None):
    target = PlanTarget("s3://in", "s3://out", StorageOptions(), "r", 1, retry_errors, 16,
                        timed_out_nights=timed_out_nights)
    return target.retry_bounds()


@given(history=histories, retry_errors=st.sampled_from(["transient", "all", "none"]),
       timed_out_nights=st.sampled_from([None, 1, 2, 3]))
def test_a_sample_of_a_shard_is_retried_as_often_as_a_loose_object(history, retry_errors, timed_out_nights):
    expected = {f"00000.tar/{i:03d}" for i, runs in enumerate(history)
                if expected_done(runs, retry_errors, timed_out_nights)}
    seen = {f"00000.tar/{i:03d}" for i, runs in enumerate(history) if any(k != "absent" for k in runs)}
    rows = _rows(history)
    if not rows.num_rows:
        return
    bounds = _bounds(retry_errors, timed_out_nights)

    # Shards: one state per shard version; its done samples are skipped when it is read again.
    state = shard_earlier_state(earlier_sample_tags(rows, retry_errors), *bounds)
    assert set(state.column(EARLIER_DONE_IDS)[0].as_py()) == expected
    assert state.column(EARLIER_RUNS).to_pylist() == [DONE if expected == seen else RETRY]

    # Loose objects: tags per row, summed per key as the planning's groupby does, then split.
    tags = earlier_run_tags(rows.select(["image_id", "source_size", "source_etag", "source_mtime", "status",
                                         "error_kind"]), retry_errors)
    per_key = tags.group_by(SOURCE_KEY).aggregate([("tag", "max"), ("timeouts", "sum"), ("worker_lost", "sum")])
    ids = sorted(seen)
    listing = pa.table({
        "uri": [f"s3://bucket/{i}" for i in ids], "image_id": ids, "source_size": [10] * len(ids),
        "source_etag": ["e"] * len(ids), "source_mtime": pa.array([0] * len(ids), pa.timestamp("us", tz="UTC")),
        "listing_entry": [None] * len(ids), "signed_uri": [None] * len(ids),
    }, schema=LISTING_SCHEMA)
    from clipdiy.pipeline.planning.incremental import with_source_key

    keyed = with_source_key(listing)
    joined = keyed.join(per_key.rename_columns([SOURCE_KEY, EARLIER_RUNS, EARLIER_TIMEOUTS, EARLIER_WORKER_LOST]),
                        SOURCE_KEY, join_type="left outer").sort_by("image_id")
    joined = joined.set_column(joined.schema.get_field_index(EARLIER_RUNS), EARLIER_RUNS,
                               joined.column(EARLIER_RUNS).cast(pa.int8()))
    pending, counts = split_pending(joined, *bounds)
    assert set(pending.column("image_id").to_pylist()) == seen - expected
    assert counts.skipped == len(expected)
