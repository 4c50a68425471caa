"""NACLIP after the forward, in tiles of the original image (clipdiy.segmentation.tiles): the tiled
path against the untiled one (the whole photo at once, the path SPEC 8 is checked on in
test_naclip.py), on real photos whose sizes force many tiles, both window settings, PAMR on and
off; the halo is exact, so probabilities agree to float32 rounding and labels wherever the margin
exceeds it. Plus the pieces' known answers (F.interpolate, adaptive pooling) and the memory bound.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipdiy.segmentation.config import (
    NaclipConfig,
    PamrConfig,
    SaliencyConfig,
    SegmenterConfig,
)
from clipdiy.segmentation.methods.naclip import query_words
from clipdiy.segmentation.prepared import PreparedImage
from clipdiy.segmentation.segmenter import Segmenter, prepare_input
from clipdiy.segmentation.tiles import (
    area_bin_sizes,
    area_pool_region,
    bilinear_region,
    plan_tiles,
)
from clipdiy.segmentation.vocabulary import load_vocabulary

#: Probabilities of the tiled path against the untiled one: the resize's float32 rounding (a few
#: ulp of the logits) times the logit scale 40, with room (test_naclip compares to 1e-3).
PROBABILITY_TOLERANCE = 1e-4
#: Labels must agree where the untiled path's best class beats the second, and the threshold, by more.
LABEL_MARGIN = 1e-3
#: A small PAMR whose reach (3 x 5 = 15 px, guide 5 more) lets tiles of 40-90 px cut small photos.
SMALL_PAMR = PamrConfig(iterations=3, dilations=(2, 5))
UNTILED = 10**6


@pytest.fixture(scope="module")
def clip(tiny_clip_config):
    from clipdiy.segmentation.models.clip import create_clip_model

    return create_clip_model(tiny_clip_config)


@pytest.fixture(scope="module")
def vocabulary_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocabulary") / "five.txt"
    path.write_text("background, sky, wall\nperson\ncat\ndog\ncar\n")
    return str(path)


@pytest.fixture(scope="module")
def photo(coco_images):
    with Image.open(coco_images[5]) as image:
        return np.asarray(image.convert("RGB"))


def segmenters(clip, tiny_clip_config, vocabulary_file, window: str, refine: str, pamr: PamrConfig, tile_side: int):
    """(untiled, tiled) segmenters of one model and text side, differing only in the tile side."""
    config = SegmenterConfig(method="naclip", vocabulary=vocabulary_file, clip=tiny_clip_config, saliency=SaliencyConfig(backend="none"),
                             refine=refine, pamr=pamr, device="cpu", naclip=NaclipConfig(window=window, tile_side=UNTILED))
    vocabulary = load_vocabulary(vocabulary_file)
    untiled = Segmenter(clip, None, vocabulary, config)
    tiled_config = replace(config, naclip=replace(config.naclip, tile_side=tile_side))
    return untiled, Segmenter(clip, None, vocabulary, tiled_config, text_embeddings=untiled.text_embeddings)


def assert_same_outputs(expected, actual) -> float:
    """The tiled outputs against the untiled ones; returns the fraction of pixels whose label is decided."""
    decided_total = pixels = 0
    for want, got in zip(expected, actual, strict=True):
        assert got.label_map.shape == want.label_map.shape and got.label_map.dtype == want.label_map.dtype
        assert np.abs(got.probabilities - want.probabilities).max() <= PROBABILITY_TOLERANCE
        ranked = np.sort(want.probabilities, axis=0)
        decided = (ranked[-1] - ranked[-2] > LABEL_MARGIN) & (np.abs(want.probabilities.max(axis=0) - 0.1) > LABEL_MARGIN)
        np.testing.assert_array_equal(got.label_map[decided], want.label_map[decided])
        decided_total += int(decided.sum())
        pixels += decided.size
        np.testing.assert_allclose(got.class_scores, want.class_scores, atol=1e-5)
        np.testing.assert_allclose(got.mask_scores, want.mask_scores, atol=PROBABILITY_TOLERANCE)
        assert abs(got.foreground_fraction - want.foreground_fraction) <= 1e-5
        assert got.saliency.shape == want.saliency.shape
        np.testing.assert_allclose(got.saliency, want.saliency, atol=PROBABILITY_TOLERANCE)
    return decided_total / pixels


@pytest.mark.parametrize("window", ["whole", "slide"])
@pytest.mark.parametrize("refine", ["none", "pamr"])
@settings(max_examples=2)
@given(height=st.integers(60, 150), width=st.integers(60, 150), side=st.integers(50, 90))
def test_tiles_label_as_the_whole_photo(clip, tiny_clip_config, vocabulary_file, photo, window, refine, height, width, side):
    untiled, tiled = segmenters(clip, tiny_clip_config, vocabulary_file, window, refine, SMALL_PAMR, side)
    if max(height, width) <= side:
        side = max(height, width) - 1  # at least two tiles
        tiled = Segmenter(tiled.clip, None, tiled.vocabulary, replace(tiled.config, naclip=replace(tiled.config.naclip, tile_side=side)),
                          text_embeddings=tiled.text_embeddings)
    assert len(tiled.method.plan_tiles((height, width))) > 1
    # Two photos of one size: one batch, tiled together.
    images = [np.ascontiguousarray(photo[:height, :width]), np.ascontiguousarray(photo[-height:, -width:])]
    prepared = [prepare_input(image, untiled.config) for image in images]
    fraction = assert_same_outputs(untiled.predict(prepared, return_probabilities=True), tiled.predict(prepared, return_probabilities=True))
    assert fraction > 0.5, fraction


@pytest.mark.slow
def test_tiles_with_the_authors_pamr_label_as_the_whole_photo(clip, tiny_clip_config, vocabulary_file, photo):
    """PAMR as published (10 iterations, dilations 8 and 16: a 160-px reach, 176 for the guide):
    regions of 400 px leave 80-px interiors, so every tile edge is far inside PAMR's reach."""
    untiled, tiled = segmenters(clip, tiny_clip_config, vocabulary_file, "slide", "pamr", PamrConfig(), 400)
    image = np.ascontiguousarray(photo[:390, :470])
    plan = tiled.method.plan_tiles(image.shape[:2])
    assert len(plan) == 6 and all(tile.cols.region_end - tile.cols.region_start <= 400 for tile in plan)
    prepared = [prepare_input(image, untiled.config)]
    fraction = assert_same_outputs(untiled.predict(prepared, return_probabilities=True), tiled.predict(prepared, return_probabilities=True))
    assert fraction > 0.5, fraction


