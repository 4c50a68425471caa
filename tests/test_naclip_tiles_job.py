"""``jobs/label.py --method naclip --vocabulary naclip-coco-object`` with default settings (PAMR
on, the default tile side and ``--max-image-memory-gb``) on photos larger than one tile: their rows
are ``ok`` at the original size and their masks decode to the labels of the untiled path.

(A 24- or 100-MP photo runs the same code, with more tiles; on this 2-core test machine its PAMR
alone takes tens of minutes, so the job test keeps to photos a little wider or taller than one
tile; benchmarks/bench_large_photos.py measures the large ones.)
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from pipeline_support import cli_args, label_map_from_masks, read_all_rows

from clipdiy.segmentation.config import NaclipConfig, SaliencyConfig, SegmenterConfig

pytestmark = pytest.mark.slow

#: (width, height): each just over the default tile side (1344) in one direction, so each is cut
#: into two tiles whose edge crosses the photo's objects.
SIZES = ((1400, 120), (110, 1380))
LABEL_MARGIN = 1e-3


@pytest.fixture(scope="module")
def long_photos(coco_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("long-photos")
    for path, size in zip(coco_images[6:8], SIZES):
        with Image.open(path) as image:
            image.convert("RGB").resize(size, Image.BILINEAR).save(folder / f"{path.stem}.png")
    return folder


def test_photos_larger_than_a_tile_are_ok_rows_with_the_untiled_labels(long_photos, tiny_clip_config, tmp_path):
    import ray
    import torch
    from test_naclip_job import run_cli

    from clipdiy.segmentation.segmenter import create_segmenter

    output = tmp_path / "labels"
    argv = cli_args(long_photos, output, tiny_clip_config, "--method", "naclip", "--vocabulary", "naclip-coco-object")[2:]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run_cli(argv) == 0
    finally:
        ray.shutdown()
    rows = {row["image_id"]: row for row in read_all_rows(output).to_pylist()}
    assert len(rows) == 2 and all(row["status"] == "ok" for row in rows.values()), [row.get("error") for row in rows.values()]
    assert {row["refine"] for row in rows.values()} == {"pamr:10:8,16"}

    untiled_config = SegmenterConfig(method="naclip", vocabulary="naclip-coco-object", clip=tiny_clip_config,
                                     saliency=SaliencyConfig(backend="none"), device="cpu", naclip=NaclipConfig(tile_side=10**6))
    segmenter = create_segmenter(untiled_config)
    torch.set_num_threads(1)
    for path in sorted(long_photos.glob("*.png")):
        with Image.open(path) as image:
            height, width = image.height, image.width
            assert max(height, width) > NaclipConfig().tile_side
            expected = segmenter.segment([image], return_probabilities=True)[0]
        row = rows[path.name]
        assert (row["height"], row["width"]) == (height, width)
        rebuilt = label_map_from_masks(row["masks"], height, width)
        ranked = np.sort(expected.probabilities, axis=0)
        decided = (ranked[-1] - ranked[-2] > LABEL_MARGIN) & (np.abs(ranked[-1] - 0.1) > LABEL_MARGIN)
        assert decided.mean() > 0.5, decided.mean()
        np.testing.assert_array_equal(rebuilt[decided], expected.label_map[decided].astype(np.int32), err_msg=path.name)
        np.testing.assert_allclose(row["class_scores"], expected.class_scores, atol=1e-5)
