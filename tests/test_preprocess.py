"""The model-resolution resize (OpenCV) and the batched PIL-exact bicubic (clipdiy.segmentation.preprocess)."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipdiy.segmentation.preprocess import (
    _MAX_SPLIT_TAPS,
    _max_taps,
    crop_grid,
    crops_per_image,
    exact_resize_dtype,
    model_input_size,
    pil_bicubic_coefficients,
    pil_bicubic_resize,
    resize_for_model,
)


def pil_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """h x w x 3 uint8 -> height x width x 3 uint8 through PIL's BICUBIC."""
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def ours(images: np.ndarray, size: int, dtype: torch.dtype | None = None) -> np.ndarray:
    """B x h x w x 3 uint8 -> B x size x size x 3 uint8 through pil_bicubic_resize."""
    batch = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    return pil_bicubic_resize(batch, size, dtype=dtype).permute(0, 2, 3, 1).numpy()


EXACT_DTYPES = [pytest.param(torch.float64, id="float64"), pytest.param(torch.float32, id="float32-split")]


def test_hard_edges_overshoot():
    """The test inputs include values that make the cubic's negative lobes overshoot 0..255."""
    rng = np.random.default_rng(0)
    edges = _hard_edges(rng, 1, 64)
    out = pil_resize(edges[0], 224, 224)
    assert (out == 0).any() and (out == 255).any()


