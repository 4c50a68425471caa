"""``--saliency none`` is the paper's no-saliency ablation (SPEC 3.5): label = argmax of S itself.

The handcrafted colour CLIP (tests/handcrafted_models.py) gives grey crops a higher raw
background score than any colour's, so on a grey scene with coloured shapes background must win
the grey and the colours their shapes. Weighting by s = 1 (the old ``none``) zeroes background's
channel: it never wins, which this test catches.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from handcrafted_models import CLASS_NAMES, COLOURS, GREY, MeanColourClip
from PIL import Image, ImageDraw
from reference_clipdiy import CLIP_MEAN, CLIP_STD, reference_resize, reference_scores

from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
from clipdiy.segmentation.models.saliency import create_saliency_model
from clipdiy.segmentation.segmenter import Segmenter
from clipdiy.segmentation.vocabulary import Vocabulary, VocabularyClass

MARGIN = 1e-4


def scene() -> np.ndarray:
    """300 x 400 grey with a small red rectangle (left) and a small blue ellipse (right)."""
    image = Image.new("RGB", (400, 300), GREY)
    draw = ImageDraw.Draw(image)
    draw.rectangle([70, 100, 140, 200], fill=COLOURS["red"])
    draw.ellipse([260, 110, 340, 190], fill=COLOURS["blue"])
    return np.asarray(image)


def reference_encoder(clip: MeanColourClip):
    """``clip.encode_image`` for inputs normalised the reference's way (CLIP's mean and std)."""
    clip_mean, clip_std = torch.from_numpy(CLIP_MEAN).view(1, 3, 1, 1), torch.from_numpy(CLIP_STD).view(1, 3, 1, 1)
    own_mean, own_std = torch.tensor(clip.mean).view(1, 3, 1, 1), torch.tensor(clip.std).view(1, 3, 1, 1)
    return lambda pixels: clip.encode_image(((pixels * clip_std + clip_mean) - own_mean) / own_std)


@pytest.fixture()
def no_saliency_segmenter() -> Segmenter:
    config = SegmenterConfig(vocabulary="colours", saliency=SaliencyConfig(backend="none"), crop_batch_size=59)
    vocabulary = Vocabulary(name="colours", classes=tuple(VocabularyClass(name, (name,)) for name in CLASS_NAMES))
    return Segmenter(MeanColourClip(), create_saliency_model(config.saliency), vocabulary, config)


def test_background_wins_where_its_raw_score_is_highest(no_saliency_segmenter):
    image = scene()
    (result,) = no_saliency_segmenter.segment([image], return_probabilities=True)
    # Independent: the per-crop reference transcription of S (SPEC 1), then argmax and softmax of S.
    clip = MeanColourClip()
    text = clip.encode_text([f"a photo of a {name}" for name in CLASS_NAMES])
    scores = reference_scores(reference_resize(image), reference_encoder(clip), text)  # C x 256 x 256
    top2 = scores.topk(2, dim=0).values
    decided = (top2[0] - top2[1]) > MARGIN
    expected = scores.argmax(dim=0)
    labels = torch.from_numpy(result.probabilities.argmax(0))
    assert torch.equal(labels[decided], expected[decided])
    assert decided.float().mean() > 0.95
    torch.testing.assert_close(torch.from_numpy(result.probabilities), torch.softmax(scores, dim=0), atol=1e-5, rtol=0)
    # Background wins the grey, the colours their shapes (at the original resolution too).
    counts = np.bincount(result.label_map.ravel(), minlength=len(CLASS_NAMES))
    assert counts[CLASS_NAMES.index("background")] > 0.3 * result.label_map.size
    assert result.label_map[5, 5] == CLASS_NAMES.index("background")
    assert result.label_map[150, 105] == CLASS_NAMES.index("red")
    assert counts[CLASS_NAMES.index("blue")] > 0
    assert result.foreground_fraction == 1.0  # the ablation has no saliency map: all foreground


def test_every_class_keeps_its_own_score_without_saliency():
    """fuse without saliency is softmax(S): background's channel is not zeroed."""
    from clipdiy.segmentation.methods.clipdiy import fuse

    scores = torch.tensor([[[[0.9]], [[0.2]], [[0.3]]]])  # 1 x 3 x 1 x 1: background highest
    assert fuse(scores, None).argmax(dim=1).item() == 0
    torch.testing.assert_close(fuse(scores, None), F.softmax(scores, dim=1))
    ones = torch.ones(1, 1, 1, 1)
    assert fuse(scores, ones).argmax(dim=1).item() != 0  # what weighting by s = 1 would do
    assert create_saliency_model(SaliencyConfig(backend="none")).weights_scores is False
