"""Network faults and a storm of missing objects through the real job (issue 26, section 2 and
finding 11), on a local Ray shared by the module.

Night 1 reads a manifest whose URLs stall, trickle, reset, answer 503 then recover, ignore Range
with a body over --max-image-bytes, or do not exist: it ends by itself with one row per entry,
each fault bounded by --read-deadline-s, and no credential anywhere. Night 2 reads again what a
later run may cure, but not what timed out in --timed-out-nights runs already.
A manifest of 3 photos and 300 missing objects stops with exit 1, and not one row says
``not_found``.
"""

from __future__ import annotations

import shutil
import time

import pytest
from http_faults import FaultServer
from pipeline_support import (
    cli_args,
    label_main,
    local_ray,
    read_all_rows,
    shard_files,
)

pytestmark = pytest.mark.slow

SIG = "sigSECRETh4k2"
PASSWORD = "pwSECRETm8d1"


@pytest.fixture(scope="module")
def ray_local():
    with local_ray() as ray:
        yield ray


def test_network_faults_cost_one_bounded_row_each_and_timeouts_are_retried_a_bounded_number_of_times(
    ray_local, coco_images, tiny_clip_config, tmp_path, capfd
):
    folder = tmp_path / "served"
    folder.mkdir()
    for name, photo in zip(("a.jpg", "b.jpg", "c.jpg", "d.jpg"), coco_images, strict=False):
        shutil.copy(photo, folder / name)
    with FaultServer(folder, lifetime_s=500, trickle_every_s=0.5, huge_bytes=32 * 1024**2) as server:
        host = server.base.removeprefix("http://")
        entries = {
            "ok/a.jpg": f"{server.base}/ok/a.jpg?X-Amz-Signature={SIG}&X-Amz-Credential=AKIA%2F{SIG}",
            "ok/b.jpg": f"http://user:{PASSWORD}@{host}/ok/b.jpg",
            "stall/a.jpg": f"{server.base}/stall/a.jpg?X-Amz-Signature={SIG}",
            "trickle/a.jpg": f"{server.base}/trickle/a.jpg?token={SIG}",
            "reset-1/c.jpg": f"{server.base}/reset-1/c.jpg",
            "busy-2/d.jpg": f"{server.base}/busy-2/d.jpg?sig={SIG}&sv=1",
            "huge": f"{server.base}/huge?X-Amz-Signature={SIG}",
            "ok/missing.jpg": f"{server.base}/ok/missing.jpg?X-Amz-Signature={SIG}",
        }
        manifest = tmp_path / "inputs.txt"
        manifest.write_text("\n".join(entries.values()) + "\n")
        output = tmp_path / "labels"
        args = cli_args(manifest, output, tiny_clip_config, "--read-deadline-s", "2", "--max-image-bytes", "1000000",
                        "--timed-out-nights", "1", "--batch-size", "2", "--decode-batch-size", "4")[2:]

        started = time.monotonic()
        assert label_main(args) == 0
        night_1 = time.monotonic() - started
        rows = {row["image_id"].removeprefix(server.base + "/"): row for row in read_all_rows(output).to_pylist()}
        assert sorted(rows) == sorted(entries), "one row per entry"
        kinds = {name: row["error_kind"] for name, row in rows.items()}
        assert kinds == {"ok/a.jpg": None, "ok/b.jpg": None, "stall/a.jpg": "timed_out", "trickle/a.jpg": "timed_out",
                         "reset-1/c.jpg": None, "busy-2/d.jpg": None, "huge": "too_large",
                         # 4 reads found their object, 1 did not: a missing object is an answer
                         "ok/missing.jpg": "not_found"}, {n: r["error"] for n, r in rows.items()}
        assert "not taken as an answer" not in rows["ok/missing.jpg"]["error"]
        assert server.requests["/stall/a.jpg"] == 1 and server.requests["/trickle/a.jpg"] == 1
        assert server.sent["/huge"] < 16 * 1024**2

        # Night 2: the timed-out ones have had their night; a missing object is an answer: none is read again.
        requests_after_night_1 = dict(server.requests)
        assert label_main(args) == 0
        assert server.requests == requests_after_night_1

    from test_redaction import every_written_text

    shown = capfd.readouterr()
    written = every_written_text(output)
    for secret in (SIG, PASSWORD):
        assert secret not in written and secret not in shown.out + shown.err
    print(f"night 1 took {night_1:.0f} s")


def test_a_manifest_of_mostly_missing_objects_stops_the_run_and_marks_nothing_deleted(
    ray_local, coco_images, tiny_clip_config, tmp_path, capfd
):
    folder = tmp_path / "photos"
    folder.mkdir()
    for photo in coco_images[:3]:
        shutil.copy(photo, folder / photo.name)
    manifest = folder / "inputs.txt"
    manifest.write_text("".join(f"{p.name}\n" for p in coco_images[:3]) + "".join(f"gone/{i}.jpg\n" for i in range(300)))
    output = tmp_path / "labels"
    args = cli_args(manifest, output, tiny_clip_config, "--batch-size", "2", "--decode-batch-size", "4",
                    "--rows-per-file", "4")[2:]
    assert label_main(args) == 1
    assert "most reads find nothing" in capfd.readouterr().err.strip().splitlines()[-1]
    rows = read_all_rows(output).to_pylist() if shard_files(output) else []
    assert not [row for row in rows if row["error_kind"] == "not_found"]
    missing = [row for row in rows if row["image_id"].startswith("gone/")]
    assert all(row["error_kind"] == "unreadable" and "not taken as an answer" in row["error"] for row in missing)
    print(f"{len(rows)} rows written before the stop, {len(missing)} of missing objects")