def test_one_tile_photos_take_the_whole_photo_path(clip, tiny_clip_config, vocabulary_file, photo):
    """A photo no larger than a tile gets its logits at the original size from the method, as before."""
    _, tiled = segmenters(clip, tiny_clip_config, vocabulary_file, "whole", "pamr", SMALL_PAMR, 200)
    prepared = [prepare_input(np.ascontiguousarray(photo[:200, :150]), tiled.config)]
    ((_, forward),) = list(tiled.method.forward_groups(prepared))
    assert forward.logits is not None and forward.logits.shape[-2:] == (200, 150) and forward.source is None
    prepared = [prepare_input(np.ascontiguousarray(photo[:201, :150]), tiled.config)]
    ((_, forward),) = list(tiled.method.forward_groups(prepared))
    assert forward.logits is None and tuple(forward.size) == (201, 150) and forward.source.shape[0] == 1


@settings(max_examples=40)
@given(
    source=st.tuples(st.integers(1, 24), st.integers(1, 24)),
    size=st.tuples(st.integers(1, 90), st.integers(1, 90)),
    data=st.data(),
)
def test_bilinear_region_is_the_crop_of_the_whole_resize(source, size, data):
    generator = torch.Generator().manual_seed(sum(source) + sum(size))
    maps = torch.rand(2, 5, *source, generator=generator)
    r0 = data.draw(st.integers(0, size[0] - 1))
    r1 = data.draw(st.integers(r0 + 1, size[0]))
    c0 = data.draw(st.integers(0, size[1] - 1))
    c1 = data.draw(st.integers(c0 + 1, size[1]))
    whole = F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    region = bilinear_region(maps, size, (r0, r1), (c0, c1))
    assert region.shape == (2, 5, r1 - r0, c1 - c0)
    assert (region - whole[..., r0:r1, c0:c1]).abs().max().item() <= 1e-6


