"""The batched Segmenter against the per-crop reference transcription of SPEC 1-3, on real photos.

Every other one of the 32 COCO photos (16 photos, 11 distinct sizes) goes through
``Segmenter.segment`` with a random-init, discriminative ViT-B-32 (SPEC 6) and a content-dependent
saliency map; every photo also goes through ``tests/reference_clipdiy.py`` one crop at a time.
Score maps, probabilities and label maps must agree. Half the sample keeps the test's time in
bounds (the whole of it took 99 s on 2 cores); the photos left out add sizes, not code paths. A
second test runs the real FOUND head on a random ViT-S/8 through the segmenter's saliency path.

Cost: the reference's CLIP calls are answered from a memo of the batched run's forwards, keyed by
the crop's 8-bit pixels, so ViT-B-32 runs once per distinct crop (59 per photo) instead of twice.
That is sound because the memo only answers a crop whose 8-bit content is bit-identical to one the
segmenter fed CLIP, and the test asserts that every one of the reference's 944 crops is (which
alone proves cropping, the PIL-exact resize and the normalisation identical). CLIP's own
batch-size invariance is checked with real per-crop forwards in tests/test_dense.py.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from reference_clipdiy import reference_resize, reference_segment

from clipdiy.segmentation.config import SegmenterConfig
from clipdiy.segmentation.segmenter import Segmenter

SCORE_TOLERANCE = 1e-4
BATCH = 8  # images per segment() call
PHOTOS = 16  # every other photo of the 32


class MemoEncoder:
    """``encode_image`` that runs CLIP once per distinct 8-bit crop and counts hits and misses."""

    def __init__(self, encode_image, mean, std):
        self.encode_image = encode_image
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self.features: dict[bytes, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0

    def keys(self, pixels: torch.Tensor) -> list[bytes]:
        """The 8-bit crop behind each normalised B x 3 x S x S input, as a digest."""
        values = (pixels.detach().float().cpu() * self.std + self.mean) * 255.0
        rounded = values.round()
        drift = (values - rounded).abs().max().item()
        assert drift < 1e-3, f"CLIP input is not an 8-bit crop normalised with CLIP's mean/std ({drift})"
        crops = rounded.clamp(0, 255).to(torch.uint8).numpy()
        return [hashlib.blake2b(crop.tobytes(), digest_size=16).digest() for crop in crops]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        keys = self.keys(pixels)
        missing = [i for i, key in enumerate(keys) if key not in self.features]
        if missing:
            computed = self.encode_image(pixels[missing])
            for i, feature in zip(missing, computed):
                self.features[keys[i]] = feature
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        return torch.stack([self.features[key] for key in keys])


class MemoClip:
    """A ClipModel whose ``encode_image`` is memoised; everything else is the model's."""

    def __init__(self, clip):
        self.clip = clip
        self.encode_image = MemoEncoder(clip.encode_image, clip.mean, clip.std)

    def __getattr__(self, name):
        return getattr(self.clip, name)


