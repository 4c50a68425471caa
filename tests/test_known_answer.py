"""A known-answer test of the method itself.

Random weights cannot show that crops, upsampling, averaging and fusion are wired right, so this
plugs a handcrafted image/text encoder pair into the real segmenter: an image crop is embedded by
its mean colour, a class name ("red", ...) by that colour, and a saliency map marks the pixels that
differ from the grey background. Synthetic scenes of coloured shapes must then be segmented with
mIoU >= 0.9 against their known masks.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
from clipdiy.segmentation.segmenter import Segmenter
from clipdiy.segmentation.vocabulary import load_vocabulary
from handcrafted_models import CLASS_NAMES, COLOURS, GREY, MeanColourClip, NotGreySaliency


def _scene(rng: np.random.Generator, width: int, height: int) -> tuple[Image.Image, np.ndarray]:
    """Grey image with 1-3 non-overlapping coloured shapes, and its ground-truth class map."""
    image = Image.new("RGB", (width, height), GREY)
    truth = Image.new("L", (width, height), 0)
    draw, draw_truth = ImageDraw.Draw(image), ImageDraw.Draw(truth)
    names = rng.permutation(list(COLOURS))[: rng.integers(1, 4)]
    columns = len(names)
    for slot, name in enumerate(names):
        left = slot * width // columns
        cell_w = width // columns
        w = int(cell_w * rng.uniform(0.45, 0.8))
        h = int(height * rng.uniform(0.35, 0.7))
        x0 = left + int(rng.integers(4, max(5, cell_w - w - 4)))
        y0 = int(rng.integers(4, max(5, height - h - 4)))
        box = [x0, y0, x0 + w, y0 + h]
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape_truth = draw_truth.ellipse if shape == draw.ellipse else draw_truth.rectangle
        shape(box, fill=COLOURS[name])
        shape_truth(box, fill=CLASS_NAMES.index(name))
    return image, np.asarray(truth)


def _miou(truths: list[np.ndarray], predictions: list[np.ndarray], classes: int) -> float:
    confusion = np.zeros((classes, classes), dtype=np.int64)
    for truth, prediction in zip(truths, predictions):
        confusion += np.bincount(truth.ravel() * classes + prediction.ravel(), minlength=classes**2).reshape(classes, classes)
    intersection = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    present = union > 0
    return float((intersection[present] / union[present]).mean())


@pytest.fixture()
def colour_segmenter(tmp_path):
    vocabulary_file = tmp_path / "colours.txt"
    vocabulary_file.write_text("\n".join(CLASS_NAMES) + "\n")
    config = SegmenterConfig(vocabulary=str(vocabulary_file), saliency=SaliencyConfig(backend="not-grey"), crop_batch_size=50)
    return Segmenter(MeanColourClip(), NotGreySaliency(), load_vocabulary(str(vocabulary_file)), config)


def test_coloured_shapes_are_segmented_right(colour_segmenter):
    rng = np.random.default_rng(7)
    sizes = [(320, 240), (256, 256), (500, 300), (200, 380), (640, 480), (300, 200)]
    scenes = [_scene(rng, w, h) for w, h in sizes]
    results = colour_segmenter.segment([image for image, _ in scenes])

    truths = [truth for _, truth in scenes]
    predictions = [result.label_map for result in results]
    for result, (image, truth) in zip(results, scenes):
        assert result.label_map.shape == truth.shape
        assert result.class_names == tuple(CLASS_NAMES)
    miou = _miou(truths, predictions, len(CLASS_NAMES))
    assert miou >= 0.9, f"mIoU {miou:.3f} on synthetic scenes"
    # Every colour that was drawn is found, and none that was not.
    for result, truth in zip(results, truths):
        assert set(result.present_classes().tolist()) == set(np.unique(truth).tolist())


def test_crops_go_through_clip_in_few_large_forwards(colour_segmenter):
    rng = np.random.default_rng(1)
    images = [_scene(rng, 320, 240)[0] for _ in range(4)]
    clip = colour_segmenter.clip
    clip.forwards = 0
    colour_segmenter.segment(images)
    # 4 images x 59 crops = 236 crops in chunks of 50: 5 forwards, not 236.
    assert clip.forwards == 5


def test_scores_and_masks_agree_with_label_map(colour_segmenter):
    rng = np.random.default_rng(3)
    image, truth = _scene(rng, 320, 240)
    (result,) = colour_segmenter.segment([image], return_probabilities=True)
    assert result.probabilities.shape == (len(CLASS_NAMES), 256, 256)
    np.testing.assert_allclose(result.probabilities.sum(axis=0), 1.0, atol=1e-5)
    np.testing.assert_allclose(result.class_scores, result.probabilities.mean(axis=(1, 2)), atol=1e-6)
    model_labels = result.probabilities.argmax(axis=0)
    for mask in result.masks():
        won = model_labels == mask.class_id
        assert mask.score == pytest.approx(float(result.probabilities[mask.class_id][won].mean()), abs=1e-4)
        assert mask.area == int((result.label_map == mask.class_id).sum())
    assert 0.0 < result.foreground_fraction < 1.0
    assert result.foreground_fraction == pytest.approx(float(result.saliency.mean()), abs=1e-6)
