"""``SaliencyConfig.max_side``: large images reach the saliency model shrunk, small ones untouched;
unset (faithful) the saliency model sees the full resolution."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from handcrafted_models import CLASS_NAMES, COLOURS, GREY, MeanColourClip, NotGreySaliency
from PIL import Image, ImageDraw

from clipdiy.pipeline.stages.decode import decode_image
from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
from clipdiy.segmentation.prepared import prepare_image
from clipdiy.segmentation.preprocess import resize_for_saliency, saliency_input_size
from clipdiy.segmentation.segmenter import Segmenter
from clipdiy.segmentation.vocabulary import Vocabulary, VocabularyClass


class RecordingSaliency(NotGreySaliency):
    """NotGreySaliency that remembers the sizes of the batches it was given."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def forward(self, images):
        self.sizes.append(tuple(images.shape[-2:]))
        return super().forward(images)


def colour_segmenter(max_side: int | None) -> tuple[Segmenter, RecordingSaliency]:
    saliency = RecordingSaliency()
    config = SegmenterConfig(vocabulary="colours", saliency=SaliencyConfig(backend="none", max_side=max_side))
    vocabulary = Vocabulary(name="colours", classes=tuple(VocabularyClass(name, (name,)) for name in CLASS_NAMES))
    return Segmenter(MeanColourClip(), saliency, vocabulary, config), saliency


