"""Trident's SAM refinement (clipdiy.segmentation.sam_refine) against the transcription of the
authors' ``sam_refinement`` in tests/reference_trident.py, which prompts segment-anything's own
``SamPredictor`` one class at a time.

On generated coarse maps (sizes, class counts, smoothness, thresholds) and random image
embeddings, with a small SAM of the real module classes (a 32-wide prompt encoder and two-way
transformer instead of 256: the arithmetic per prompt is the same code; ViT-B's own decoder runs
in tests/test_trident.py). Random decoders predict IoUs in a narrow band; the IoU head's last
layer is stretched around the 0.8 cut-off so that some masks are kept and some dropped.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from clipdiy.segmentation.sam_refine import (
    SamRefineSetting,
    preprocess_shape,
    sam_refine,
)

TOLERANCE = 1e-5
LABEL_MARGIN = 1e-4
WIDTH = 32


def small_sam(seed: int = 0):
    from model_factories import make_small_sam

    return make_small_sam(seed, WIDTH)


@pytest.fixture(scope="module")
def sam():
    model = small_sam()
    with torch.no_grad():
        probe = _iou_probe(model)
        model.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.8 - float(probe.median()))
    return model


def _iou_probe(model) -> torch.Tensor:
    """The decoder's IoUs for a few random prompts on random embeddings."""
    from clipdiy.segmentation.models.sam_decoder import (
        decode_masks,
        mask_prompt_embeddings,
    )

    generator = torch.Generator().manual_seed(5)
    embeddings = torch.randn(1, WIDTH, 64, 64, generator=generator)
    points = torch.rand(16, 2, generator=generator) * 900
    boxes = torch.cat([points - 50, points + 50], dim=1).clamp(0, 1023)
    dense = mask_prompt_embeddings(model.prompt_encoder, torch.rand(1, 256, 256, generator=generator) * 0.005)
    _, ious = decode_masks(model, embeddings, torch.zeros(16, dtype=torch.long), points, boxes, dense, torch.zeros(16, dtype=torch.long))
    return ious


