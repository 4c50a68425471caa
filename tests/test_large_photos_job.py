"""A 24-MP phone photo through ``jobs/label.py --method naclip --vocabulary naclip-coco-object``
with default settings (PAMR on, the default tile side and ``--max-image-memory-gb``) and a
random CLIP with the real ViT-B/16 image tower (its patch grid and feature width; a tiny text
tower, see tests/model_factories.py) loaded from its checkpoint: an ``ok`` row at the photo's
own 6000 x 4000, its masks covering every pixel once, and, on windows of the photo (its four
corners, seeded random windows, and windows on the corners where four tiles meet), exactly the
labels of the whole-photo path (computed without tiles by tests/large_photo_reference.py) wherever
their margin exceeds float rounding.

The untiled path itself cannot run here (its query maps alone are 10.7 GB at 24 MP); the 100-MP
photo runs through benchmarks/label_large_photo_job.py (tens of CPU minutes of PAMR).
"""

from __future__ import annotations

import numpy as np
import pytest
from large_photo_reference import (
    deferred_forward,
    make_large_photo,
    random_windows,
    window_labels,
)
from PIL import Image
from pipeline_support import cli_args, label_map_from_masks, read_all_rows

from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig

pytestmark = pytest.mark.slow

WIDTH, HEIGHT = 6000, 4000
WINDOW = 160


@pytest.fixture(scope="module")
def vitb16_clip_config(tmp_path_factory):
    from model_factories import make_clip_config

    return make_clip_config(tmp_path_factory.mktemp("clip-vitb16"), arch="vitb16-small-text")


@pytest.mark.timeout(2400)  # 176 s on the 2-core test machine at load 2-3, mostly PAMR on 24 tiles; room for a loaded one
def test_a_24_megapixel_photo_is_an_ok_row_at_its_size_with_the_whole_photo_labels(coco_images, vitb16_clip_config, tmp_path):
    import ray
    from test_naclip_job import run_cli

    from clipdiy.segmentation.images import to_rgb_uint8
    from clipdiy.segmentation.segmenter import create_segmenter, prepare_input

    folder = tmp_path / "photos"
    folder.mkdir()
    photo = folder / "phone-24mp.jpg"
    make_large_photo(coco_images[3], photo, WIDTH, HEIGHT, seed=24)
    output = tmp_path / "labels"
    argv = cli_args(folder, output, vitb16_clip_config, "--method", "naclip", "--vocabulary", "naclip-coco-object",
                    "--torch-threads", "2")[2:]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run_cli(argv) == 0
    finally:
        ray.shutdown()
    (row,) = read_all_rows(output).to_pylist()
    assert row["status"] == "ok", row.get("error")
    assert (row["height"], row["width"], row["refine"]) == (HEIGHT, WIDTH, "pamr:10:8,16")
    labels = label_map_from_masks(row["masks"], HEIGHT, WIDTH)
    assert (labels >= 0).all(), "every pixel is in exactly one mask"

    config = SegmenterConfig(method="naclip", vocabulary="naclip-coco-object", clip=vitb16_clip_config,
                             saliency=SaliencyConfig(backend="none"), device="cpu")
    segmenter = create_segmenter(config)
    with Image.open(photo) as image:
        prepared = prepare_input(to_rgb_uint8(image), config)
    forward = deferred_forward(segmenter, prepared)
    interiors = segmenter.method.plan_tiles((HEIGHT, WIDTH))
    corners = sorted({(t.rows.start, t.cols.start) for t in interiors if t.rows.start and t.cols.start})[:3]
    windows = random_windows(HEIGHT, WIDTH, WINDOW, count=4, seed=25)
    windows += [((y - WINDOW // 2, y + WINDOW // 2), (x - WINDOW // 2, x + WINDOW // 2)) for y, x in corners]
    for rows, cols in windows:
        expected = window_labels(segmenter, forward, rows, cols)
        got = labels[rows[0] : rows[1], cols[0] : cols[1]]
        assert expected.decided.mean() > 0.5, (rows, cols, expected.decided.mean())
        np.testing.assert_array_equal(got[expected.decided], expected.labels[expected.decided], err_msg=f"window {rows} x {cols}")