def scene(width: int, height: int) -> Image.Image:
    """Grey with a red rectangle on the left and a blue ellipse on the right."""
    image = Image.new("RGB", (width, height), GREY)
    draw = ImageDraw.Draw(image)
    draw.rectangle([width // 10, height // 5, width * 4 // 10, height * 4 // 5], fill=COLOURS["red"])
    draw.ellipse([width * 6 // 10, height // 4, width * 9 // 10, height * 3 // 4], fill=COLOURS["blue"])
    return image


def test_sizes_keep_the_aspect_and_respect_the_cap():
    assert saliency_input_size(3000, 4000, 1024) == (768, 1024)
    assert saliency_input_size(4000, 3000, 1024) == (1024, 768)
    assert saliency_input_size(10, 5000, 100) == (1, 100)  # never below one pixel
    assert saliency_input_size(3000, 4000, None) == (3000, 4000)
    assert saliency_input_size(1024, 700, 1024) == (1024, 700)
    small = np.zeros((50, 60, 3), np.uint8)
    assert resize_for_saliency(small, 64) is small and resize_for_saliency(small, None) is small


def test_shrinking_averages_every_pixel():
    """Area interpolation: a one-pixel checkerboard halved becomes its mean grey, not one phase of it."""
    checker = (np.indices((64, 96)).sum(0) % 2 * 255).astype(np.uint8)
    image = np.repeat(checker[:, :, None], 3, axis=2)
    shrunk = resize_for_saliency(image, 48)
    assert shrunk.shape == (32, 48, 3) and shrunk.dtype == np.uint8
    assert np.abs(shrunk.astype(int) - 128).max() <= 1


def test_too_small_a_cap_is_refused_naming_the_option():
    with pytest.raises(ValueError, match="--saliency-max-side"):
        SaliencyConfig(max_side=16)


def test_segmenter_feeds_the_shrunk_image_to_saliency_and_says_so():
    image = scene(900, 600)
    full, full_saliency = colour_segmenter(None)
    capped, capped_saliency = colour_segmenter(300)
    (full_result,) = full.segment([image])
    (capped_result,) = capped.segment([image])
    assert full_saliency.sizes == [(600, 900)]
    assert capped_saliency.sizes == [(200, 300)]
    assert full.provenance.saliency_max_side is None and capped.provenance.saliency_max_side == 300
    # Labels at the original size either way, and the same up to the shapes' edges.
    assert capped_result.label_map.shape == full_result.label_map.shape == (600, 900)
    agreement = (capped_result.label_map == full_result.label_map).mean()
    assert agreement > 0.98, agreement
    assert set(np.unique(capped_result.label_map)) == {0, CLASS_NAMES.index("red"), CLASS_NAMES.index("blue")}


def test_images_within_the_cap_are_labelled_exactly_as_without_it():
    image = scene(320, 240)
    full, _ = colour_segmenter(None)
    capped, capped_saliency = colour_segmenter(320)
    (expected,) = full.segment([image], return_probabilities=True)
    (result,) = capped.segment([image], return_probabilities=True)
    assert capped_saliency.sizes == [(240, 320)]
    assert np.array_equal(result.label_map, expected.label_map)
    assert np.array_equal(result.probabilities, expected.probabilities)


def test_mixed_sizes_in_one_batch_group_by_saliency_size():
    segmenter, saliency = colour_segmenter(300)
    images = [scene(900, 600), scene(600, 400), scene(240, 200)]
    results = segmenter.segment(images)
    assert sorted(saliency.sizes) == [(200, 240), (200, 300)]  # the two large ones share a forward
    assert [r.label_map.shape for r in results] == [(600, 900), (400, 600), (200, 240)]


def test_decode_prepares_the_shrunk_input_on_the_cpu_worker(coco_images):
    data = coco_images[0].read_bytes()
    with Image.open(coco_images[0]) as stored:
        width, height = stored.size
        rgb = np.asarray(stored.convert("RGB"))
    prepared = decode_image(data, mode="faithful", max_pixels=100_000_000, saliency_max_side=160).prepared
    assert prepared.original_size == (height, width)
    assert max(prepared.saliency_input.shape[:2]) == 160
    assert np.array_equal(prepare_image(rgb, saliency_max_side=160).saliency_input, prepared.saliency_input)
    full = decode_image(data, mode="faithful", max_pixels=100_000_000).prepared
    assert np.array_equal(full.saliency_input, rgb)  # faithful: the original itself
    # What travels to the accelerator: the small inputs only, not the original.
    assert len(pickle.dumps(prepared)) < len(pickle.dumps(full)) / 3


def test_a_backend_that_reads_no_pixels_gets_no_pixels():
    """``none``: the CPU workers prepare a token saliency input, and the segmenter hands the model
    a placeholder at the model size instead of copying the image to the device."""
    from clipdiy.segmentation.config import MIN_SALIENCY_SIDE
    from clipdiy.segmentation.models.saliency import saliency_input_side
    from clipdiy.segmentation.models.saliency.none import NoSaliency

    assert saliency_input_side(SaliencyConfig(backend="none", max_side=1024)) == MIN_SALIENCY_SIDE
    assert saliency_input_side(SaliencyConfig(backend="found")) is None
    assert saliency_input_side(SaliencyConfig(backend="found", max_side=1024)) == 1024

    class RecordingNone(NoSaliency):
        def __init__(self):
            super().__init__()
            self.sizes = []

        def forward(self, images):
            self.sizes.append(tuple(images.shape[-2:]))
            return super().forward(images)

    saliency = RecordingNone()
    vocabulary = Vocabulary(name="colours", classes=tuple(VocabularyClass(name, (name,)) for name in CLASS_NAMES))
    segmenter = Segmenter(MeanColourClip(), saliency, vocabulary, SegmenterConfig(vocabulary="colours"))
    image = scene(900, 600)
    (result,) = segmenter.segment([image])
    assert saliency.sizes == [(256, 256)]
    assert result.foreground_fraction == 1.0 and result.label_map.shape == (600, 900)
    shrunk = prepare_image(image, saliency_max_side=MIN_SALIENCY_SIDE)
    (from_shrunk,) = segmenter.predict([shrunk])
    (from_full,) = segmenter.predict([prepare_image(image)])
    assert np.array_equal(from_shrunk.label_map, from_full.label_map)


def test_the_inference_actor_warns_once_about_large_full_resolution_saliency(caplog):
    from clipdiy.pipeline.stages.inference import SegmentBatch
    from clipdiy.segmentation.prepared import PreparedImage

    def prepared(height: int, width: int) -> PreparedImage:
        rgb = np.zeros((height, width, 3), np.uint8)
        return PreparedImage(model_input=rgb[:256, :256], saliency_input=rgb, original_size=(height, width))

    stage = SegmentBatch.__new__(SegmentBatch)  # the check alone, without loading models
    stage._warn_large = True
    with caplog.at_level("WARNING", logger="clipdiy.pipeline.stages.inference"):
        stage._check_saliency_cost([prepared(480, 640)])
        assert not caplog.records
        stage._check_saliency_cost([prepared(480, 640), prepared(2000, 2600)])
        stage._check_saliency_cost([prepared(3000, 4000)])
    (record,) = caplog.records
    assert "2600 x 2000" in record.getMessage() and "--saliency-max-side" in record.getMessage()