def coarse_maps(seed: int, height: int, width: int, classes: int, cells: int, threshold: float):
    """Smooth random class probabilities C x H x W (a softmax of bilinearly upsampled noise: blobs
    of a few classes, the authors' P) and their labels (argmax, under ``threshold`` to 0)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(1, classes, cells, max(2, cells * width // height), generator=generator) * 4.0
    probabilities = F.interpolate(noise, (height, width), mode="bilinear", align_corners=False)[0].softmax(0)
    top, labels = probabilities.max(0)
    labels[top < threshold] = 0
    return probabilities, labels


def sam_state(height: int, width: int, embeddings: torch.Tensor):
    stretched = (-(-height // 16) * 16, -(-width // 16) * 16)
    return {"features": embeddings, "input_size": preprocess_shape(*stretched, 1024), "original_size": stretched}


def check_close(scores, labels, reference_scores, reference_labels):
    assert scores.shape == reference_scores.shape
    assert (scores - reference_scores).abs().max().item() <= TOLERANCE
    top2 = reference_scores.topk(2, dim=0).values
    decided = top2[0] - top2[1] > LABEL_MARGIN
    assert torch.equal(labels[decided], reference_labels[decided])
    return decided


@settings(max_examples=5, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    height=st.integers(40, 120),
    width=st.integers(40, 120),
    classes=st.integers(2, 6),
    cells=st.integers(2, 5),
    coarse_thresh=st.sampled_from([0.0, 0.2, 0.25, 0.4]),
)
def test_refinement_matches_the_transcription(sam, seed, height, width, classes, cells, coarse_thresh):
    from reference_trident import reference_refine

    probabilities, labels = coarse_maps(seed, height, width, classes, cells, coarse_thresh)
    embeddings = torch.randn(1, WIDTH, 64, 64, generator=torch.Generator().manual_seed(seed + 1))
    state = sam_state(height, width, embeddings)
    setting = SamRefineSetting(coarse_thresh=coarse_thresh, minimal_area=30)
    with torch.no_grad():
        expected_scores, expected_labels, kept = reference_refine(
            sam, state, np.zeros((height, width, 3), np.uint8), probabilities, labels, classes, coarse_thresh, minimal_area=30)
    refined_labels, scores, refined = sam_refine(sam, embeddings, probabilities[None], labels[None], state["input_size"], setting)
    check_close(scores[0], refined_labels[0], expected_scores, expected_labels)
    assert bool(refined[0]) == (kept > 0)


def test_refinement_changes_labels_and_keeps_and_drops_masks(sam):
    """Not vacuous: on this map SAM keeps some masks and drops others, and labels move."""
    from reference_trident import reference_refine

    height, width, classes = 120, 160, 4
    probabilities, labels = coarse_maps(3, height, width, classes, 4, 0.25)
    embeddings = torch.randn(1, WIDTH, 64, 64, generator=torch.Generator().manual_seed(4))
    state = sam_state(height, width, embeddings)
    with torch.no_grad():
        expected_scores, expected_labels, kept = reference_refine(
            sam, state, np.zeros((height, width, 3), np.uint8), probabilities, labels, classes, 0.25, minimal_area=30)
    refined_labels, scores, refined = sam_refine(sam, embeddings, probabilities[None], labels[None], state["input_size"], SamRefineSetting(0.25, minimal_area=30))
    check_close(scores[0], refined_labels[0], expected_scores, expected_labels)
    assert bool(refined[0]) and kept > 0
    assert int((refined_labels[0] != labels).sum()) > 0
    # Some region's mask was dropped: its pixels' scores were raised to the coarse probabilities.
    assert bool(((scores[0] - probabilities).abs() < 1e-7).all(dim=0).any())


def test_refinement_batched_equals_one_at_a_time(sam):
    """Three images of one size refined together give each what it gets alone."""
    height, width, classes = 96, 128, 5
    maps = [coarse_maps(seed, height, width, classes, 3, 0.2) for seed in (11, 12, 13)]
    probabilities = torch.stack([p for p, _ in maps])
    labels = torch.stack([label for _, label in maps])
    embeddings = torch.randn(3, WIDTH, 64, 64, generator=torch.Generator().manual_seed(7))
    input_size = sam_state(height, width, embeddings)["input_size"]
    setting = SamRefineSetting(0.2, minimal_area=30)
    together = sam_refine(sam, embeddings, probabilities, labels, input_size, setting)
    for b in range(3):
        alone = sam_refine(sam, embeddings[b : b + 1], probabilities[b : b + 1], labels[b : b + 1], input_size, setting)
        assert torch.equal(together[0][b], alone[0][0])
        assert (together[1][b] - alone[1][0]).abs().max().item() <= 1e-6
        assert bool(together[2][b]) == bool(alone[2][0])


def test_mask_prompt_embeddings_are_the_unbatched_prompt_encoder_calls(sam):
    """The batched dense embedding equals SAM's prompt encoder called on each unbatched
    (1 x 256 x 256) mask prompt, the authors' call, whose LayerNorm2d normalises over height."""
    from clipdiy.segmentation.models.sam_decoder import mask_prompt_embeddings

    masks = torch.rand(3, 256, 256, generator=torch.Generator().manual_seed(0)) * 0.005
    together = mask_prompt_embeddings(sam.prompt_encoder, masks)
    for k in range(3):
        _, dense = sam.prompt_encoder(points=None, boxes=None, masks=masks[k : k + 1])
        assert dense.shape == (WIDTH, 64, 64)
        assert (together[k] - dense).abs().max().item() <= 1e-6


