"""The labelling job with input AND output on S3: a real moto S3 server on 127.0.0.1, reached
through s3fs with an endpoint URL, by the driver and by the Ray workers alike.

One row per input object (a text file named .jpg gives an error row), masks that decode to the
library's label maps, the manifest written last, and the dummy credentials nowhere in OUTPUT.
"""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_support import (
    check_rows_match_library,
    job_config,
    local_ray,
    reference_label_maps,
    segmenter_config,
)
from s3_server import DUMMY_KEY_ID, DUMMY_SECRET

from clipdiy.schema import label_schema

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_with_s3_credentials(s3_server):
    """A 2-CPU local Ray started after ``s3_server`` set the dummy credentials in the
    environment, so its workers inherit them (as workers on a cluster get an instance role)."""
    with local_ray() as ray:
        yield ray


def test_s3_input_and_output_end_to_end(ray_with_s3_credentials, s3_server, s3_bucket, coco_images,
                                        tiny_clip_config, tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    photos = coco_images[:3]
    corpus = tmp_path / "corpus"
    (corpus / "nested").mkdir(parents=True)
    for path in photos[:2]:
        shutil.copy(path, corpus / path.name)
    shutil.copy(photos[2], corpus / "nested" / photos[2].name)
    (corpus / "nested" / "text.jpg").write_text("not an image")
    (corpus / "readme.md").write_text("not listed: not an image extension")
    s3_server.upload_folder(corpus, s3_bucket, "photos")

    segmenter = segmenter_config(tiny_clip_config)
    config = job_config(f"s3://{s3_bucket}/photos/", f"s3://{s3_bucket}/labels", segmenter,
                        storage=s3_server.options, rows_per_file=2)
    summary = run_labelling(config)
    assert (summary.listed, summary.seen, summary.ok, summary.error) == (4, 4, 3, 1)

    fs = s3_server.filesystem()
    run_dir = f"{s3_bucket}/labels/runs/{summary.run_id}"
    shards = sorted(fs.glob(f"{run_dir}/part-*.parquet"))
    assert len(shards) >= 2  # rows_per_file=2 bounds every shard
    tables = []
    for shard in shards:
        with fs.open(shard, "rb") as handle:
            table = pq.read_table(handle)
        assert table.schema.equals(label_schema(), check_metadata=False)
        assert 1 <= table.num_rows <= 2
        tables.append(table)
    rows = pa.concat_tables(tables).to_pylist()

    expected_ids = sorted([p.name for p in photos[:2]] + [f"nested/{photos[2].name}", "nested/text.jpg"])
    assert sorted(r["image_id"] for r in rows) == expected_ids
    by_id = {r["image_id"]: r for r in rows}
    for image_id, row in by_id.items():
        assert row["uri"] == f"s3://{s3_bucket}/photos/{image_id}"
        assert row["source_etag"] and row["source_size"] > 0 and row["source_mtime"] is not None
    bad = by_id.pop("nested/text.jpg")
    assert bad["status"] == "error" and bad["error_kind"] in {"not_image", "corrupt"} and bad["masks"] is None
    assert all(r["status"] == "ok" for r in by_id.values())

    reference, library = reference_label_maps(segmenter, photos)
    reference[f"nested/{photos[2].name}"] = reference.pop(photos[2].name)
    check_rows_match_library(list(by_id.values()), reference, library)

    # The manifest is there (written last) and agrees with the shards.
    manifest = json.loads(fs.cat_file(f"{run_dir}/_MANIFEST.json"))
    assert manifest["counts"]["seen"] == 4 and manifest["counts"]["ok"] == 3
    assert sorted(s["path"].rsplit("/", 1)[-1] for s in manifest["shards"]) == sorted(
        s.rsplit("/", 1)[-1] for s in shards)
    assert summary.manifest_path.endswith("_MANIFEST.json")

    # The credentials the job ran with appear nowhere in what it wrote.
    for path in fs.find(f"{s3_bucket}/labels"):
        data = fs.cat_file(path)
        assert DUMMY_SECRET.encode() not in data and DUMMY_KEY_ID.encode() not in data, path

    # A second run over the same bucket labels nothing new (incremental, on S3 too).
    again = run_labelling(config)
    assert (again.listed, again.seen, again.skipped) == (4, 0, 4)


#: How long the test's S3 server holds back the read of the last image (the job's reads wait longer).
HOLD_S = 90


def test_a_shard_is_written_while_the_input_is_still_being_read(ray_with_s3_credentials, s3_server, s3_bucket,
                                                                tiny_clip_config, tmp_path, monkeypatch):
    """On this 2-CPU Ray the decode tasks and the inference actor take every CPU. The server holds
    the read of the listing's last image until a shard of the run is in OUTPUT: a writer that
    waits for the whole input to be decoded (what a 1-CPU writer did: a first run's first shard
    came only after the last image was decoded) never sees the hold released by a shard."""
    import dataclasses
    import time

    import numpy as np
    from moto.s3.responses import S3Response
    from PIL import Image

    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    count = 48  # three listing blocks of 16 (decode batches of 2): the held image is in the last
    for index in range(count):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(corpus / f"img-{index:03d}.jpg")
    keys = s3_server.upload_folder(corpus, s3_bucket, "photos")
    held_key = keys[-1]
    released: list[str] = []
    answer = S3Response._key_response_get

    def hold_last_image(self, query, key_name):
        if self.bucket_name == s3_bucket and key_name == held_key and not released:
            fs = s3_server.filesystem()
            deadline = time.monotonic() + HOLD_S
            while not released:
                if fs.glob(f"{s3_bucket}/labels/runs/*/part-*.parquet"):
                    released.append("by a shard")
                elif time.monotonic() > deadline:
                    released.append("by the time limit")
                else:
                    time.sleep(0.2)
        return answer(self, query, key_name)

    monkeypatch.setattr(S3Response, "_key_response_get", hold_last_image)
    storage = dataclasses.replace(s3_server.options, read_timeout=HOLD_S + 60)
    config = job_config(f"s3://{s3_bucket}/photos/", f"s3://{s3_bucket}/labels", segmenter_config(tiny_clip_config),
                        storage=storage, decode_batch_size=2, inference_batch_size=8, rows_per_file=8)
    config = dataclasses.replace(config, segmenter=dataclasses.replace(config.segmenter, method="naclip",
                                                                       refine="none"))
    summary = run_labelling(config)

    assert (summary.seen, summary.ok) == (count, count)
    assert released == ["by a shard"], f"the last image's read was released {released}: no shard before it"


def test_a_deleted_object_is_an_answer_read_again_only_as_a_new_version(ray_with_s3_credentials, s3_server,
                                                                         s3_bucket, coco_images, tiny_clip_config):
    """Issue 18 item 4 on S3: a Parquet manifest (an inventory: uri, size, etag) that lists a
    deleted object and one that never existed: not_found rows; the next run reads neither again;
    the deleted object uploaded anew (another size and ETag in the inventory) is labelled."""
    from clipdiy.pipeline.control.run import run_labelling

    fs = s3_server.filesystem()
    names = ["a.jpg", "b.jpg", "c.jpg"]
    for name, photo in zip(names, coco_images, strict=False):
        s3_server.put_bytes(s3_bucket, f"photos/{name}", photo.read_bytes())

    def inventory_entry(name: str) -> dict:
        info = fs.info(f"{s3_bucket}/photos/{name}")
        return {"uri": f"s3://{s3_bucket}/photos/{name}", "size": info["size"], "etag": info["ETag"].strip('"')}

    def write_inventory(entries: list[dict]) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(entries), sink)
        s3_server.put_bytes(s3_bucket, "inventory.parquet", sink.getvalue().to_pybytes())

    entries = [inventory_entry(name) for name in names]
    entries.append({"uri": f"s3://{s3_bucket}/photos/never.jpg", "size": 10, "etag": "0" * 32})
    fs.rm(f"{s3_bucket}/photos/b.jpg")  # deleted after the inventory was taken
    write_inventory(entries)
    config = job_config(f"s3://{s3_bucket}/inventory.parquet", f"s3://{s3_bucket}/labels",
                        segmenter_config(tiny_clip_config), storage=s3_server.options)

    def rows_of(run_id: str) -> dict[str, dict]:
        tables = []
        for shard in fs.glob(f"{s3_bucket}/labels/runs/{run_id}/part-*.parquet"):
            with fs.open(shard, "rb") as handle:
                tables.append(pq.read_table(handle))
        return {row["image_id"]: row for row in pa.concat_tables(tables).to_pylist()}

    first = run_labelling(config)
    kinds = {image_id: row["error_kind"] for image_id, row in rows_of(first.run_id).items()}
    assert kinds == {"photos/a.jpg": None, "photos/b.jpg": "not_found", "photos/c.jpg": None,
                     "photos/never.jpg": "not_found"}

    second = run_labelling(config)  # nothing new: the missing objects are not read again
    assert (second.listed, second.skipped, second.seen) == (4, 4, 0)

    s3_server.put_bytes(s3_bucket, "photos/b.jpg", coco_images[3].read_bytes())  # b.jpg is back, another photo
    entries[1] = inventory_entry("b.jpg")
    write_inventory(entries)
    third = run_labelling(config)
    assert (third.listed, third.skipped, third.seen, third.ok) == (4, 3, 1, 1)
    (row,) = rows_of(third.run_id).values()
    assert (row["image_id"], row["status"], row["source_size"]) == ("photos/b.jpg", "ok", len(coco_images[3].read_bytes()))
