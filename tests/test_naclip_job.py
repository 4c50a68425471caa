"""``jobs/label.py --method naclip`` end to end on a few sample photos through a local Ray.

Rows record the method and its refinement, their masks decode to the label maps
``Segmenter.segment`` gives for the same photos, and a run started with CLIP-DIY cannot be
resumed with NACLIP (the refusal names the differing fingerprint entry).
"""

from __future__ import annotations

import dataclasses

import pytest
from PIL import Image
from pipeline_support import (
    REPO_ROOT,
    check_rows_match_library,
    cli_args,
    read_all_rows,
    reference_label_maps,
)

from clipdiy.segmentation.config import NaclipConfig, SaliencyConfig, SegmenterConfig

pytestmark = pytest.mark.slow

#: Small photos of odd sizes (NACLIP resizes them to short side 336 for the model anyway).
SIZES = ((161, 121), (121, 161), (161, 121))


@pytest.fixture(scope="module")
def small_photos(coco_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("naclip-photos")
    for path, size in zip(coco_images[:3], SIZES):
        with Image.open(path) as image:
            image.convert("RGB").resize(size, Image.BILINEAR).save(folder / path.name, quality=95)
    return folder


def run_cli(argv: list[str]) -> int:
    import sys

    sys.path.insert(0, str(REPO_ROOT / "jobs"))
    try:
        import label
    finally:
        sys.path.pop(0)
    return label.main(argv)


def test_label_job_with_naclip_records_the_method_and_refuses_a_resume_with_another(
    small_photos, tiny_clip_config, tmp_path, capsys
):
    import ray

    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.planning.manifest import plan_run, write_run_state
    from clipdiy.storage import StorageOptions
    from clipdiy.segmentation.segmenter import Provenance

    output = tmp_path / "labels"
    argv = cli_args(small_photos, output, tiny_clip_config, "--method", "naclip", "--batch-size", "1")[2:]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run_cli(argv) == 0
    finally:
        ray.shutdown()

    rows = read_all_rows(output).to_pylist()
    assert len(rows) == 3 and all(r["status"] == "ok" for r in rows)
    assert {(r["method"], r["refine"], r["mode"], r["saliency_backend"]) for r in rows} == {
        ("naclip", "pamr:10:8,16", "whole", "none")
    }
    config = SegmenterConfig(
        method="naclip",
        vocabulary="naclip-voc21",
        clip=tiny_clip_config,
        saliency=SaliencyConfig(backend="none"),
        naclip=NaclipConfig(),
    )
    reference, segmenter = reference_label_maps(config, sorted(small_photos.glob("*.jpg")))
    check_rows_match_library(rows, reference, segmenter)

    # The feed and the previews read NACLIP's rows like any others.
    from clipdiy.labels.feed import LabelDataset
    from clipdiy.labels.preview import render_output

    dataset = LabelDataset(str(output))
    assert len(dataset) == 3 and tuple(dataset.class_names) == tuple(segmenter.class_names)
    for index in range(len(dataset)):
        image, label = dataset[index]
        expected = reference[dataset.records[index]["image_id"]].label_map
        assert image.shape[:2] == label.shape == expected.shape
        assert (label == expected).all()
    summary = render_output(str(output), str(tmp_path / "previews"))
    assert len(list((tmp_path / "previews" / "images").glob("*.png"))) == 3, summary

    # A CLIP-DIY run left unfinished in another OUTPUT: resuming it with --method naclip is refused.
    other = tmp_path / "other"
    layout = OutputLayout.open(str(other), StorageOptions())
    layout.ensure_dir(layout.root)
    clipdiy_model = dataclasses.asdict(
        dataclasses.replace(segmenter.provenance, method="clipdiy", refine=None, mode="faithful")
    )
    assert set(clipdiy_model) == {f.name for f in dataclasses.fields(Provenance)}
    first = plan_run(layout, "r1", {"input": str(small_photos), "model": clipdiy_model})
    write_run_state(layout, first, {"input": str(small_photos), "model": clipdiy_model}, {})
    capsys.readouterr()
    argv = cli_args(small_photos, other, tiny_clip_config, "--method", "naclip", "--run-id", "r1")[2:]
    assert run_cli(argv) == 2
    error = capsys.readouterr().err
    assert "model.method" in error and "model.refine" in error, error
