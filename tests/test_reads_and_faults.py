"""Reads under injected network faults, and the read-side findings of issue 26 (2, 4, 5, 7).

A loopback server (``http_faults.FaultServer``) stalls, trickles, resets, throttles and ignores
Range; the read of one object is bounded in time (``deadline_s``, retries included) and bytes
(``max_bytes``), and its row says what happened without quoting the signed location.
"""

from __future__ import annotations

import shutil
import time

import pyarrow as pa
import pytest
from http_faults import FaultServer

from clipdiy.storage import (
    ObjectTooLargeError,
    ReadTimedOutError,
    open_filesystem,
    read_bytes,
)

SIG = "sigSECRETz0q9"


@pytest.fixture
def fault_server(tmp_path, coco_images):
    folder = tmp_path / "served"
    folder.mkdir()
    shutil.copy(coco_images[0], folder / "a.jpg")
    with FaultServer(folder, lifetime_s=120, trickle_every_s=0.3, huge_bytes=48 * 1024**2) as server:
        yield server, (folder / "a.jpg").read_bytes()


def _read(url: str, **kw) -> bytes:
    fs, path = open_filesystem(url)
    kw.setdefault("backoff", 0.05)
    return read_bytes(fs, path, **kw)


@pytest.mark.parametrize("kind", ["stall", "trickle"])
def test_a_stalled_or_trickling_server_costs_one_bounded_read(fault_server, kind):
    server, _ = fault_server
    started = time.monotonic()
    with pytest.raises(ReadTimedOutError, match="longer than 2 s"):
        _read(f"{server.base}/{kind}/a.jpg", deadline_s=2.0, attempts=4)
    assert time.monotonic() - started < 4.0


@pytest.mark.parametrize("kind", ["reset-2", "busy-2"])
def test_resets_and_throttling_are_retried_until_the_server_recovers(fault_server, kind):
    server, photo = fault_server
    assert _read(f"{server.base}/{kind}/a.jpg", deadline_s=20.0, attempts=4, max_bytes=10**7) == photo
    assert server.requests[f"/{kind}/a.jpg"] == 3


def test_max_bytes_holds_when_the_server_ignores_range(fault_server):
    """Finding 4: a server that ignores Range sends the whole body; the read stops after
    max_bytes + 1 bytes (fsspec's own read took all 48 MB first)."""
    server, _ = fault_server
    with pytest.raises(ObjectTooLargeError):
        _read(f"{server.base}/huge", deadline_s=20.0, max_bytes=1024**2)
    assert server.ranges[-1] == f"bytes=0-{1024**2}"
    time.sleep(0.5)
    # What the server could push before the client hung up: the socket buffers, not 48 MB.
    assert server.sent["/huge"] < 16 * 1024**2, server.sent


def _decode_rows(rows: list[dict], storage=None, **kw) -> list[dict]:
    from clipdiy.pipeline.stages.decode import DecodeBatch

    batch = pa.table({
        "image_id": [r["image_id"] for r in rows], "uri": [r["uri"] for r in rows],
        "source_size": pa.array([r.get("size") for r in rows], pa.int64()),
        "signed_uri": pa.array([r.get("signed_uri") for r in rows], pa.string()),
    })
    decode = DecodeBatch(storage, "faithful", 10**8, 3, saliency_max_side=64, **kw)
    return decode(batch).drop_columns(["payload"]).to_pylist()


def test_each_fault_costs_its_object_one_row_that_says_so_and_names_no_credential(fault_server):
    """Through the decode stage: a stall and a trickle become timed_out rows within the
    deadline, a throttled and a reset object are read, a body over --max-image-bytes is
    too_large, a missing object not_found; no error text holds the signature or the signed URL
    in any encoding (finding 7: the message is built from the error's type and status)."""
    server, _ = fault_server
    signed = f"?X-Amz-Signature={SIG}&X-Amz-Credential=A%2Fb%20c%c3%a9"
    names = ["stall/a.jpg", "trickle/a.jpg", "busy-1/a.jpg", "reset-1/a.jpg", "huge", "ok/missing.jpg", "ok/a.jpg"]
    rows = [{"image_id": n, "uri": f"{server.base}/{n}", "signed_uri": f"{server.base}/{n}{signed}"} for n in names]
    started = time.monotonic()
    out = {row["image_id"]: row for row in _decode_rows(rows, max_image_bytes=1024**2, read_deadline_s=1.5)}
    assert time.monotonic() - started < 12
    kinds = {name: out[name]["error_kind"] for name in names}
    assert kinds == {"stall/a.jpg": "timed_out", "trickle/a.jpg": "timed_out", "busy-1/a.jpg": None,
                     "reset-1/a.jpg": None, "huge": "too_large", "ok/missing.jpg": "not_found", "ok/a.jpg": None}
    for row in out.values():
        assert SIG not in str(row) and "X-Amz" not in str(row) and "127.0.0.1" not in (row["error"] or "")
        assert "signed_uri" not in row
    assert "HTTP 404" in out["ok/missing.jpg"]["error"]


def test_an_empty_object_is_empty_from_its_listed_size_without_a_read(tmp_path):
    """Finding 2: a listed size of 0 is an ``empty`` row before any read (S3 answers a range
    of an empty object with 416, which became ``unreadable`` and was retried every night)."""
    rows = [{"image_id": "e.jpg", "uri": f"s3://no-such-bucket-{SIG}/e.jpg", "size": 0}]
    (row,) = _decode_rows(rows, max_image_bytes=1024)
    assert (row["status"], row["error_kind"]) == ("error", "empty")


def test_an_empty_s3_object_of_unknown_size_reads_as_empty(s3_server, s3_bucket):
    """Finding 2 where the listing has no size (a manifest without one): the 416 of the ranged
    read is an empty object."""
    s3_server.put_bytes(s3_bucket, "empty.jpg", b"")
    fs, path = open_filesystem(f"s3://{s3_bucket}/empty.jpg", s3_server.options)
    assert read_bytes(fs, path, max_bytes=1024, deadline_s=10) == b""
    (row,) = _decode_rows([{"image_id": "empty.jpg", "uri": f"s3://{s3_bucket}/empty.jpg"}], s3_server.options,
                          max_image_bytes=1024, read_deadline_s=10)
    assert row["error_kind"] == "empty"
