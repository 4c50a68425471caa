"""An image whose working memory would exceed ``--max-image-memory-gb`` is a ``too_large`` row.

The inference actor asks the method how much labelling one image holds at once (NACLIP: its query
maps, guide and decision at the original size; CLIP-DIY: the resized label map and the saliency
activations) and refuses the image before any work when that exceeds the bound, instead of being
killed by the kernel and retried until the image ends as ``worker_lost``.
"""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
from PIL import Image

from clipdiy.pipeline.stages.decode import DecodeBatch
from clipdiy.pipeline.stages.inference import SegmentBatch
from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
from clipdiy.segmentation.segmenter import create_segmenter
from clipdiy.storage import StorageOptions

#: (width, height) of the photos: a small one and one with 16x its pixels.
SMALL, LARGE = (60, 40), (240, 160)


def naclip_config(tiny_clip_config, tmp_path) -> SegmenterConfig:
    vocabulary = tmp_path / "three.txt"
    vocabulary.write_text("background\ncat\ndog\n")
    return SegmenterConfig(method="naclip", vocabulary=str(vocabulary), clip=tiny_clip_config,
                           saliency=SaliencyConfig(backend="none"), refine="none", device="cpu")


def test_naclip_estimate_is_its_float32_planes_at_the_original_size(tiny_clip_config, tmp_path):
    from clipdiy.segmentation.prepared import PreparedImage

    segmenter = create_segmenter(naclip_config(tiny_clip_config, tmp_path))
    item = PreparedImage(model_input=np.zeros((336, 504, 3), np.uint8), saliency_input=None, original_size=(400, 600))
    # 3 query words (background, cat, dog): 2 x 3 logit planes + 3 guide + 3 classes + 4 (labels,
    # top scores) = 16 float32 planes of 400 x 600, no PAMR.
    assert segmenter.working_bytes(item) == 4 * 400 * 600 * 16


def test_an_image_over_the_bound_is_a_too_large_row_and_the_others_are_labelled(tiny_clip_config, coco_images, tmp_path):
    config = naclip_config(tiny_clip_config, tmp_path)
    segmenter = create_segmenter(config)
    paths = []
    for name, size in (("small.png", SMALL), ("large.png", LARGE)):
        with Image.open(coco_images[0]) as photo:
            photo.convert("RGB").resize(size).save(tmp_path / name)
        paths.append(tmp_path / name)
    listing = pa.table({"image_id": [p.name for p in paths], "uri": [str(p) for p in paths],
                        "source_size": [p.stat().st_size for p in paths], "source_etag": pa.nulls(2, pa.string()),
                        "source_mtime": pa.nulls(2, pa.timestamp("us", tz="UTC"))})
    decoded = DecodeBatch(StorageOptions(), config.mode, 10**8, 1, segmenter_config=config)(listing)
    # Between the two images' needs (16 planes of float32 a pixel, as above): the small fits.
    bound = 4 * 16 * (SMALL[0] * SMALL[1] + LARGE[0] * LARGE[1]) // 2
    actor = SegmentBatch(config, segmenter.text_embeddings.numpy(), num_threads=1, max_image_bytes_in_memory=bound)
    rows = actor(decoded).to_pylist()

    assert [row["status"] for row in rows] == ["ok", "error"]
    assert rows[1]["error_kind"] == "too_large"
    assert "240 x 160" in rows[1]["error"] and "--max-image-memory-gb" in rows[1]["error"]
    assert rows[1]["payload"] is None
    alone = segmenter.predict([pickle.loads(decoded.column("payload")[0].as_buffer())])[0]
    np.testing.assert_array_equal(pickle.loads(rows[0]["payload"]).label_map, alone.label_map)


def test_clipdiy_estimate_without_saliency_is_its_label_map_at_the_original_size(tiny_clip_config):
    from clipdiy.segmentation.prepared import PreparedImage

    config = SegmenterConfig(vocabulary="voc", clip=tiny_clip_config, saliency=SaliencyConfig(backend="none"), device="cpu")
    segmenter = create_segmenter(config)
    item = PreparedImage(model_input=np.zeros((256, 256, 3), np.uint8), saliency_input=None, original_size=(400, 600))
    # uint16 labels plus int64 row and column indices of the nearest resize: 10 bytes a pixel.
    assert segmenter.working_bytes(item) == 10 * 400 * 600
