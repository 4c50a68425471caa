"""Telling a failure about one image from a failure of the run, without Ray: read-failure
classes from a real S3 endpoint, the run-wide read streak, the error budget, and what an
inference actor does when a CUDA error poisons its device."""

from __future__ import annotations

import socket

import pyarrow as pa
import pytest

from clipdiy.pipeline.stages.decode import decode_image, decoded_columns
from clipdiy.pipeline.stages.health import ErrorBudget, RunHealth, classify_read_failure
from clipdiy.pipeline.stages.inference import (
    SegmentBatch,
    is_out_of_memory,
    is_poisoning_error,
)
from clipdiy.storage import StorageOptions, read_uri


def _error_of(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the error is what the test looks at
        return error
    pytest.fail("expected the read to fail")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_read_failures_are_classified_from_real_store_errors(s3_server, s3_bucket, tmp_path):
    options = s3_server.options
    assert classify_read_failure(_error_of(lambda: read_uri(f"s3://{s3_bucket}/missing.jpg", options))) == "not_found"
    assert classify_read_failure(_error_of(lambda: read_uri("s3://no-such-bucket-clipdiy/a.jpg", options))) == "no_bucket"
    down = StorageOptions(endpoint_url=f"http://127.0.0.1:{_free_port()}", connect_timeout=1, max_attempts=1)
    error = _error_of(lambda: read_uri(f"s3://{s3_bucket}/a.jpg", down, attempts=1))
    assert classify_read_failure(error) == "unreachable"
    assert classify_read_failure(_error_of(lambda: read_uri(str(tmp_path / "nope.jpg")))) == "not_found"
    denied = tmp_path / "denied.jpg"
    denied.write_bytes(b"x")
    assert classify_read_failure(PermissionError(13, "Permission denied", str(denied))) == "access_denied"

    class ClientError(Exception):  # botocore's shape: the S3 error code in .response
        def __init__(self):
            super().__init__("An error occurred (InvalidAccessKeyId) when calling the GetObject operation")
            self.response = {"Error": {"Code": "InvalidAccessKeyId"}}

    wrapped = PermissionError("The AWS Access Key Id you provided does not exist in our records.")
    wrapped.__cause__ = ClientError()
    assert classify_read_failure(wrapped) == "credentials"


def test_reads_are_broken_after_n_failures_in_a_row_cluster_wide():
    health = RunHealth(stop_after_failed_reads=10)
    assert health.record_reads(0, {"access_denied": 4}, "s3://b/x.jpg: PermissionError") is None
    assert health.record_reads(3, {"access_denied": 1}) is None  # the store answers: the streak restarts
    assert health.record_reads(0, {"access_denied": 6}) is None
    assert health.record_reads(0, {"other": 3}) is None  # 9 in a row
    verdict = health.record_reads(0, {"access_denied": 2}, "s3://b/y.jpg: PermissionError: y")
    assert verdict is not None and health.verdict() == verdict
    assert "last 11 objects in a row" in verdict and "8 access_denied, 3 other" in verdict
    assert "access is denied" in verdict and "after 3 good reads" in verdict and "s3://b/y.jpg" in verdict
    assert "\n" not in verdict
    assert health.record_reads(100, {}) == verdict  # once broken, stays broken

    fresh = RunHealth(stop_after_failed_reads=3)
    assert fresh.record_reads(0, {"credentials": 3}, "s3://b/a.jpg: PermissionError: bad key") is not None
    assert "no read has succeeded" in fresh.verdict() and "credentials" in fresh.verdict()

    # A corpus smaller than the streak whose reads all fail: the end of the stream decides.
    small = RunHealth(stop_after_failed_reads=200)
    assert small.record_reads(0, {"no_bucket": 3}, "s3://gone/a.jpg: FileNotFoundError") is None
    assert "last 3 objects" in small.finish() and "bucket does not exist" in small.finish()
    healthy = RunHealth(stop_after_failed_reads=200)
    healthy.record_reads(5, {})
    healthy.record_reads(0, {"not_found": 2})
    assert healthy.finish() is None  # a few missing objects among good ones: error rows, exit 0
    deleted = RunHealth(stop_after_failed_reads=200)
    deleted.record_reads(0, {"not_found": 1})
    assert deleted.finish() is None  # a night whose only pending image was deleted: not a failure


def test_missing_objects_stop_only_a_first_attempt_that_has_read_nothing():
    """Issue 18 item 4: a manifest naming nothing that exists stops its first attempt loudly; a
    missing object after one good read, or in a resumed attempt, is an answer (a not_found row)."""
    nothing_exists = RunHealth(stop_after_failed_reads=10, first_attempt=True)
    assert nothing_exists.record_reads(0, {"not_found": 6}, "s3://b/x.jpg: FileNotFoundError") is None
    verdict = nothing_exists.record_reads(0, {"not_found": 4})
    assert verdict is not None and "10 not_found" in verdict and "do not exist" in verdict

    after_a_read = RunHealth(stop_after_failed_reads=10, first_attempt=True)
    assert after_a_read.record_reads(1, {}) is None
    assert all(after_a_read.record_reads(0, {"not_found": 50}) is None for _ in range(4))
    assert after_a_read.finish() is None
    # Other failures still stop it: missing objects neither count nor break their streak.
    assert after_a_read.record_reads(0, {"access_denied": 6}) is None
    assert after_a_read.record_reads(0, {"not_found": 50}) is None
    assert "6 access_denied, 4 other" in after_a_read.record_reads(0, {"other": 4})

    resumed = RunHealth(stop_after_failed_reads=10, first_attempt=False)
    assert all(resumed.record_reads(0, {"not_found": 50}) is None for _ in range(4))
    assert resumed.finish() is None
    assert resumed.record_reads(0, {"credentials": 10}) is not None


def test_a_missing_object_is_not_found_and_other_failed_reads_unreadable(s3_server, s3_bucket, tmp_path):
    """The decode stage's error kind for a failed read, from real store errors: a local file, an
    S3 key and an HTTP URL that do not exist are ``not_found``; a missing bucket, a refused
    connection are ``unreadable``; an entry that is not a URI is ``invalid_uri``, not read."""
    from clipdiy.pipeline.stages.decode import DecodeBatch

    s3_server.put_bytes(s3_bucket, "there.jpg", b"not an image")
    down = f"http://127.0.0.1:{_free_port()}/x.jpg"
    uris = {
        "local": str(tmp_path / "nope.jpg"),
        "s3": f"s3://{s3_bucket}/gone.jpg",
        "http": f"{s3_server.endpoint_url}/{s3_bucket}/gone.jpg",  # moto answers 404
        "bucket": "s3://no-such-bucket-clipdiy/a.jpg",
        "down": down,
        "there": f"s3://{s3_bucket}/there.jpg",
        "bad": "http://[::1/x.jpg?X-Amz-Signature=sigSECRETq81z",
    }
    batch = pa.table({"image_id": list(uris), "uri": list(uris.values())})
    decode = DecodeBatch(s3_server.options, "faithful", 100_000_000, read_attempts=1)
    out = decode(batch).to_pylist()
    kinds = {row["image_id"]: row["error_kind"] for row in out}
    assert kinds == {"local": "not_found", "s3": "not_found", "http": "not_found", "bucket": "unreadable",
                     "down": "unreadable", "there": "not_image", "bad": "invalid_uri"}
    assert all("sigSECRET" not in row["error"] for row in out)


def test_error_budget_judges_the_last_window_of_written_rows():
    budget = ErrorBudget(max_rate=0.5, window=100)
    assert budget.add(60, {"not_image": 50}) is None  # 50 of 60, but fewer rows than the window
    assert budget.add(40, {}) is None  # 50 of 100: not above 0.5
    # The oldest shard (50 errors) leaves the window: 0 + 57 errors in the last 40 + 60 rows.
    reason = budget.add(60, {"model": 55, "corrupt": 2})
    assert reason is not None
    assert "57 of the last 100 images failed" in reason and "mostly model (55" in reason
    assert "--max-error-rate 0.5" in reason and "\n" not in reason
    # Had the window kept the oldest shard, 107 of 160 would be judged instead.
    assert ErrorBudget(max_rate=0.5, window=100).add(60, {"model": 30}) is None

    never = ErrorBudget(max_rate=1.0, window=10)
    assert all(never.add(10, {"unreadable": 10}) is None for _ in range(5))


def _decoded_batch(coco_images, count=4):
    results = [decode_image(p.read_bytes(), mode="faithful", max_pixels=100_000_000) for p in coco_images[:count]]
    return pa.table({"image_id": [f"{i}.jpg" for i in range(count)], **decoded_columns(results)})


class _Exited(Exception):
    pass


def _stage(segmenter):
    stage = SegmentBatch.__new__(SegmentBatch)
    stage.segmenter = segmenter

    def exit_process():
        raise _Exited()

    stage._exit = exit_process
    return stage


def test_a_poisoned_device_restarts_the_actor_and_a_batch_that_poisons_twice_gets_model_rows(coco_images):
    class Poisoned:
        calls = 0

        def predict(self, prepared):
            self.calls += 1
            raise RuntimeError("CUDA error: device-side assert triggered")

    batch = _decoded_batch(coco_images)
    first = _stage(Poisoned())
    with pytest.raises(_Exited):  # no model rows: the process ends, Ray restarts it and retries
        first(batch)
    assert first.segmenter.calls == 1  # not retried image by image on a poisoned device

    # The retried batch poisons the fresh actor as well (the same counts, as the run's actor keeps them).
    second = _stage(Poisoned())
    second._local_poisonings = first._local_poisonings
    out = second(batch).to_pylist()
    assert [(r["status"], r["error_kind"]) for r in out] == [("error", "model")] * 4
    assert "device-side assert" in out[0]["error"]
    with pytest.raises(_Exited):  # and it restarts before touching the device again
        second(batch)


def test_out_of_memory_halves_the_batch_down_to_single_images(coco_images):
    import torch

    class NeedsHalves:
        sizes: list

        def __init__(self, fits: int):
            self.fits, self.sizes = fits, []

        def predict(self, prepared):
            self.sizes.append(len(prepared))
            if len(prepared) > self.fits:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return [{"size": p.original_size} for p in prepared]

    batch = _decoded_batch(coco_images)
    stage = _stage(NeedsHalves(fits=2))
    out = stage(batch).to_pylist()
    assert [r["status"] for r in out] == ["ok"] * 4 and stage.segmenter.sizes == [4, 2, 2]

    # Still out of memory at half the batch: halved again, in the same process (issue 25).
    single = _stage(NeedsHalves(fits=1))
    assert [r["status"] for r in single(batch).to_pylist()] == ["ok"] * 4
    assert single.segmenter.sizes == [4, 2, 1, 1, 2, 1, 1]

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_poisoning_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_poisoning_error(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert not is_poisoning_error(ValueError("expected 3 channels"))
