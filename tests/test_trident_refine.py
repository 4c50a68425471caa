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
