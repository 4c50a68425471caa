"""Bad and unusual images at the library boundary: they work, or fail with a clear error."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from clipdiy.errors import InvalidImageError
from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
from clipdiy.segmentation.images import to_rgb_uint8
from clipdiy.segmentation.segmenter import Segmenter
from clipdiy.segmentation.vocabulary import load_vocabulary
from handcrafted_models import CLASS_NAMES, MeanColourClip, NotGreySaliency


def _reopened(image: Image.Image, format: str, **save) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **save)
    buffer.seek(0)
    return Image.open(buffer)


def test_rgb_passes_through_unchanged():
    array = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(array)), array)
    np.testing.assert_array_equal(to_rgb_uint8(array), array)


def test_grayscale_and_palette_and_rgba():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    np.testing.assert_array_equal(to_rgb_uint8(Image.fromarray(grey)), np.repeat(grey[:, :, None], 3, 2))
    np.testing.assert_array_equal(to_rgb_uint8(grey[:, :, None]), np.repeat(grey[:, :, None], 3, 2))
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0
    assert (to_rgb_uint8(Image.fromarray(rgba, "RGBA"))[..., 0] == 200).all()
    assert (to_rgb_uint8(rgba)[..., 0] == 200).all()
    palette = Image.fromarray(np.full((3, 4, 3), (10, 20, 30), np.uint8)).convert("P", palette=Image.Palette.ADAPTIVE)
    assert (to_rgb_uint8(palette) == (10, 20, 30)).all()


def test_sixteen_bit_png_is_scaled_not_clipped():
    array = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    image = _reopened(Image.fromarray(array), "PNG")
    assert image.mode.startswith("I")
    out = to_rgb_uint8(image)
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 255, 128])
    np.testing.assert_array_equal(to_rgb_uint8(array)[0, :, 1], [0, 1, 255, 128])


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # red in CMYK
    out = to_rgb_uint8(_reopened(cmyk, "JPEG", quality=95))
    assert out.shape == (8, 16, 3)
    assert out[..., 0].mean() > 200 and out[..., 1].mean() < 60


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated = _reopened(image, "JPEG", exif=exif)
    assert to_rgb_uint8(rotated).shape == (40, 20, 3)


def test_float_and_bool_arrays():
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[0.0, 1.0]]))[0, :, 0], [0, 255])
    np.testing.assert_array_equal(to_rgb_uint8(np.array([[False, True]]))[0, :, 2], [0, 255])


@pytest.mark.parametrize(
    "bad, kind, message",
    [
        (np.zeros((0, 5, 3), np.uint8), "empty", "empty"),
        (np.zeros((4, 4, 2), np.uint8), "unsupported", "shape"),
        (np.zeros((2, 2, 2, 3), np.uint8), "unsupported", "shape"),
        (np.full((2, 2, 3), 2.0), "unsupported", r"\[0, 1\]"),
        (np.full((2, 2, 3), np.nan), "unsupported", "NaN"),
        (np.full((2, 2, 3), -1, np.int32), "unsupported", "outside"),
        (np.zeros((2, 2, 3), np.complex64), "unsupported", "dtype"),
        ("not an image", "unsupported", "PIL image or a numpy array"),
    ],
)
def test_unusable_input_gives_a_clear_error(bad, kind, message):
    with pytest.raises(InvalidImageError, match=message) as caught:
        to_rgb_uint8(bad)
    assert caught.value.kind == kind


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "colours.txt"
    path.write_text("\n".join(CLASS_NAMES))
    config = SegmenterConfig(vocabulary=str(path), saliency=SaliencyConfig(backend="not-grey"))
    return Segmenter(MeanColourClip(), NotGreySaliency(), load_vocabulary(str(path)), config)


def test_odd_images_segment_at_their_own_size(segmenter):
    images = [
        np.full((1, 1, 3), 200, np.uint8),  # smaller than any crop
        np.full((3, 2000), 128, np.uint8),  # very wide grayscale
        Image.new("RGBA", (30, 50), (230, 30, 30, 128)),
        Image.new("CMYK", (33, 17)),
        np.full((20, 30), 40000, np.uint16),
    ]
    results = segmenter.segment(images)
    assert [r.label_map.shape for r in results] == [(1, 1), (3, 2000), (50, 30), (17, 33), (20, 30)]
    for result in results:
        assert result.label_map.dtype == np.uint16
        assert result.label_map.max() < len(CLASS_NAMES)


def test_a_bad_image_in_a_batch_is_named(segmenter):
    with pytest.raises(InvalidImageError, match="image 1: ") as caught:
        segmenter.segment([np.zeros((4, 4, 3), np.uint8), np.zeros((0, 4, 3), np.uint8)])
    assert caught.value.kind == "empty"