def _hard_edges(rng: np.random.Generator, batch: int, size: int) -> np.ndarray:
    """B x size x size x 3 uint8 blocks of 0 and 255: the kernel overshoots, so clipping matters."""
    blocks = rng.integers(0, 2, size=(batch, (size + 3) // 4, (size + 3) // 4, 3), dtype=np.uint8) * 255
    return np.repeat(np.repeat(blocks, 4, axis=1), 4, axis=2)[:, :size, :size]


@pytest.mark.parametrize(
    "in_size",
    [1, 2, 3, 5, 17, 31, 63, 64, 65, 97, 127, 128, 129, 200, 223, 224, 225, 255, 256, 257, 333, 448, 512],
)
@pytest.mark.parametrize("out_size", [224, 37])
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_bicubic_is_pil_exact_on_square_inputs(in_size, out_size, dtype):
    rng = np.random.default_rng(in_size * 1000 + out_size)
    noise = rng.integers(0, 256, size=(3, in_size, in_size, 3), dtype=np.uint8)
    images = np.concatenate([noise, _hard_edges(rng, 2, in_size)])
    if dtype == torch.float32 and _max_taps(in_size, out_size) > _MAX_SPLIT_TAPS:
        with pytest.raises(ValueError, match="not exact"):
            ours(images, out_size, dtype)
        return
    expected = np.stack([pil_resize(image, out_size, out_size) for image in images])
    np.testing.assert_array_equal(ours(images, out_size, dtype), expected)


@pytest.mark.parametrize("height,width", [(1, 300), (50, 300), (64, 100), (100, 101), (224, 500), (17, 31)])
@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_bicubic_is_pil_exact_on_non_square_inputs_whose_height_is_not_reduced(height, width, dtype):
    # Pillow >= 13 runs the vertical pass first for some shapes whose height shrinks; where the
    # height is not reduced every Pillow runs the horizontal pass first, as we always do.
    rng = np.random.default_rng(height * 7 + width)
    images = rng.integers(0, 256, size=(2, height, width, 3), dtype=np.uint8)
    if dtype == torch.float32 and max(_max_taps(width, 224), _max_taps(height, 224)) > _MAX_SPLIT_TAPS:
        with pytest.raises(ValueError, match="not exact"):
            ours(images, 224, dtype)
        return
    expected = np.stack([pil_resize(image, 224, 224) for image in images])
    np.testing.assert_array_equal(ours(images, 224, dtype), expected)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
def test_bicubic_is_pil_exact_on_real_photo_crops(coco_images, dtype):
    """The crops CLIP-DIY cuts (64, 128, 256 px, at stride p/2) of real photos, resized to 224."""
    for path in coco_images[:4]:
        image = resize_for_model(np.asarray(Image.open(path).convert("RGB")), "faithful")
        for patch in (64, 128, 256):
            stride = patch // 2
            crops = np.stack(
                [
                    image[top : top + patch, left : left + patch]
                    for top in range(0, 256 - patch + 1, stride)
                    for left in range(0, 256 - patch + 1, stride)
                ]
            )
            expected = np.stack([pil_resize(crop, 224, 224) for crop in crops])
            np.testing.assert_array_equal(ours(crops, 224, dtype), expected, err_msg=f"{path.name} p={patch}")


def test_torch_bicubic_is_not_pil(coco_images):
    """Why the PIL-exact resize exists: torch's bicubic (antialiased or not) differs from PIL."""
    image = resize_for_model(np.asarray(Image.open(coco_images[0]).convert("RGB")), "faithful")
    crop = np.ascontiguousarray(image[:64, :64])
    expected = pil_resize(crop, 224, 224)
    batch = torch.from_numpy(crop).permute(2, 0, 1)[None].float()
    for antialias in (False, True):
        theirs = F.interpolate(batch, size=(224, 224), mode="bicubic", align_corners=False, antialias=antialias)
        theirs = theirs.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
        assert (theirs != expected).mean() > 0.01
    np.testing.assert_array_equal(ours(crop[None], 224)[0], expected)


def test_bicubic_keeps_batch_shape_dtype_and_identity():
    images = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8)
    assert torch.equal(pil_bicubic_resize(images, 224), images)
    out = pil_bicubic_resize(images[:, :1, :64, :64], 100)
    assert out.shape == (4, 1, 100, 100) and out.dtype == torch.uint8 and out.is_contiguous()


def test_bicubic_coefficients_are_pils_fixed_point():
    # Each output's weights sum to one in 22-bit fixed point (up to the rounding of each tap).
    for in_size, out_size in ((64, 224), (256, 224), (333, 37)):
        weights = pil_bicubic_coefficients(in_size, out_size)
        assert weights.shape == (out_size, in_size)
        taps = (weights != 0).sum(axis=1)
        assert np.all(np.abs(weights.sum(axis=1) - (1 << 22)) <= taps)


def test_float32_split_is_chosen_only_on_cuda_and_where_exact():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert exact_resize_dtype(cpu, 64, 64, 224) == torch.float64
    assert exact_resize_dtype(cuda, 64, 64, 224) == torch.float32
    assert exact_resize_dtype(cuda, 256, 256, 224) == torch.float32
    assert exact_resize_dtype(cuda, 2000, 2000, 224) == torch.float64  # 9x shrink: too many taps
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # bfloat16 GEMM operands: not exact
        assert exact_resize_dtype(cuda, 64, 64, 224) == torch.float64
    finally:
        torch.set_float32_matmul_precision(previous)


def test_bicubic_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        pil_bicubic_resize(torch.zeros(1, 3, 8, 8), 4)
    with pytest.raises(ValueError, match="uint8"):
        pil_bicubic_resize(torch.zeros(3, 8, 8, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="positive"):
        pil_bicubic_resize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 0)
    with pytest.raises(ValueError, match="dtype"):
        pil_bicubic_resize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 4, dtype=torch.float16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bicubic_is_exact_on_cuda():
    rng = np.random.default_rng(1)
    for size in (64, 128, 256, 97):
        images = torch.from_numpy(rng.integers(0, 256, size=(8, 3, size, size), dtype=np.uint8))
        cpu = pil_bicubic_resize(images, 224)
        for dtype in (None, torch.float32, torch.float64):
            gpu = pil_bicubic_resize(images.cuda(), 224, dtype=dtype)
            assert gpu.device.type == "cuda"
            assert torch.equal(gpu.cpu(), cpu), dtype
    previous = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True  # the split must stay exact under TF32
        gpu = pil_bicubic_resize(images.cuda(), 224, dtype=torch.float32)
        assert torch.equal(gpu.cpu(), pil_bicubic_resize(images, 224))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def test_faithful_resize_is_opencv_bilinear(coco_images):
    for path in coco_images[:4]:
        image = np.asarray(Image.open(path).convert("RGB"))
        out = resize_for_model(image, "faithful")
        assert out.shape == (256, 256, 3) and out.dtype == np.uint8
        np.testing.assert_array_equal(out, cv2.resize(image, (256, 256), interpolation=cv2.INTER_LINEAR))


def test_faithful_resize_is_not_pil_bilinear(coco_images):
    """SPEC 1.1: PIL's (antialiased) bilinear is a different resize."""
    image = np.asarray(Image.open(coco_images[0]).convert("RGB"))
    pil = np.asarray(Image.fromarray(image).resize((256, 256), Image.BILINEAR))
    assert (resize_for_model(image, "faithful") != pil).mean() > 0.05


@pytest.mark.parametrize(
    "height,width,expected",
    [(480, 640, (256, 341)), (640, 480, (341, 256)), (256, 256, (256, 256)), (100, 50, (512, 256)), (300, 1200, (256, 1024)), (3, 2000, (256, 1024)), (900, 60, (1024, 256))],
)
def test_aspect_resize_keeps_the_aspect_ratio(height, width, expected):
    image = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    assert model_input_size(height, width, "aspect") == expected
    out = resize_for_model(image, "aspect")
    assert out.shape == (*expected, 3)
    np.testing.assert_array_equal(out, cv2.resize(image, expected[::-1], interpolation=cv2.INTER_LINEAR))


def test_resize_for_model_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        resize_for_model(np.zeros((10, 10, 3), np.uint8), "squash")
    with pytest.raises(ValueError, match="uint8"):
        resize_for_model(np.zeros((10, 10, 3), np.float32), "faithful")
    with pytest.raises(ValueError, match="H x W x 3"):
        resize_for_model(np.zeros((10, 10), np.uint8), "faithful")


def test_crop_grid_geometry():
    assert [crop_grid(256, 256, p) for p in (256, 128, 64)] == [(1, 1), (3, 3), (7, 7)]
    assert crops_per_image(256, 256, (256, 128, 64)) == 59
    assert [crop_grid(256, 341, p) for p in (256, 128, 64)] == [(1, 1), (3, 4), (7, 9)]
    with pytest.raises(ValueError, match="smaller"):
        crop_grid(200, 300, 256)
    with pytest.raises(ValueError, match="even"):
        crop_grid(256, 256, 63)
