"""Planning on Ray Data: the hash-partitioned anti-join of the listing against OUTPUT's rows keeps
today's rules (id + source version for finished runs, --retry-errors, repeated error rows) and
counts this run's earlier attempts by image id alone; with nothing labelled the listing streams."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from labels_fixtures import LabelItem, write_labels_output

STARTED = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)  # label_row's source_mtime; its size is 1000


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _manifest(path, entries: list[tuple[str, int]]) -> str:
    """A Parquet manifest of (file name, size) entries, every one with label_row's mtime."""
    pq.write_table(
        pa.table(
            {
                "uri": [name for name, _ in entries],
                "size": pa.array([size for _, size in entries], pa.int64()),
                "mtime": pa.array([STARTED] * len(entries), pa.timestamp("us", tz="UTC")),
            }
        ),
        path,
    )
    return str(path)


def _output_with_history(output: str) -> None:
    label = np.zeros((4, 4), np.uint8)

    def item(name, **error):
        return LabelItem(name, f"file:///in/{name}", None if error else label, **error)

    unreadable = {"error_kind": "unreadable", "error": "ConnectionError: reset"}
    write_labels_output(output, [
        item("same.jpg"), item("changed.jpg"), item("read.jpg", **unreadable),
        item("corrupt.jpg", error_kind="corrupt", error="bad header"), item("cured.jpg", **unreadable),
        item("twice.jpg", **unreadable),
    ], run_id="run-a", started=STARTED, rows_per_shard=2)
    # A later finished run cured one error and failed again on another (same source versions).
    write_labels_output(output, [item("cured.jpg"), item("twice.jpg", **unreadable)], run_id="run-b",
                        started=STARTED, rows_per_shard=1)
    # The run being resumed: its first attempt labelled over.jpg (overwritten since) and failed on err.jpg.
    write_labels_output(output, [item("over.jpg"), item("err.jpg", **unreadable)], run_id="run-c",
                        started=STARTED, rows_per_shard=1, finished=False)


def _plan(tmp_path, output, retry_errors, limit=None, block_rows=2, earlier=("run-a", "run-b")):
    from clipdiy.pipeline.planning.pending import ROWS_PER_PARTITION, PlanTarget, plan_pending
    from clipdiy.storage import StorageOptions

    manifest = _manifest(tmp_path / "in" / "manifest.parquet", [
        ("same.jpg", 1000), ("changed.jpg", 2000), ("read.jpg", 1000), ("corrupt.jpg", 1000), ("cured.jpg", 1000),
        ("twice.jpg", 1000), ("over.jpg", 3000), ("err.jpg", 1000), ("new.jpg", 1000),
    ]) if not (tmp_path / "in" / "manifest.parquet").exists() else str(tmp_path / "in" / "manifest.parquet")
    target = PlanTarget(input_uri=manifest, output_uri=output, storage=StorageOptions(), run_id="run-c", attempt=2,
                        retry_errors=retry_errors, block_rows=block_rows, limit=limit)
    # One join partition per shard: the hash partitioning is exercised even on this tiny output.
    return plan_pending(target, list(earlier), estimated_rows_per_shard=ROWS_PER_PARTITION)


def _rows(plan) -> list[dict]:
    if plan.dataset is None:
        return []
    return sorted(plan.dataset.take_all(), key=lambda row: row["image_id"])


@pytest.mark.slow  # starts Ray
@pytest.mark.parametrize(
    ("retry_errors", "todo", "skipped", "retried"),
    [
        ("transient", {"changed.jpg", "read.jpg", "twice.jpg", "new.jpg"}, 3, 2),
        ("none", {"changed.jpg", "new.jpg"}, 5, 0),
        ("all", {"changed.jpg", "read.jpg", "corrupt.jpg", "twice.jpg", "new.jpg"}, 2, 3),
    ],
)
def test_plan_anti_joins_on_version_for_earlier_runs_and_on_id_for_this_run(
    ray_session, tmp_path, monkeypatch, retry_errors, todo, skipped, retried
):
    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.planning.incremental import PLANNED_SCHEMA

    (tmp_path / "in").mkdir()
    output = str(tmp_path / "labels")
    _output_with_history(output)

    def listed_in_the_driver(self, run_id):
        raise AssertionError(f"the driver listed the shards of {run_id}: a path per shard in the driver")

    # Ray's workers are other processes: only the driver's listing is refused.
    monkeypatch.setattr(OutputLayout, "shard_paths", listed_in_the_driver)
    plan = _plan(tmp_path, output, retry_errors)

    rows = _rows(plan)
    # Each pending image once (twice.jpg has two error rows), with its listed version.
    assert [row["image_id"] for row in rows] == sorted(todo)
    assert {row["image_id"]: row["source_size"] for row in rows}.get("changed.jpg") == 2000
    assert all(row["uri"] == f"file://{tmp_path}/in/{row['image_id']}" for row in rows)
    assert plan.dataset.schema().base_schema.equals(PLANNED_SCHEMA)
    counts = plan.counts
    # over.jpg (overwritten between this run's attempts) and err.jpg are this run's: resumed.
    assert (counts.listed, counts.skipped, counts.resumed, counts.todo, counts.retried) == (
        9, skipped, 2, len(todo), retried
    )


