"""The attempt ledger without Ray: deaths counted per batch and per image, only where they
followed the image; causes read from Ray's control-store records; the row-building stage's
per-image guard (issue 25 section 2)."""

from __future__ import annotations

import datetime as dt
import pickle
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ray.core.generated import common_pb2, gcs_pb2

from clipdiy.pipeline.stages import attempts
from clipdiy.pipeline.stages.attempts import (
    IMAGE_DEATHS,
    AttemptLedger,
    LedgerShard,
    classify_death,
)


def _ledger(max_deaths=1, shards=1):
    health = SimpleNamespace(shards=tuple(LedgerShard() for _ in range(shards)))
    return health, AttemptLedger(health, "decode", max_deaths)


def test_deaths_on_a_batch_send_it_image_by_image_and_two_deaths_on_an_image_cost_it_its_row():
    health, ledger = _ledger(max_deaths=1)
    ids = ["x.jpg", "y.jpg", "z.jpg"]
    first = ledger.begin(ids)
    assert (first.deaths, first.one_by_one, first.lost) == (0, False, {})
    # ... dies on the whole batch (while unpickling it, say): on no image.
    second = ledger.begin(ids)
    assert (second.deaths, second.one_by_one, second.lost) == (1, True, {})
    second.start("x.jpg")
    second.start("y.jpg")  # dies on y.jpg: once is not enough to blame it
    third = ledger.begin(ids)
    assert (third.deaths, third.lost) == (2, {})
    third.start("y.jpg")  # dies on y.jpg again
    fourth = ledger.begin(ids)
    assert fourth.lost == {"y.jpg": IMAGE_DEATHS} and "2 times working on this image alone" in fourth.lost_message("y.jpg")
    fourth.start("z.jpg")
    fourth.start(None)  # done with the images; dies packing the outputs: falls on none
    fifth = ledger.begin(ids)
    assert fifth.lost == {"y.jpg": 2} and fifth.deaths == 4
    fifth.end()
    assert health.shards[0].attempts_on_record() == 1  # the end waits for this process's next call
    AttemptLedger.flush(health)
    assert health.shards[0].attempts_on_record() == 0


def test_a_batch_costs_one_ledger_call_and_its_end_rides_on_the_next():
    health, ledger = _ledger(shards=3)
    calls = []
    for shard in health.shards:
        original = shard.begin_batch
        shard.begin_batch = lambda *a, _o=original, **k: calls.append(a) or _o(*a, **k)
    for n in range(30):
        ledger.begin([f"{n}.jpg"]).end()
    assert len(calls) == 30
    assert sum(s.attempts_on_record() for s in health.shards) <= 3  # one unsent end per shard at most
    assert all(len(s._records) <= 1 for s in health.shards)


@settings(max_examples=40, deadline=None)
@given(deaths=st.lists(st.tuples(st.sampled_from(["crashed", "memory_hog", "unknown", "memory_pressure",
                                                  "node_lost", "alive", "exited"]),
                                 st.sampled_from([None, "a.jpg", "b.jpg"])), max_size=8),
       max_deaths=st.integers(1, 3))
def test_only_deaths_that_followed_an_image_count_against_it(deaths, max_deaths, monkeypatch):
    """Whatever the sequence of deaths and their causes: a batch goes image by image after
    max_deaths counted deaths, and an image is lost after IMAGE_DEATHS counted deaths on it alone."""
    causes = iter([])
    monkeypatch.setattr(attempts, "death_cause", lambda attempt, wait_s=0: next(causes))
    health, ledger = _ledger(max_deaths=max_deaths)
    ids = ["a.jpg", "b.jpg"]
    for _, image in deaths:  # each attempt dies, on ``image`` alone (None: on the whole batch)
        attempt_ = health.shards[0]
        attempt_.begin_batch(f"decode:{attempts.batch_key(ids)}")
        attempt_.begin_image(f"decode:{attempts.batch_key(ids)}", image)
    causes = iter([cause for cause, _ in deaths])
    final = ledger.begin(ids)
    counted = [(cause, image) for cause, image in deaths if cause in ("crashed", "memory_hog", "unknown")]
    assert final.deaths == len(counted)
    assert final.one_by_one == (len(counted) >= max_deaths)
    expected = {image: n for image in ids if (n := sum(1 for _, i in counted if i == image)) >= 2}
    assert final.lost == expected


def _record(exit_type: str, detail: str = "", alive: bool = False):
    return gcs_pb2.WorkerTableData(is_alive=alive, exit_type=common_pb2.WorkerExitType.Value(exit_type),
                                   exit_detail=detail)


def _monitor_detail(own_gb: float, node_gb: float, limit_gb: float = 16.0) -> str:
    # Ray 2.60's memory monitor's words (raylet), with the killed worker's and the node's usage.
    return (f"Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.1, ID: ab12) "
            f"was {node_gb:.2f}GB used / {limit_gb:.2f}GB limit (0.95), which exceeds the memory usage threshold "
            f"of 0.95. Ray killed this worker (ID: cd34) because it was the most recently scheduled task; "
            f"(Worker with lease granted: job ID=01000000, lease ID=ff, task name=MapBatches(DecodeBatch), "
            f"required resources={{CPU: 1}}, pid=4242, actual memory used={own_gb:.2f}GB, worker ID=cd34)")


