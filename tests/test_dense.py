"""DenseScorer (clipdiy.segmentation.dense) against the per-crop reference transcription (tests/reference_clipdiy.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from reference_clipdiy import reference_scores

from clipdiy.segmentation.dense import CLIP_MEAN, CLIP_STD, DenseScorer, cut_crops
from clipdiy.segmentation.preprocess import resize_for_model


class ProjectionEncoder:
    """A cheap, position-sensitive stand-in for CLIP's image tower.

    B x 3 x 224 x 224 -> B x 32: 8 x 8 average pooling, then a fixed random linear map. Any
    mistake in crop position, resize, normalisation or ordering changes its output. Counts the
    crops it sees.
    """

    def __init__(self, seed: int = 0, dim: int = 32):
        gen = torch.Generator().manual_seed(seed)
        self.projection = torch.randn(3 * 8 * 8, dim, generator=gen, dtype=torch.float64)
        self.crops_seen = 0
        self.calls = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.crops_seen += pixels.shape[0]
        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(pixels.double(), 8).flatten(1)
        return (pooled @ self.projection.to(pixels.device)).float()


def random_text(classes: int = 6, dim: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed))


def load_rgb(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def to_batch(images: list[np.ndarray]) -> torch.Tensor:
    """h x w x 3 uint8 arrays -> B x 3 x h x w uint8."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.parametrize("height,width", [(256, 256), (256, 341), (300, 256)])
@pytest.mark.parametrize("patch", [256, 128, 64])
def test_cut_crops_are_the_strided_windows(height, width, patch):
    images = torch.randint(0, 256, (2, 3, height, width), dtype=torch.uint8)
    crops = cut_crops(images, patch)
    stride = patch // 2
    windows = [
        images[b, :, top : top + patch, left : left + patch]
        for b in range(2)
        for top in range(0, height - patch + 1, stride)
        for left in range(0, width - patch + 1, stride)
    ]
    assert crops.shape == (len(windows), 3, patch, patch)
    assert torch.equal(crops, torch.stack(windows))