@pytest.mark.slow  # starts Ray
def test_plan_without_labelled_rows_streams_the_listing_and_honours_limit(ray_session, tmp_path):
    (tmp_path / "in").mkdir()
    output = str(tmp_path / "empty")
    plan = _plan(tmp_path, output, "transient", limit=5, earlier=())
    assert plan.counts is None  # nothing to join: the listing is the labelling's input
    ids = [row["image_id"] for row in plan.dataset.take_all()]
    assert ids == ["same.jpg", "changed.jpg", "read.jpg", "corrupt.jpg", "cured.jpg"]  # the first 5, in order


@pytest.mark.slow  # starts Ray
def test_plan_with_nothing_left_to_label_has_no_dataset(ray_session, tmp_path):
    (tmp_path / "in").mkdir()
    output = str(tmp_path / "labels")
    label = np.zeros((4, 4), np.uint8)
    names = ["same.jpg", "changed.jpg", "read.jpg", "corrupt.jpg", "cured.jpg", "twice.jpg", "over.jpg",
             "err.jpg", "new.jpg"]
    write_labels_output(output, [LabelItem(n, f"file:///in/{n}", label) for n in names], run_id="run-c",
                        started=STARTED, finished=False)
    plan = _plan(tmp_path, output, "all", earlier=())
    assert plan.dataset is None
    assert (plan.counts.listed, plan.counts.resumed, plan.counts.todo) == (9, 9, 0)


def test_split_pending_rules_on_one_joined_block():
    """The per-block rules, independent of Ray: done by an earlier run beats this run's attempts,
    which beat a retried error."""
    from clipdiy.pipeline.planning.incremental import (
        DONE,
        EARLIER_RUNS,
        LISTING_SCHEMA,
        RETRY,
        THIS_RUN,
        split_pending,
    )

    listing = pa.table({
        "uri": [f"u{i}" for i in range(5)], "image_id": [f"{i}.jpg" for i in range(5)],
        "source_size": [1, 2, 3, 4, 5], "source_etag": [None] * 5, "source_mtime": [STARTED] * 5,
        "listing_entry": [None] * 5, "signed_uri": [None] * 5,
    }, schema=LISTING_SCHEMA)
    joined = listing.append_column(EARLIER_RUNS, pa.array([DONE, RETRY, RETRY, None, DONE], pa.int8()))
    joined = joined.append_column(THIS_RUN, pa.array([True, True, None, None, None]))
    pending, counts = split_pending(joined)
    assert pending.column("image_id").to_pylist() == ["2.jpg", "3.jpg"]
    assert pending.schema.equals(LISTING_SCHEMA)
    assert (counts.listed, counts.skipped, counts.resumed, counts.retried, counts.todo) == (5, 2, 1, 1, 2)


def _folder_input(root) -> list[str]:
    """Ten 1000-byte files with label_row's mtime in nested folders; their image ids."""
    import os

    names = ["top.jpg"] + [f"d{i}/{name}" for i in range(3) for name in ("a.jpg", "e/b.jpg", "e/c.jpg")]
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (STARTED.timestamp(), STARTED.timestamp()))
    return sorted(names)