@settings(max_examples=30)
@given(source=st.tuples(st.integers(1, 12), st.integers(1, 12)), size=st.tuples(st.integers(1, 90), st.integers(1, 90)), seed=st.integers(0, 1000))
def test_bilinear_region_keeps_runs_of_equal_values_exact(source, size, seed):
    """A map whose rows are each one value resizes to rows that are each one value, to the bit
    (and likewise columns), as PyTorch's kernel gives along a map's borders: an argmax over such a
    run (Trident's SAM prompt point) then picks its first pixel, as on the whole map."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.rand(1, 3, source[0], 1, generator=generator).expand(1, 3, *source).contiguous()
    resized = bilinear_region(rows, size, (0, size[0]), (0, size[1]))
    assert torch.equal(resized, resized[..., :1].expand_as(resized))
    columns = torch.rand(1, 3, 1, source[1], generator=generator).expand(1, 3, *source).contiguous()
    resized = bilinear_region(columns, size, (0, size[0]), (0, size[1]))
    assert torch.equal(resized, resized[..., :1, :].expand_as(resized))


@settings(max_examples=40)
@given(size=st.tuples(st.integers(1, 70), st.integers(1, 70)), out=st.tuples(st.integers(1, 30), st.integers(1, 30)),
       side=st.integers(1, 40), halo=st.integers(0, 10))
def test_area_pooling_summed_over_tiles_is_the_whole_pooling(size, out, side, halo):
    side = max(side, 2 * halo + 1)
    values = torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(size[0] * 71 + size[1]))
    total = torch.zeros(2, 1, *out, dtype=torch.float64)
    tiles = plan_tiles(*size, side, halo)
    covered = np.zeros(size, np.int64)
    for tile in tiles:
        rows, cols = (tile.rows.start, tile.rows.end), (tile.cols.start, tile.cols.end)
        covered[rows[0] : rows[1], cols[0] : cols[1]] += 1
        assert tile.rows.region_end - tile.rows.region_start <= side
        total += area_pool_region(values[..., rows[0] : rows[1], cols[0] : cols[1]], size, out, rows, cols)
    assert (covered == 1).all()  # the interiors partition the image
    expected = F.interpolate(values, size=out, mode="area").double()
    assert (total / area_bin_sizes(size, out, "cpu") - expected).abs().max().item() <= 1e-6


def test_halo_regions_reach_pamr_or_the_image_border():
    for tile in plan_tiles(1000, 777, 400, 160):
        for span, size in ((tile.rows, 1000), (tile.cols, 777)):
            assert span.region_end - span.region_start <= 400
            assert span.start - span.region_start == 160 or span.region_start == 0
            assert span.region_end - span.end == 160 or span.region_end == size


def test_coco_object_estimate_stays_under_the_default_bound_up_to_the_decode_guard(clip, tiny_clip_config):
    """Every photo up to 100 MP (the decode guard), any aspect, fits NACLIP + COCO-Object + PAMR
    under the default 16 GB bound; what grows with the photo is only its uint16 label map."""
    from clipdiy.pipeline.config import DEFAULT_MAX_IMAGE_MEMORY_GB

    config = SegmenterConfig(method="naclip", vocabulary="naclip-coco-object", clip=tiny_clip_config, saliency=SaliencyConfig(backend="none"), device="cpu")
    vocabulary = load_vocabulary(config.vocabulary)
    words, _ = query_words(vocabulary)
    segmenter = Segmenter(clip, None, vocabulary, config, text_embeddings=torch.zeros(len(words), 8))  # no forward runs
    estimates = {}
    for height, width in ((3000, 4000), (4000, 6000), (6000, 8000), (8660, 11547), (1400, 71000)):
        item = PreparedImage(model_input=np.zeros((336, 448, 3), np.uint8), saliency_input=None, original_size=(height, width))
        estimates[height * width] = segmenter.working_bytes(item)
        assert estimates[height * width] < DEFAULT_MAX_IMAGE_MEMORY_GB * 1024**3
    # Bounded by the tile, not the photo: beyond the uint16 label map (2 bytes a pixel), one
    # tile's buffers, whatever the photo (a 1344-px region: 2 x 113 query planes, 81 classes).
    for pixels, estimate in estimates.items():
        assert estimate - 2 * pixels < 2.5 * 2**30, (pixels, estimate)
    assert estimates[8660 * 11547] < 4 * 2**30


@settings(max_examples=3, deadline=None)
@given(height=st.integers(60, 140), width=st.integers(60, 140), top=st.integers(0, 100), left=st.integers(0, 100), side=st.integers(10, 40))
def test_the_window_reference_of_the_large_photo_checks_labels_as_the_whole_photo(clip, tiny_clip_config, vocabulary_file, photo, height, width, top, left, side):
    """tests/large_photo_reference.py (what the 24- and 100-MP job checks compare windows to,
    computed without the segmenter's tiles) gives the whole-photo path's labels on any window."""
    from large_photo_reference import deferred_forward, window_labels

    untiled, tiled = segmenters(clip, tiny_clip_config, vocabulary_file, "slide", "pamr", SMALL_PAMR, 50)
    top, left = min(top, height - side), min(width - side, left)
    prepared = prepare_input(np.ascontiguousarray(photo[:height, :width]), untiled.config)
    (whole,) = untiled.predict([prepared], return_probabilities=True)
    got = window_labels(tiled, deferred_forward(tiled, prepared), (top, top + side), (left, left + side))
    assert got.decided.mean() > 0.5, got.decided.mean()
    window_probabilities = whole.probabilities[:, top : top + side, left : left + side]
    np.testing.assert_allclose(got.probabilities, window_probabilities, atol=PROBABILITY_TOLERANCE, rtol=0)
    window = whole.label_map[top : top + side, left : left + side].astype(np.int64)
    np.testing.assert_array_equal(got.labels[got.decided], window[got.decided])


def test_the_estimate_of_a_100_megapixel_photo_is_its_tile_bound(clip, tiny_clip_config):
    """The per-image estimate the inference actor bounds (``--max-image-memory-gb``) for a photo
    just under the 100-MP decode guard, with defaults, against the bound written out from the
    tile and the vocabulary: 1344-px regions holding the 112 distinct COCO-Object query maps twice
    (the resized logits, PAMR's copy) and the 3-channel guide 16 px wider each side, 1024-px
    interiors (1344 less PAMR's 160-px reach twice) holding the 81 class probabilities and 4
    planes of labels and top scores, the resize's 2 x 64 rows, PAMR's 128 M-float bound, plus a
    uint16 label map of the photo and the float64 preview sums of the 336 x 504 model input."""
    from clipdiy.pipeline.config import DEFAULT_MAX_IMAGE_MEMORY_GB, DEFAULT_MAX_PIXELS

    height, width = 8165, 12247
    assert height * width <= DEFAULT_MAX_PIXELS
    config = SegmenterConfig(method="naclip", vocabulary="naclip-coco-object", clip=tiny_clip_config, saliency=SaliencyConfig(backend="none"), device="cpu")
    vocabulary = load_vocabulary(config.vocabulary)
    words, _ = query_words(vocabulary)
    assert (len(vocabulary), len(words), len(set(words))) == (81, 113, 112)
    segmenter = Segmenter(clip, None, vocabulary, config, text_embeddings=torch.zeros(len(words), 8))  # no forward runs
    item = PreparedImage(model_input=np.zeros((336, 504, 3), np.uint8), saliency_input=None, original_size=(height, width))
    region, guide, interior, queries, classes = 1344**2, (1344 + 32) ** 2, 1024**2, 112, 81
    tile = 4 * (2 * queries * region + 3 * guide + (classes + 4) * interior + 2 * 64 * 1344 * queries)
    bound = tile + 4 * 128_000_000 + 2 * height * width + 8 * 336 * 504
    estimate = segmenter.working_bytes(item)
    assert 0.98 * bound <= estimate <= bound, (estimate, bound)
    assert bound < 4e9 < DEFAULT_MAX_IMAGE_MEMORY_GB * 1024**3


@settings(max_examples=5, deadline=None)
@given(pixels=st.integers(1, 3000), seed=st.integers(0, 2**16), scale=st.floats(0.01, 1.0))
def test_the_decision_weights_repeated_words_as_over_every_column(clip, tiny_clip_config, pixels, seed, scale):
    """COCO-Object lists "bed" twice: the decision adds log m and divides by m on that column only
    (the others have m = 1), which must be, to the bit, the softmax of 40 x logits + log m over all
    columns divided by m, then each class's best query, background under 0.1."""
    config = SegmenterConfig(method="naclip", vocabulary="naclip-coco-object", clip=tiny_clip_config, saliency=SaliencyConfig(backend="none"), device="cpu")
    vocabulary = load_vocabulary(config.vocabulary)
    words, owners = query_words(vocabulary)
    segmenter = Segmenter(clip, None, vocabulary, config, text_embeddings=torch.zeros(len(words), 8))
    unique = list(dict.fromkeys(words))
    multiplicity = torch.tensor([words.count(word) for word in unique], dtype=torch.float32)
    assert multiplicity.max() == 2
    logits = torch.randn(1, len(unique), 1, pixels, generator=torch.Generator().manual_seed(seed)) * scale
    query_probabilities = torch.softmax(logits[0, :, 0].T * 40.0 + multiplicity.log(), dim=-1) / multiplicity
    best = torch.stack([query_probabilities[:, [unique.index(w) for w, o in zip(words, owners) if o == c]].amax(dim=-1) for c in range(len(vocabulary))], dim=-1)
    top, labels = best.max(dim=-1)
    labels[top < 0.1] = 0
    decision = segmenter.method.decide(logits, None)
    np.testing.assert_array_equal(decision.labels.view(-1).numpy(), labels.numpy())
    np.testing.assert_array_equal(decision.probabilities[0, :, 0].T.numpy(), (best / best.sum(dim=-1, keepdim=True)).numpy())
