"""Corpora read where they lie (issue 24), end to end: img2dataset's output on moto S3 through a
brace pattern (one row per sample, addresses a ranged read returns byte-identical, hostile shards
costing their rows only, a second night labelling only the new shard), Hugging Face-layout
Parquet on moto, and a run SIGKILLed mid-shard resuming to exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_support import (
    REPO_ROOT,
    cli_args,
    job_config,
    local_ray,
    manifests,
    read_all_rows,
    segmenter_config,
    shard_files,
)
from s3_server import DUMMY_SECRET
from shard_builders import hostile_shards, parquet_images, write_img2dataset_shard

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_with_s3_credentials(s3_server):
    """A 2-CPU local Ray started after ``s3_server`` set the dummy credentials."""
    with local_ray() as ray:
        yield ray


def _rows(fs, prefix: str, run_id: str) -> list[dict]:
    paths = sorted(fs.glob(f"{prefix}/runs/{run_id}/part-*.parquet"))
    return pa.concat_tables([pq.read_table(p, filesystem=fs) for p in paths]).to_pylist()


def test_img2dataset_shards_on_s3_by_brace_pattern_then_a_second_night(
    ray_with_s3_credentials, s3_server, s3_bucket, coco_images, tiny_clip_config, tmp_path
):
    from clipdiy.pipeline.control.run import run_labelling

    folder = tmp_path / "i2d"
    folder.mkdir()
    # The smallest photos are the samples, the largest one is above --max-image-bytes.
    by_size = sorted((p.read_bytes() for p in coco_images), key=len)
    images, small, large = by_size[:6], by_size[6], by_size[-1]
    keys = write_img2dataset_shard(folder, 0, images[:3]) + write_img2dataset_shard(folder, 1, images[3:5])
    by_key = dict(zip(keys, images[:5]))
    hostile = hostile_shards(tmp_path, small, large)
    for number, name in enumerate(["truncated.tar", "notatar.tar", "mixed.tar"], start=2):
        (folder / f"{number:05d}.tar").write_bytes((tmp_path / name).read_bytes())
    s3_server.upload_folder(folder, s3_bucket, "shards")

    segmenter = segmenter_config(tiny_clip_config)
    config = job_config(f"s3://{s3_bucket}/shards/{{00000..00009}}.tar", f"s3://{s3_bucket}/labels", segmenter,
                        storage=s3_server.options, rows_per_file=4, max_image_bytes=(len(small) + len(large)) // 2)
    summary = run_labelling(config)
    fs = s3_server.filesystem()
    rows = _rows(fs, f"{s3_bucket}/labels", summary.run_id)

    # One row per sample: 5 good ones (the failed downloads skipped), and the hostile shards'.
    ids = [r["image_id"] for r in rows]
    assert len(ids) == len(set(ids))
    good = {f"{n:05d}.tar/{k}" for n, ks in ((0, keys[:3]), (1, keys[3:])) for k in ks}
    renamed = {"truncated.tar": "00002.tar", "notatar.tar": "00003.tar", "mixed.tar": "00004.tar"}
    expected_ok = set(good)
    expected_errors = {}
    for name, wanted in hostile.items():
        if name in renamed:
            shard = renamed[name]
            expected_ok |= {f"{shard}/{k}" for k in wanted["ok"]}
            expected_errors |= {i.replace(name, shard, 1): k for i, k in wanted["errors"].items()}
    assert {r["image_id"] for r in rows if r["status"] == "ok"} == expected_ok
    assert {r["image_id"]: r["error_kind"] for r in rows if r["status"] == "error"} == expected_errors

    # Each ok row's address: one ranged read of the shard returns the image byte-identical.
    for row in rows:
        assert row["schema_version"] == "2" and row["source_format"] == "webdataset"
        assert row["uri"] == row["source_uri"] == f"s3://{s3_bucket}/shards/{row['image_id'].split('/')[0]}"
        if row["image_id"] in good:
            data = fs.cat_file(row["source_uri"], start=row["source_offset"], end=row["source_offset"] + row["source_length"])
            assert data == by_key[row["sample_key"]]
            assert row["origin_url"] == f"https://images.example.com/{row['sample_key']}.jpg?w=1"
    for path in fs.find(f"{s3_bucket}/labels"):
        blob = fs.cat_file(path)
        assert b"s3cret" not in blob and b"user:secret" not in blob and DUMMY_SECRET.encode() not in blob

    # The feed fetches each labelled image back by its row's address (clipdiy.image_address).
    import io

    import numpy as np
    from PIL import Image

    from clipdiy.image_address import fetch_image_bytes
    from clipdiy.labels.feed import LabelDataset

    feed = LabelDataset(f"s3://{s3_bucket}/labels", storage=s3_server.options)
    fed = {feed.records[i]["image_id"]: i for i in range(len(feed))}
    assert good <= set(fed)
    for row in rows:
        if row["image_id"] in good:
            assert fetch_image_bytes(row, s3_server.options) == by_key[row["sample_key"]]
            image, _ = feed[fed[row["image_id"]]]
            assert np.array_equal(image, np.asarray(Image.open(io.BytesIO(by_key[row["sample_key"]])).convert("RGB")))

    # Night 2: one new shard; only its samples are labelled, the other shards are skipped whole.
    night2 = tmp_path / "night2"
    night2.mkdir()
    new_keys = write_img2dataset_shard(night2, 5, images[5:6])
    s3_server.upload_folder(night2, s3_bucket, "shards")  # the shards already there stay as they were
    second = run_labelling(config)
    assert (second.seen, second.skipped) == (1, 5)
    assert [r["image_id"] for r in _rows(fs, f"{s3_bucket}/labels", second.run_id)] == [f"00005.tar/{new_keys[0]}"]


def test_hugging_face_parquet_on_s3(ray_with_s3_credentials, s3_server, s3_bucket, coco_images, tiny_clip_config,
                                    tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    folder = tmp_path / "hf" / "data"
    folder.mkdir(parents=True)
    from clipdiy.image_address import fetch_image_bytes

    images = [p.read_bytes() for p in coco_images[:4]]
    parquet_images(folder / "train-00000.parquet", [images[0], None, images[1]], struct=True, row_group_size=2)
    parquet_images(folder / "train-00001.parquet", images[2:4], struct=False, ids=["cat", "dog"], row_group_size=1)
    s3_server.upload_folder(tmp_path / "hf", s3_bucket, "hf")

    config = job_config(f"s3://{s3_bucket}/hf/data/", f"s3://{s3_bucket}/hf-labels", segmenter_config(tiny_clip_config),
                        storage=s3_server.options, id_column=None)
    summary = run_labelling(config)
    fs = s3_server.filesystem()
    rows = {r["image_id"]: r for r in _rows(fs, f"{s3_bucket}/hf-labels", summary.run_id)}
    assert set(rows) == {"train-00000.parquet/0", "train-00000.parquet/1", "train-00000.parquet/2",
                         "train-00001.parquet/0", "train-00001.parquet/1"}
    assert rows["train-00000.parquet/1"]["error_kind"] == "empty"
    address = {i: (r["source_row_group"], r["source_row"]) for i, r in rows.items()}
    assert address == {"train-00000.parquet/0": (0, 0), "train-00000.parquet/1": (0, 1), "train-00000.parquet/2": (1, 0),
                       "train-00001.parquet/0": (0, 0), "train-00001.parquet/1": (1, 0)}
    # The address reads the image back: the row group's row of the file.
    for image_id, data in (("train-00000.parquet/2", images[1]), ("train-00001.parquet/1", images[3])):
        row = rows[image_id]
        with fs.open(row["source_uri"], "rb") as handle:
            group = pq.ParquetFile(handle).read_row_group(row["source_row_group"], columns=["image"])
        cell = group.column("image")[row["source_row"]].as_py()
        assert (cell["bytes"] if isinstance(cell, dict) else cell) == data
        assert row["status"] == "ok" and row["source_format"] == "parquet"
        assert fetch_image_bytes(row, s3_server.options) == data  # what the readers of labels do


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as handle:
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)


def test_a_run_killed_mid_shard_resumes_to_exactly_once(ray_with_s3_credentials, coco_images, tiny_clip_config,
                                                        tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    folder = tmp_path / "shards"
    folder.mkdir()
    keys = write_img2dataset_shard(folder, 0, [p.read_bytes() for p in coco_images] * 2, failed=0)
    output = tmp_path / "labels"
    args = cli_args(f"{folder}/{{00000..00001}}.tar", output, tiny_clip_config, "--batch-size", "1",
                    "--decode-batch-size", "1", "--rows-per-file", "2")
    log = tmp_path / "first.log"
    first = _spawn(args, log)
    try:
        deadline = time.monotonic() + 300
        while not shard_files(output):
            assert first.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    # The embedded Ray's workers fate-share with the killed driver, a moment later: wait until
    # no more rows appear before counting what the killed run left.
    partial, settled = -1, time.monotonic()
    while time.monotonic() - settled < 5:
        count = len(read_all_rows(output))
        if count != partial:
            partial, settled = count, time.monotonic()
        time.sleep(0.5)
    assert not manifests(output)
    if partial == len(keys):
        # Ray's workers outlived the killed driver long enough to finish every sample (seen under
        # heavy load): the kill did not land mid-shard, so this run cannot test the resume. Said
        # loudly in the report rather than passed silently.
        pytest.skip(f"the kill landed after all {partial} rows were written: nothing to resume")
    assert 0 < partial < len(keys), f"not killed mid-shard ({partial} rows of {len(keys)})"

    summary = run_labelling(job_config(f"{folder}/{{00000..00001}}.tar", output, segmenter_config(tiny_clip_config)))
    assert summary.resumed and summary.seen == len(keys) - partial
    rows = read_all_rows(output).to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(f"00000.tar/{k}" for k in keys)
    assert {r["run_id"] for r in rows} == {summary.run_id}