@pytest.mark.slow  # starts Ray
@pytest.mark.parametrize("labelled", [0, 4])
def test_a_folder_is_listed_in_parts_by_several_tasks_each_image_once(ray_session, tmp_path, labelled):
    from clipdiy.pipeline.planning.pending import ROWS_PER_PARTITION, PlanTarget, plan_pending
    from clipdiy.storage import StorageOptions

    names = _folder_input(tmp_path / "in")
    output = str(tmp_path / "labels")
    done = names[::3][:labelled]
    if done:
        label = np.zeros((4, 4), np.uint8)
        write_labels_output(output, [LabelItem(n, f"file:///in/{n}", label) for n in done], run_id="run-a",
                            started=STARTED, rows_per_shard=1)
    # One listing task: the split goes three folder levels deep (top files, d*/ files, d*/e/ trees).
    target = PlanTarget(input_uri=str(tmp_path / "in"), output_uri=output, storage=StorageOptions(), run_id="run-b",
                        attempt=1, retry_errors="transient", block_rows=2, listing_tasks=1)
    plan = plan_pending(target, ["run-a"] if done else [], estimated_rows_per_shard=ROWS_PER_PARTITION)
    rows = _rows(plan)
    assert [row["image_id"] for row in rows] == sorted(set(names) - set(done))
    assert all(row["uri"] == f"file://{tmp_path}/in/{row['image_id']}" and row["source_size"] == 1000 for row in rows)
    if done:
        assert (plan.counts.listed, plan.counts.skipped, plan.counts.todo) == (10, len(done), 10 - len(done))
    else:
        assert plan.counts is None


@pytest.mark.slow  # starts Ray
@pytest.mark.parametrize("labelled", [False, True])
def test_a_manifest_listing_an_image_twice_gives_its_first_entry_once(ray_session, tmp_path, labelled):
    from clipdiy.pipeline.planning.pending import PlanTarget, plan_pending
    from clipdiy.storage import StorageOptions

    (tmp_path / "in").mkdir()
    manifest = _manifest(tmp_path / "in" / "manifest.parquet", [
        ("a.jpg", 1000), ("b.jpg", 1000), ("a.jpg", 2000), ("c.jpg", 1000), ("b.jpg", 3000), ("c.jpg", 1000),
    ])
    output = str(tmp_path / "labels")
    if labelled:  # a.jpg at its first entry's version: done
        label = np.zeros((4, 4), np.uint8)
        write_labels_output(output, [LabelItem(n, f"file:///in/{n}", label) for n in ("a.jpg", "x.jpg")],
                            run_id="run-a", started=STARTED)
    target = PlanTarget(input_uri=manifest, output_uri=output, storage=StorageOptions(), run_id="run-b", attempt=1,
                        retry_errors="transient", block_rows=2)
    plan = plan_pending(target, ["run-a"] if labelled else [], estimated_rows_per_shard=1)
    rows = [(row["image_id"], row["source_size"]) for row in _rows(plan)]
    if labelled:
        assert rows == [("b.jpg", 1000), ("c.jpg", 1000)]
        assert (plan.counts.listed, plan.counts.skipped, plan.counts.todo) == (3, 1, 2)
    else:
        assert rows == [("a.jpg", 1000), ("b.jpg", 1000), ("c.jpg", 1000)]


@pytest.mark.slow  # starts Ray
def test_plan_files_hold_no_signed_url_and_the_labelling_gets_it_back(ray_session, tmp_path):
    """Issue 18 item 5: a plan file under OUTPUT stores the manifest entry's number, not its
    presigned URL; the planned dataset joins the URL back from the manifest (an entry that no
    longer lists the image gets none)."""
    from pathlib import Path

    from clipdiy.pipeline.planning.pending import PlanTarget, plan_pending
    from clipdiy.storage import StorageOptions

    (tmp_path / "in").mkdir()
    secret = "sigSECRETplan42"
    signed = f"https://h.example.com/s.jpg?versionId=7&X-Amz-Signature={secret}"
    manifest = tmp_path / "in" / "list.txt"
    manifest.write_text(f"plain.jpg\n{signed}\n")
    output = str(tmp_path / "labels")
    write_labels_output(output, [LabelItem("x.jpg", "file:///in/x.jpg", np.zeros((4, 4), np.uint8))], run_id="run-a",
                        started=STARTED)
    target = PlanTarget(input_uri=str(manifest), output_uri=output, storage=StorageOptions(), run_id="run-b",
                        attempt=1, retry_errors="transient", block_rows=2)
    plan = plan_pending(target, ["run-a"], estimated_rows_per_shard=1)

    files = sorted(Path(plan.plan_dir).rglob("*.parquet"))
    assert files
    for path in files:
        assert secret.encode() not in path.read_bytes() and secret not in str(pq.read_table(path).to_pylist())
    rows = [(row["image_id"], row["uri"], row["signed_uri"]) for row in _rows(plan)]
    assert rows == [("https://h.example.com/s.jpg?versionId=7", "https://h.example.com/s.jpg?versionId=7", signed),
                    ("plain.jpg", f"file://{tmp_path}/in/plain.jpg", None)]

    manifest.write_text(f"plain.jpg\nother.jpg\n{signed}\n")  # rewritten before the labelling reads it
    row = _rows(plan)[0]
    assert (row["image_id"], row["signed_entry"], row["signed_uri"]) == ("https://h.example.com/s.jpg?versionId=7", 1, None)