def grid_decision(logits: torch.Tensor, threshold: float):
    """A coarse decision as Trident's (softmax over classes at a sharp scale, under ``threshold``
    to background) of B x C x h x w logits already at the photo's size."""
    probabilities = (40.0 * logits).softmax(dim=1)
    top, labels = probabilities.max(dim=1)
    return probabilities, labels.masked_fill(top < threshold, 0)


def banded_against_whole(sam, seed, batch, height, width, classes, cells, band_rows, coarse_thresh):
    """(whole, banded) refinements of B photos whose class logits are a cells-grid upsampled to
    H x W: the whole photo as Trident runs it untiled (F.interpolate, then sam_refine), and
    refine_in_bands asking the same decision of bilinear_region's rows of the grid. Returns the
    whole path's coarse probabilities, its (labels, scores, refined), the banded (coarse
    probabilities, labels, scores), and each path's regions."""
    from clipdiy.segmentation import sam_refine as refine_module
    from clipdiy.segmentation.sam_refine import refine_in_bands
    from clipdiy.segmentation.tiles import bilinear_region

    generator = torch.Generator().manual_seed(seed)
    grid = torch.randn(batch, classes, cells, max(2, cells * width // height), generator=generator) * 0.03
    embeddings = torch.randn(batch, WIDTH, 64, 64, generator=generator)
    input_size = sam_state(height, width, embeddings)["input_size"]
    setting = SamRefineSetting(coarse_thresh, minimal_area=20)
    regions, original = [], refine_module.decode_regions

    def captured(sam, embeddings, found, *args):
        regions.append(found)
        return original(sam, embeddings, found, *args)

    def coarse_rows(r0, r1):
        assert 0 <= r0 < r1 <= height
        return grid_decision(bilinear_region(grid, (height, width), (r0, r1), (0, width)), coarse_thresh)

    probabilities, labels = grid_decision(F.interpolate(grid, (height, width), mode="bilinear", align_corners=False), coarse_thresh)
    refine_module.decode_regions = captured
    try:
        whole = sam_refine(sam, embeddings, probabilities, labels, input_size, setting)
        whole_regions = regions.pop() if regions else None
        bands = list(refine_in_bands(sam, embeddings, coarse_rows, batch, classes, (height, width), input_size, setting, band_rows))
        banded_regions = regions.pop() if regions else None
    finally:
        refine_module.decode_regions = original
    assert [(r0, r1) for r0, r1, *_ in bands] == [(r, min(height, r + band_rows)) for r in range(0, height, band_rows)]
    banded = tuple(torch.cat([band[i] for band in bands], dim=-2) for i in (2, 3, 4))  # coarse probabilities, labels, scores
    return probabilities, whole, banded, (whole_regions, banded_regions)


def same_regions_up_to_tied_points(probabilities, found) -> bool:
    """Both paths found the same regions (classes, boxes, pixels), and each region's point is the
    same pixel or a tie to float rounding: its class's half-resolution probability (the whole
    path's) at the two points within 1e-6. Returns whether every point is the same pixel.

    A point is the first maximum of its class's half-resolution map. Where the resize makes a run
    of equal values (along a photo's border) and that run holds the maximum, PyTorch's kernel
    leaves rounding noise of an ulp on the run, and that noise picks the authors' point; the
    banded path's resize keeps the run exact (bilinear_region) and picks its first pixel. Either
    is a maximum of the class's map to float32 rounding."""
    whole, banded = found
    if whole is None or banded is None:
        assert whole is None and banded is None
        return True
    assert whole.pairs == banded.pairs and whole.image == banded.image and whole.klass == banded.klass and whole.box == banded.box
    assert np.array_equal(whole.region_map, banded.region_map)
    half = F.interpolate(probabilities, (probabilities.shape[-2] // 2, probabilities.shape[-1] // 2), mode="bilinear", align_corners=False)
    same = True
    for b, c, p, q in zip(whole.image, whole.klass, whole.point, banded.point):
        if p != q:
            same = False
            assert abs(half[b, c, p[1], p[0]].item() - half[b, c, q[1], q[0]].item()) <= 1e-6, (p, q)
    return same


@settings(max_examples=6, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    batch=st.integers(1, 2),
    height=st.integers(2, 140),
    width=st.integers(2, 140),
    classes=st.integers(2, 5),
    cells=st.integers(2, 5),
    band_rows=st.integers(1, 70),
    coarse_thresh=st.sampled_from([0.0, 0.25, 0.4]),
)
def test_refinement_in_bands_is_the_whole_photo_refinement(sam, seed, batch, height, width, classes, cells, band_rows, coarse_thresh):
    """refine_in_bands (the coarse maps asked a band of rows at a time, never whole) against
    sam_refine on the whole photo's maps. The coarse probabilities of the bands agree within 1e-6
    (a band's resize against the whole resize: float32 rounding), the regions are the same, and
    their points too but for ties to rounding (same_regions_up_to_tied_points). With the same
    points: the refined scores R within 1e-6, labels equal where R's top-2 margin (the coarse one
    where no class scores) exceeds 1e-4. As against the transcription, a pixel where a kept
    mask's logit is 0 to rounding may be gated differently (scored about P / 2 on one side, 0 on
    the other): at most 0.1 % of the pixels, left out of the comparison."""
    coarse, (labels, scores, _), (banded_coarse, banded_labels, banded_scores), found = banded_against_whole(
        sam, seed, batch, height, width, classes, cells, band_rows, coarse_thresh)
    assert (banded_coarse - coarse).abs().max().item() <= 1e-6
    assert banded_scores.shape == scores.shape and banded_labels.shape == labels.shape
    if same_regions_up_to_tied_points(coarse, found):  # else SAM got another point of a tie
        assert_same_refinement(coarse, scores, labels, banded_scores, banded_labels, coarse_thresh)


def assert_same_refinement(coarse, scores, labels, banded_scores, banded_labels, coarse_thresh):
    off = (banded_scores - scores).abs() > 1e-6
    gate = (torch.minimum(banded_scores, scores) == 0) & ((torch.maximum(banded_scores, scores) - coarse / 2).abs() <= 0.01 * coarse / 2)
    assert bool((gate | ~off).all()), (banded_scores - scores).abs()[off & ~gate].max()
    flips = off.any(dim=1)
    assert flips.float().mean().item() <= 1e-3
    scored = scores.sum(dim=1) > 0
    decided = torch.where(scored, margin_of(scores, 1), margin_of(coarse, 1)) > LABEL_MARGIN
    decided &= ~flips & ((coarse.amax(dim=1) - coarse_thresh).abs() > LABEL_MARGIN)
    assert torch.equal(banded_labels[decided], labels[decided])
    return decided


def test_refinement_in_bands_keeps_drops_and_moves_labels(sam):
    """Not vacuous: a case where SAM keeps masks and drops others, labels move, and many bands
    (of 7 rows, odd sizes: half rows and prompt rows cross the bands' edges) give the whole
    photo's refinement, every point the same."""
    coarse, (labels, scores, refined), (_, banded_labels, banded_scores), found = banded_against_whole(sam, 6444, 2, 124, 163, 5, 5, 7, 0.25)
    assert same_regions_up_to_tied_points(coarse, found)
    assert bool(refined.all())
    assert int((labels != coarse.argmax(dim=1)).sum()) > 0
    assert bool(((scores - coarse).abs() < 1e-7).all(dim=1).any())  # a dropped region's pixels
    decided = assert_same_refinement(coarse, scores, labels, banded_scores, banded_labels, 0.25)
    assert decided.float().mean().item() > 0.99


def margin_of(maps: torch.Tensor, dim: int) -> torch.Tensor:
    top2 = maps.topk(2, dim=dim).values
    return top2.select(dim, 0) - top2.select(dim, 1)