@settings(max_examples=50, deadline=None)
@given(own=st.floats(0.01, 15.0), others=st.floats(0.0, 15.0))
def test_the_memory_monitor_blames_an_image_only_when_its_process_held_the_memory(own, others):
    node = own + others
    cause = classify_death(_record("NODE_OUT_OF_MEMORY", _monitor_detail(own, node)), node_alive=True)
    # The detail rounds to 2 decimals: judge from the numbers as written.
    own_w, node_w = round(own, 2), round(node, 2)
    assert cause == ("memory_hog" if own_w >= 0.5 * node_w else "memory_pressure")


def test_causes_of_death_from_the_control_store():
    assert classify_death(_record("SYSTEM_ERROR", "Worker unexpectedly exits ... SIGKILL"), True) == "crashed"
    assert classify_death(_record("SYSTEM_ERROR"), node_alive=False) == "node_lost"
    assert classify_death(_record("INTENDED_USER_EXIT", "ray.kill"), True) == "exited"
    assert classify_death(_record("SYSTEM_ERROR", alive=True), True) == "alive"
    assert classify_death(None, True) == "unknown"
    assert classify_death(_record("NODE_OUT_OF_MEMORY", "garbled"), True) == "memory_hog"


# --- the row-building stage -----------------------------------------------------------------


def _row_batch(payloads: list[bytes]) -> pa.Table:
    n = len(payloads)
    return pa.table({
        "image_id": [f"{i}.jpg" for i in range(n)], "uri": [f"/c/{i}.jpg" for i in range(n)],
        "source_size": pa.array([1] * n, pa.int64()), "source_etag": pa.nulls(n, pa.string()),
        "source_mtime": pa.nulls(n, pa.timestamp("us", tz="UTC")),
        "status": ["ok"] * n, "error_kind": pa.nulls(n, pa.string()), "error": pa.nulls(n, pa.string()),
        "width": pa.array([4] * n, pa.int32()), "height": pa.array([3] * n, pa.int32()),
        "payload": pa.array(payloads, pa.large_binary()),
    })


def _output(label: int):
    from clipdiy.segmentation.segmenter import ModelOutput

    return ModelOutput(label_map=np.full((3, 4), label, np.uint16), class_scores=np.array([0.5, 0.5], np.float32),
                       mask_scores=np.array([0.5, 0.5], np.float32), foreground_fraction=0.5,
                       saliency=np.zeros((3, 4), np.float32), original_size=(3, 4))


def _context():
    from clipdiy.pipeline.stages.rows import RowContext
    from clipdiy.segmentation.segmenter import Provenance

    provenance = Provenance("m", "sha256:0", "none", None, "faithful", "voc", "h")
    return RowContext("run", dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), provenance, ("background", "cat"))


@pytest.mark.parametrize("bad", [b"not a pickle", pickle.dumps({"not": "an output"})])
def test_an_image_whose_rows_cannot_be_built_is_its_own_error_row(bad):
    from clipdiy.pipeline.stages.rows import build_rows

    out = build_rows(_row_batch([pickle.dumps(_output(1)), bad, pickle.dumps(_output(0))]), _context()).to_pylist()
    assert [(r["status"], r["error_kind"]) for r in out] == [("ok", None), ("error", "unsupported"), ("ok", None)]
    assert "building this image's label row failed" in out[1]["error"] and out[1]["masks"] is None
    # The others are labelled: the cat everywhere in the first, the background everywhere in the last.
    assert [(m["class_name"], m["area"]) for m in out[0]["masks"]] == [("cat", 12)]
    assert [(m["class_name"], m["area"]) for m in out[2]["masks"]] == [("background", 12)]


def test_the_rows_stage_counts_deaths_and_gives_worker_lost_rows(monkeypatch):
    from clipdiy.pipeline.stages.rows import build_rows

    health = SimpleNamespace(shards=(LedgerShard(),))
    batch = _row_batch([pickle.dumps(_output(1)), pickle.dumps(_output(1))])
    key = f"rows:{attempts.batch_key(['0.jpg', '1.jpg'])}"
    shard = health.shards[0]
    shard.begin_batch(key)  # died on the whole batch
    for _ in range(IMAGE_DEATHS):  # then twice on 1.jpg alone
        shard.begin_batch(key)
        shard.begin_image(key, "1.jpg")
    out = build_rows(batch, _context(), health=health, max_worker_deaths=1).to_pylist()
    assert [(r["status"], r["error_kind"]) for r in out] == [("ok", None), ("error", "worker_lost")]
    assert "2 times working on this image alone" in out[1]["error"]


def test_a_restarted_health_actor_says_so_and_never_turns_a_lost_count_into_a_false_stop(monkeypatch, caplog):
    """Ray restarts the run's health actor (max_restarts=-1) with empty counts: it logs an error
    naming what was lost, and takes missing objects as answers (it cannot know whether a read
    succeeded before), so a first attempt's run is not stopped by counts it no longer has."""
    import logging

    import ray

    from clipdiy.pipeline.stages import health

    class Context:
        was_current_actor_reconstructed = True

        def get_actor_id(self):
            return "ab" * 16

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: Context())
    with caplog.at_level(logging.ERROR):
        restarted = health.RunHealth(stop_after_failed_reads=5, first_attempt=True)
        shard = LedgerShard()
    assert restarted.was_restarted() and shard.was_restarted()
    assert "read streak" in caplog.text and "death counts" in caplog.text
    assert all(restarted.record_reads(0, {"not_found": 5}) is None for _ in range(3))
    assert restarted.record_reads(0, {"credentials": 5}) is not None  # the store's own failures still stop it

    monkeypatch.setattr(Context, "was_current_actor_reconstructed", False)
    fresh = health.RunHealth(stop_after_failed_reads=5, first_attempt=True)
    assert not fresh.was_restarted() and fresh.record_reads(0, {"not_found": 5}) is not None