class LuminanceSaliency(torch.nn.Module):
    """A deterministic, image-dependent stand-in for FOUND: foreground = brighter than average.

    B x 3 x H x W in [0, 1] -> B x 1 x H x W in (0, 1), varied enough that background wins in
    some places and object classes in others.
    """

    name = "luminance-test"
    weights_id = None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        luminance = (images * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
        return torch.sigmoid(12.0 * (luminance - luminance.mean(dim=(2, 3), keepdim=True)))


@dataclass
class Comparison:
    name: str
    scores: tuple[torch.Tensor, torch.Tensor]  # batched, reference: C x 256 x 256
    probabilities: tuple[torch.Tensor, torch.Tensor]
    labels: tuple[torch.Tensor, torch.Tensor]  # 256 x 256
    label_maps: tuple[torch.Tensor, torch.Tensor]  # H x W
    saliency: tuple[torch.Tensor, torch.Tensor]  # 256 x 256
    margin: torch.Tensor  # reference top-1 minus top-2 logit, 256 x 256


def load_rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def reference_saliency(saliency_model, rgb: np.ndarray) -> np.ndarray:
    """The saliency map of one H x W x 3 uint8 image at its own resolution (SPEC 2), H x W."""
    with torch.no_grad():
        pixels = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 255.0
        return saliency_model(pixels)[0, 0].float().numpy()


def run_both(segmenter: Segmenter, clip, saliency_model, images: list[np.ndarray], names: list[str]) -> list[Comparison]:
    """Segment ``images`` in batches, then each image alone through the reference."""
    memo: MemoEncoder = segmenter.clip.encode_image
    text = clip.encode_text([f"a photo of a {name}" for name in segmenter.class_names])  # SPEC 1.5
    assert torch.allclose(text, segmenter.text_embeddings.cpu(), atol=1e-6)
    comparisons = []
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        results = segmenter.segment(batch, return_probabilities=True)
        resized = torch.from_numpy(np.stack([reference_resize(image) for image in batch])).permute(0, 3, 1, 2)
        misses_before = memo.misses
        scores = segmenter.scorer(resized.contiguous())  # S of the same batch, from the memo
        assert memo.misses == misses_before, "the score-map pass cut crops that segment() did not"
        for offset, (image, result) in enumerate(zip(batch, results)):
            misses_before = memo.misses
            expected = reference_segment(image, memo, text, reference_saliency(saliency_model, image))
            assert memo.misses == misses_before, "a reference crop differs from every crop the segmenter made"
            log_p = expected["probabilities"].clamp_min(1e-30).log()
            top2 = log_p.topk(2, dim=0).values
            s_ref = torch.from_numpy(reference_saliency(saliency_model, image))[None, None]
            s_ref = F.interpolate(s_ref, size=(256, 256), mode="bilinear", align_corners=False)
            comparisons.append(
                Comparison(
                    name=names[start + offset],
                    scores=(scores[offset].cpu(), expected["scores"]),
                    probabilities=(torch.from_numpy(result.probabilities), expected["probabilities"]),
                    labels=(torch.from_numpy(result.probabilities.argmax(0)), expected["labels"]),
                    label_maps=(torch.from_numpy(result.label_map.astype(np.int64)), expected["label_map"]),
                    saliency=(torch.from_numpy(result.saliency), s_ref[0, 0]),
                    margin=top2[0] - top2[1],
                )
            )
    return comparisons


@pytest.fixture(scope="module")
def vitb32(vitb32_clip_config):
    from clipdiy.segmentation.models.clip import create_clip_model

    return create_clip_model(vitb32_clip_config)


@pytest.fixture(scope="module")
def all_photos(coco_images, vitb32):
    """Every other photo (16) through the batched segmenter and through the reference."""
    from clipdiy.segmentation.vocabulary import load_vocabulary

    assert len(coco_images) == 32
    photos = coco_images[::2]
    assert len(photos) == PHOTOS and len({Image.open(path).size for path in photos}) >= 10, "varied sizes"
    saliency = LuminanceSaliency()
    clip = MemoClip(vitb32)
    segmenter = Segmenter(clip, saliency, load_vocabulary("voc"), SegmenterConfig(vocabulary="voc", crop_batch_size=128))
    images = [load_rgb(path) for path in photos]
    comparisons = run_both(segmenter, vitb32, saliency, images, [p.name for p in photos])
    return comparisons, clip.encode_image


def max_diff(pair: tuple[torch.Tensor, torch.Tensor]) -> float:
    return (pair[0].float() - pair[1].float()).abs().max().item()


def assert_labels_agree(comparisons: list[Comparison]) -> None:
    compared = 0
    total = 0
    for c in comparisons:
        decided = c.margin > 2 * SCORE_TOLERANCE
        assert torch.equal(c.labels[0][decided], c.labels[1][decided]), c.name
        compared += int(decided.sum())
        total += decided.numel()
        # At the original resolution, through the demo's nearest resize (SPEC 3.4).
        size = tuple(c.label_maps[1].shape)
        decided_full = F.interpolate(decided[None, None].float(), size=size, mode="nearest")[0, 0].bool()
        assert torch.equal(c.label_maps[0][decided_full], c.label_maps[1][decided_full]), c.name
    # A random CLIP's classes are close (SPEC 6); most pixels must still be decided to compare.
    assert compared / total > 0.9, f"only {compared / total:.1%} of pixels have a clear winner"


@pytest.mark.slow
def test_every_reference_crop_is_a_crop_the_segmenter_made(all_photos):
    comparisons, memo = all_photos
    assert len(comparisons) == PHOTOS
    # Only segment() ran CLIP (run_both asserts that neither the reference nor the score-map pass
    # missed); both were answered by bit-identical crops, 59 per photo each.
    assert 0 < memo.misses <= 59 * PHOTOS
    assert memo.hits >= 2 * 59 * PHOTOS


@pytest.mark.slow
def test_score_maps_match_the_reference(all_photos):
    comparisons, _ = all_photos
    worst = max(max_diff(c.scores) for c in comparisons)
    assert worst <= SCORE_TOLERANCE


@pytest.mark.slow
def test_saliency_and_probabilities_match_the_reference(all_photos):
    comparisons, _ = all_photos
    assert max(max_diff(c.saliency) for c in comparisons) <= 1e-5
    assert max(max_diff(c.probabilities) for c in comparisons) <= SCORE_TOLERANCE


@pytest.mark.slow
def test_label_maps_match_the_reference(all_photos):
    comparisons, _ = all_photos
    assert_labels_agree(comparisons)


@pytest.mark.slow
def test_the_comparison_is_not_degenerate(all_photos):
    """SPEC 6: several classes win, and the saliency decides between background and objects."""
    comparisons, _ = all_photos
    winners = torch.zeros(21, dtype=torch.long)
    for c in comparisons:
        winners += torch.bincount(c.labels[1].flatten(), minlength=21)
    assert winners[0] > 0, "background never wins: the fusion is not exercised"
    assert int((winners[1:] > 0).sum()) >= 3, f"too few object classes win: {winners.tolist()}"
    assert winners.max() < 0.9 * winners.sum()


@pytest.mark.slow
def test_found_saliency_path_matches_the_reference(coco_images, vitb32, found_saliency_config):
    """The real FOUND head on a random ViT-S/8, through the segmenter's own saliency path, against
    FOUND transcribed independently (tests/reference_found.py) on the same backbone checkpoint.

    Photos are shrunk to ~1/3 (and odd sizes, not multiples of 8) so that DINO at full resolution
    stays cheap; the segmenter still upsamples them to 256 x 256.
    """
    from reference_found import ReferenceFound

    from clipdiy.segmentation.models.saliency import create_saliency_model
    from clipdiy.segmentation.vocabulary import load_vocabulary

    saliency = create_saliency_model(found_saliency_config)
    reference = ReferenceFound(
        found_saliency_config.backbone, found_saliency_config.backbone_checkpoint, found_saliency_config.head
    )
    clip = MemoClip(vitb32)
    segmenter = Segmenter(clip, saliency, load_vocabulary("voc"), SegmenterConfig(vocabulary="voc"))
    images = []
    for path in coco_images[:2]:
        image = Image.open(path).convert("RGB")
        images.append(np.asarray(image.resize((image.width // 3 + 1, image.height // 3 + 1), Image.BILINEAR)))
    comparisons = []
    for image, path in zip(images, coco_images[:2]):  # shapes differ: one segment() call each
        comparisons += run_both(segmenter, vitb32, reference, [image], [path.name])
    for c in comparisons:
        s_batched = c.saliency[0]
        assert max_diff(c.saliency) <= 1e-5, c.name
        assert 0.0 <= float(s_batched.min()) and float(s_batched.max()) <= 1.0
        assert max_diff(c.scores) <= SCORE_TOLERANCE
        assert max_diff(c.probabilities) <= SCORE_TOLERANCE
    assert_labels_agree(comparisons)
