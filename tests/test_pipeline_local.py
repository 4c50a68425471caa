"""The labelling job end to end on the shared COCO sample through a local Ray.

One row per image in exactly the schema of ``schemas/``, masks that decode (pycocotools) to the
very label maps ``Segmenter.segment`` gives for the same images, and a consistent manifest.
"""

from __future__ import annotations

import io
import json

import pytest
from PIL import Image
from pipeline_support import (
    check_rows_match_library,
    job_config,
    local_ray,
    manifests,
    read_all_rows,
    reference_label_maps,
    segmenter_config,
    shard_files,
)

from clipdiy.schema import MANIFEST_SCHEMA_FILE, label_schema, schema_document

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_local():
    with local_ray() as ray:
        yield ray


def test_coco_sample_end_to_end(ray_local, coco_images, tiny_clip_config, tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    images_dir = coco_images[0].parent
    output = tmp_path / "labels"
    config = segmenter_config(tiny_clip_config, vocabulary="coco")
    summary = run_labelling(job_config(images_dir, output, config))

    n = len(coco_images)
    assert (summary.listed, summary.seen, summary.ok, summary.error, summary.skipped) == (n, n, n, 0, 0)

    # Exactly the schema of schemas/label_row.v2.json, shards bounded by rows_per_file.
    files = shard_files(output)
    assert len(files) >= n // 10
    import pyarrow.parquet as pq

    for file in files:
        shard = pq.read_table(file)
        assert shard.schema.equals(label_schema(), check_metadata=False)
        assert shard.schema.metadata[b"clipdiy.schema_version"] == b"2"
        assert 1 <= shard.num_rows <= 10
    table = read_all_rows(output)
    rows = table.to_pylist()
    assert sorted(r["image_id"] for r in rows) == sorted(p.name for p in coco_images)
    assert all(r["status"] == "ok" and r["error"] is None and r["error_kind"] is None for r in rows)

    reference, segmenter = reference_label_maps(config, coco_images)
    check_rows_match_library(rows, reference, segmenter)
    # Several classes win somewhere, so the comparison means something.
    assert len({m["class_id"] for r in rows for m in r["masks"]}) >= 3

    provenance = segmenter.provenance
    for row in rows:
        assert row["run_id"] == summary.run_id
        assert row["uri"] == f"file://{images_dir}/{row['image_id']}"
        assert row["source_size"] == (images_dir / row["image_id"]).stat().st_size
        assert row["source_mtime"] is not None
        assert (row["clip_model"], row["clip_weights"], row["saliency_backend"], row["mode"]) == (
            provenance.clip_model, provenance.clip_weights, "none", "faithful"
        )
        assert (row["vocabulary_name"], row["vocabulary_hash"]) == (provenance.vocabulary_name, provenance.vocabulary_hash)
        assert len(row["class_scores"]) == len(segmenter.class_names)
        preview = Image.open(io.BytesIO(row["saliency_png"]))
        assert preview.format == "PNG" and preview.mode == "L"
        assert max(preview.size) == 64
        assert abs(preview.size[0] / preview.size[1] - row["width"] / row["height"]) < 0.1

    # The manifest: written, per its schema, consistent with the shards.
    manifest = manifests(output)[summary.run_id]
    expected_keys = {f["name"] for f in schema_document(MANIFEST_SCHEMA_FILE)["fields"]}
    assert set(manifest) == expected_keys
    assert manifest["status"] == "finished"
    assert manifest["counts"]["listed"] == n and manifest["counts"]["seen"] == n
    assert manifest["counts"]["ok"] == n and manifest["counts"]["error"] == 0
    assert sorted(s["path"] for s in manifest["shards"]) == sorted(str(f.relative_to(output)) for f in files)
    assert sum(s["rows"] for s in manifest["shards"]) == n
    assert manifest["vocabulary"]["class_names"] == list(segmenter.class_names)
    assert manifest["vocabulary"]["hash"] == provenance.vocabulary_hash
    assert not (output / "_LOCK.json").exists()
    json.dumps(manifest)

    # A second run over the same input finds nothing new: every image skipped, nothing written.
    again = run_labelling(job_config(images_dir, output, config))
    assert (again.listed, again.skipped, again.seen) == (n, n, 0)
    assert again.run_id != summary.run_id
    assert len(read_all_rows(output)) == n


@pytest.mark.parametrize("max_side", [None, 320])
def test_found_saliency_on_random_vit_s8(ray_local, coco_images, tiny_clip_config, found_saliency_config, tmp_path,
                                         max_side):
    """The FOUND path (random-init ViT-S/8 + the real FOUND head) through the job, on 3 images, at
    full resolution and with the photos shrunk to 320 px for saliency."""
    import dataclasses

    from clipdiy.pipeline.control.run import run_labelling

    images_dir = coco_images[0].parent
    output = tmp_path / "labels"
    saliency = dataclasses.replace(found_saliency_config, max_side=max_side)
    config = segmenter_config(tiny_clip_config, saliency=saliency)
    summary = run_labelling(job_config(images_dir, output, config, limit=3, inference_batch_size=2))
    assert (summary.listed, summary.seen, summary.ok) == (3, 3, 3)
    manifest = manifests(output)[summary.run_id]
    assert manifest["options"]["segmenter"]["saliency"]["max_side"] == max_side

    rows = read_all_rows(output).to_pylist()
    assert all(r["saliency_backend"] == "found" and r["saliency_weights"] for r in rows)
    assert all(0.0 <= r["foreground_fraction"] <= 1.0 for r in rows)
    listed_first = sorted(coco_images)[:3]
    assert sorted(r["image_id"] for r in rows) == [p.name for p in listed_first]
    reference, segmenter = reference_label_maps(config, listed_first)
    check_rows_match_library(rows, reference, segmenter)