def test_a_timed_out_object_is_retried_by_a_bounded_number_of_runs():
    """Issue 26, section 2: a read past --read-deadline-s is a timed_out row, retried by later
    runs until this many finished runs hold one for its version; then the row stands (a store
    that stalls on one object every night costs at most that many deadlines)."""
    import pyarrow.compute as pc

    from clipdiy.pipeline.planning.incremental import (
        EARLIER_RUNS,
        EARLIER_TIMEOUTS,
        LISTING_SCHEMA,
        RETRY,
        TIMEOUTS,
        earlier_run_tags,
        split_pending,
    )

    shard = pa.table({"image_id": ["a.jpg", "b.jpg", "c.jpg"], "source_size": [1, 2, 3],
                      "source_etag": [None] * 3, "source_mtime": [STARTED] * 3,
                      "status": ["error"] * 3, "error_kind": ["timed_out", "unreadable", "not_found"]})
    tags = earlier_run_tags(shard, "transient")
    assert tags.column("tag").to_pylist() == [RETRY, RETRY, 2]
    assert tags.column(TIMEOUTS).to_pylist() == [1, 0, 0]

    listing = pa.table({
        "uri": ["u0", "u1", "u2"], "image_id": ["0.jpg", "1.jpg", "2.jpg"], "source_size": [1, 2, 3],
        "source_etag": [None] * 3, "source_mtime": [STARTED] * 3, "listing_entry": [None] * 3,
        "signed_uri": [None] * 3,
    }, schema=LISTING_SCHEMA)
    joined = listing.append_column(EARLIER_RUNS, pa.array([RETRY, RETRY, RETRY], pa.int8()))
    joined = joined.append_column(EARLIER_TIMEOUTS, pa.array([2, 3, 0], pa.int64()))
    for nights, todo in ((3, ["0.jpg", "2.jpg"]), (2, ["2.jpg"]), (None, ["0.jpg", "1.jpg", "2.jpg"])):
        pending, counts = split_pending(joined, nights)
        assert pending.column("image_id").to_pylist() == todo
        assert counts.skipped == 3 - len(todo) and counts.retried == len(todo)
    assert pc.sum(tags.column(TIMEOUTS)).as_py() == 1


def test_worker_lost_is_retried_by_transient_in_a_bounded_number_of_runs():
    """Issue 25: a worker_lost row (a process died twice on the image alone, for causes Ray could
    not tell apart from the image's own) is retried by later runs with the default
    --retry-errors transient, until WORKER_LOST_RUNS finished runs gave its version one."""
    from clipdiy.pipeline.planning.incremental import (
        DONE,
        EARLIER_RUNS,
        EARLIER_WORKER_LOST,
        LISTING_SCHEMA,
        RETRY,
        WORKER_LOST,
        WORKER_LOST_RUNS,
        earlier_run_tags,
        split_pending,
    )

    shard = pa.table({
        "image_id": ["a", "b", "c", "d"], "source_size": pa.array([1, 1, 1, 1], pa.int64()),
        "source_etag": pa.nulls(4, pa.string()), "source_mtime": pa.array([STARTED] * 4, pa.timestamp("us", tz="UTC")),
        "status": ["error", "error", "error", "ok"], "error_kind": ["worker_lost", "model", "corrupt", None],
    })
    tags = earlier_run_tags(shard, "transient")
    assert tags.column("tag").to_pylist() == [RETRY, RETRY, DONE, DONE]
    assert tags.column(WORKER_LOST).to_pylist() == [1, 0, 0, 0]
    assert earlier_run_tags(shard, "none").column("tag").to_pylist() == [DONE] * 4

    assert WORKER_LOST_RUNS == 3
    listing = pa.table({
        "uri": [f"u{i}" for i in range(4)], "image_id": [f"{i}.jpg" for i in range(4)],
        "source_size": [1, 2, 3, 4], "source_etag": [None] * 4, "source_mtime": [STARTED] * 4,
        "listing_entry": [None] * 4, "signed_uri": [None] * 4,
    }, schema=LISTING_SCHEMA)
    joined = listing.append_column(EARLIER_RUNS, pa.array([RETRY, RETRY, RETRY, DONE], pa.int8()))
    joined = joined.append_column(EARLIER_WORKER_LOST, pa.array([1, 2, 3, 3], pa.int64()))
    pending, counts = split_pending(joined)
    assert pending.column("image_id").to_pylist() == ["0.jpg", "1.jpg"]
    assert (counts.skipped, counts.retried) == (2, 2)