@pytest.mark.parametrize("height,width,per_image", [(256, 256, 59), (256, 341, 1 + 12 + 63), (341, 256, 1 + 12 + 63)])
def test_crop_count(height, width, per_image):
    encoder = ProjectionEncoder()
    scorer = DenseScorer(encoder, random_text(), crop_batch_size=50)
    assert scorer.crops_per_image(height, width) == per_image
    maps = scorer(torch.randint(0, 256, (3, 3, height, width), dtype=torch.uint8))
    assert maps.shape == (3, 6, height, width) and maps.dtype == torch.float32
    assert encoder.crops_seen == 3 * per_image
    assert encoder.calls == -(-3 * per_image // 50)  # full chunks across scales and images


def test_matches_reference_faithful(coco_images):
    images = [resize_for_model(load_rgb(path), "faithful") for path in coco_images[:3]]
    encoder = ProjectionEncoder()
    text = random_text()
    maps = DenseScorer(encoder, text, crop_batch_size=64)(to_batch(images))
    for image, batched in zip(images, maps):
        expected = reference_scores(image, encoder, text)
        assert (batched - expected).abs().max().item() <= 1e-5
    assert len(maps.argmax(dim=1).unique()) >= 3  # the comparison is not between flat maps


def test_matches_reference_aspect(coco_images):
    """Aspect mode: a 480 x 640 photo becomes 256 x 341, with 3 x 4 and 7 x 9 crop grids."""
    landscape = [p for p in coco_images if Image.open(p).size == (640, 480)][:2]
    assert len(landscape) == 2
    images = [resize_for_model(load_rgb(path), "aspect") for path in landscape]
    assert images[0].shape == (256, 341, 3)
    encoder = ProjectionEncoder()
    text = random_text()
    maps = DenseScorer(encoder, text)(to_batch(images))
    assert maps.shape == (2, 6, 256, 341)
    for image, batched in zip(images, maps):
        expected = reference_scores(image, encoder, text)
        assert (batched - expected).abs().max().item() <= 1e-5


def test_chunking_does_not_change_the_maps(coco_images):
    images = to_batch([resize_for_model(load_rgb(path), "faithful") for path in coco_images[3:5]])
    text = random_text()
    reference = DenseScorer(ProjectionEncoder(), text, crop_batch_size=256)(images)
    for chunk in (1, 7, 59, 100):
        maps = DenseScorer(ProjectionEncoder(), text, crop_batch_size=chunk)(images)
        assert (maps - reference).abs().max().item() <= 1e-6, chunk


def test_chunking_does_not_change_the_maps_of_a_transformer(coco_images, tiny_clip_config):
    from clipdiy.segmentation.models.clip import create_clip_model

    clip = create_clip_model(tiny_clip_config)
    text = clip.encode_text(["a photo of a cat", "a photo of a dog", "a photo of a car"])
    images = to_batch([resize_for_model(load_rgb(path), "faithful") for path in coco_images[5:7]])
    small = DenseScorer(clip.encode_image, text, crop_batch_size=7)(images)
    large = DenseScorer(clip.encode_image, text, crop_batch_size=256)(images)
    assert (small - large).abs().max().item() <= 1e-5


def test_scale_maps_are_averaged_and_the_whole_image_scale_is_constant():
    """With only the 256 px scale, S is the one crop's score everywhere (SPEC 1.7)."""
    encoder = ProjectionEncoder()
    text = random_text()
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    whole = DenseScorer(encoder, text, patch_sizes=(256,))(images)[0]
    assert torch.allclose(whole, whole[:, :1, :1].expand_as(whole))
    per_scale = [DenseScorer(encoder, text, patch_sizes=(p,))(images) for p in (256, 128, 64)]
    mean = DenseScorer(encoder, text)(images)
    assert torch.allclose(mean, sum(per_scale) / 3, atol=1e-6)


def test_normalisation_and_cosine():
    """Features and text are L2-normalised: scores are cosines, whatever the encoder's scale."""
    encoder = ProjectionEncoder()
    text = random_text()
    images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
    maps = DenseScorer(encoder, text)(images)
    scaled = DenseScorer(lambda x: 5.0 * encoder(x), 3.0 * text)(images)
    assert torch.allclose(maps, scaled, atol=1e-6)
    assert maps.abs().max() <= 1.0 + 1e-6
    assert DenseScorer(encoder, text, mean=CLIP_MEAN, std=CLIP_STD).mean == tuple(CLIP_MEAN)


def test_rejects_bad_input():
    scorer = DenseScorer(ProjectionEncoder(), random_text())
    with pytest.raises(ValueError, match="smaller"):
        scorer(torch.zeros(1, 3, 200, 300, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        scorer(torch.zeros(1, 3, 256, 256))
    with pytest.raises(ValueError, match="C x D"):
        DenseScorer(ProjectionEncoder(), torch.zeros(5))
    with pytest.raises(ValueError, match="even"):
        DenseScorer(ProjectionEncoder(), random_text(), patch_sizes=(255,))
    with pytest.raises(ValueError, match="crop_batch_size"):
        DenseScorer(ProjectionEncoder(), random_text(), crop_batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stays_on_the_device_and_matches_cpu():
    images = torch.randint(0, 256, (2, 3, 256, 256), dtype=torch.uint8)
    text = random_text()
    cpu = DenseScorer(ProjectionEncoder(), text)(images)
    gpu = DenseScorer(ProjectionEncoder(), text)(images.cuda())
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_matches_per_crop_reference_with_random_vitb32(coco_images, vitb32_clip_config):
    """The real architecture, one CLIP forward per crop in the reference, batched here."""
    from clipdiy.segmentation.models.clip import create_clip_model
    from clipdiy.segmentation.vocabulary import load_vocabulary

    clip = create_clip_model(vitb32_clip_config)
    vocabulary = load_vocabulary("voc")
    text = clip.encode_text([f"a photo of a {name}" for name in vocabulary.class_names])
    images = [resize_for_model(load_rgb(path), "faithful") for path in coco_images[:2]]
    maps = DenseScorer(clip.encode_image, text)(to_batch(images))
    plain_forward = clip.model.encode_image  # open_clip's full forward, as the reference runs it
    winners = set()
    for image, batched in zip(images, maps):
        expected = reference_scores(image, plain_forward, text)
        assert (batched - expected).abs().max().item() <= 1e-4
        winners |= set(expected.argmax(dim=0).unique().tolist())
    assert len(winners) >= 3, "random CLIP is degenerate: the comparison would prove little"
