"""Image resizing exactly as the reference CLIP-DIY pipeline does it (SPEC 1.1 and 1.3).

Two resizes matter for faithfulness:

* the whole image to the model resolution: OpenCV's fixed-point bilinear (``INTER_LINEAR``, no
  antialiasing) on the 8-bit image, as the reference decodes and resizes with OpenCV;
* every crop to CLIP's 224 x 224: PIL's ``Image.resize(..., BICUBIC)`` on the 8-bit crop. Torch's
  own bicubic (with or without antialias) is a different filter; :func:`pil_bicubic_resize`
  reproduces PIL bit for bit, batched, on any device.
"""

from __future__ import annotations

import functools
import math

import cv2
import numpy as np
import torch

from clipdiy.segmentation.config import ASPECT, FAITHFUL

#: Side of the model-resolution image (the reference squashes to 256 x 256).
MODEL_SIZE = 256
#: Aspect mode keeps ratios up to this (long side <= 4 x 256 = 1024 px).
MAX_ASPECT = 4

# PIL's 8-bit resampler: coefficients in fixed point with 22 fractional bits (32 - 8 - 2: 8 bits of
# pixel, 2 bits of headroom for the negative lobes of the kernel), accumulated in int32 from a
# rounding offset of one half, then clipped to 0..255 after each pass.
_PRECISION_BITS = 22
_BICUBIC_A = -0.5
_BICUBIC_SUPPORT = 2.0


def model_input_size(height: int, width: int, mode: str) -> tuple[int, int]:
    """(height, width) that :func:`resize_for_model` gives an ``height x width`` image."""
    if mode == FAITHFUL:
        return MODEL_SIZE, MODEL_SIZE
    if mode == ASPECT:
        # Beyond MAX_ASPECT the long side is capped (the image is squashed that far only): a
        # panorama strip would otherwise cost thousands of crops.
        long_cap = MODEL_SIZE * MAX_ASPECT
        if height <= width:
            return MODEL_SIZE, min(long_cap, max(MODEL_SIZE, round(width * MODEL_SIZE / height)))
        return min(long_cap, max(MODEL_SIZE, round(height * MODEL_SIZE / width))), MODEL_SIZE
    raise ValueError(f"mode must be {FAITHFUL!r} or {ASPECT!r}, got {mode!r}")


def resize_for_model(image: np.ndarray, mode: str) -> np.ndarray:
    """Resize an RGB image to the model resolution with OpenCV's bilinear, as the reference does.

    image: H x W x 3 uint8 RGB.
    Returns 256 x 256 x 3 uint8 (``faithful``: aspect ratio not kept, SPEC 1.1) or, for
    ``aspect``, h x w x 3 uint8 with the short side 256 and the aspect ratio kept up to
    ``MAX_ASPECT`` (the long side rounded to the nearest pixel).
    """
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 array, got {getattr(image, 'shape', type(image))}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"empty image of shape {image.shape}")
    out_h, out_w = model_input_size(image.shape[0], image.shape[1], mode)
    if (out_h, out_w) == image.shape[:2]:
        return np.ascontiguousarray(image)
    return cv2.resize(np.ascontiguousarray(image), (out_w, out_h), interpolation=cv2.INTER_LINEAR)


def saliency_input_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """(height, width) that :func:`resize_for_saliency` gives an ``height x width`` image."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_for_saliency(image: np.ndarray, max_side: int | None) -> np.ndarray:
    """The saliency model's input: H x W x 3 uint8 -> h x w x 3 uint8 with max(h, w) <= max_side.

    ``None``, or an image already within ``max_side``, is returned as is (full resolution, as
    SPEC 2.1). Shrinking uses OpenCV's area interpolation, which averages every source pixel
    (no aliasing, unlike bilinear at large factors).
    """
    out_h, out_w = saliency_input_size(image.shape[0], image.shape[1], max_side)
    if (out_h, out_w) == image.shape[:2]:
        return image
    return cv2.resize(np.ascontiguousarray(image), (out_w, out_h), interpolation=cv2.INTER_AREA)


def _bicubic(x: float) -> float:
    # PIL's cubic convolution kernel with a = -0.5, written in PIL's operation order so that the
    # double-precision coefficients, and hence their fixed-point rounding, come out identical.
    a = _BICUBIC_A
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@functools.lru_cache(maxsize=256)
def pil_bicubic_coefficients(in_size: int, out_size: int) -> np.ndarray:
    """PIL's fixed-point bicubic weights for resampling one axis from ``in_size`` to ``out_size``.

    Returns an out_size x in_size int64 matrix W (zero outside each output's support) such that
    PIL's pass computes ``clip8((W @ x + 2**21) >> 22)`` along that axis. Transcribes
    ``precompute_coeffs`` and ``normalize_coeffs_8bpc`` of Pillow's ``Resample.c``.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"sizes must be positive, got {in_size} -> {out_size}")
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # antialias: the kernel widens by the shrink factor
    support = _BICUBIC_SUPPORT * filterscale
    inv_filterscale = 1.0 / filterscale
    weights = np.zeros((out_size, in_size), dtype=np.int64)
    one = float(1 << _PRECISION_BITS)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)  # int() truncates toward zero, like C
        xmax = min(int(center + support + 0.5), in_size)
        taps = [_bicubic((x - center + 0.5) * inv_filterscale) for x in range(xmin, xmax)]
        total = 0.0
        for w in taps:
            total += w
        for i, w in enumerate(taps):
            if total != 0.0:
                w /= total
            weights[xx, xmin + i] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)
    return weights


# Two exact ways to run PIL's int32 arithmetic as GEMMs:
# - float64: every product and partial sum is an integer below 2**31, exact in float64. Best on
#   CPUs and on GPUs with full-rate float64.
# - float32 split: each coefficient k = hi * 2**11 + lo with 0 <= lo < 2**11 and |hi| <= 2**11, so
#   every operand has at most 11 significant bits (exact even if the GEMM rounds inputs to TF32)
#   and every partial sum of either half stays below 2**24 (exact in float32) while an output has
#   at most 32 taps; the halves are recombined in int32. Used on CUDA, where float64 is slow on
#   most cards.
_SPLIT_BITS = 11
_MAX_SPLIT_TAPS = (1 << 24) // (255 << _SPLIT_BITS)


@functools.lru_cache(maxsize=64)
def _float64_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """in_size x out_size float64: the coefficients, transposed for ``x @ W``, scaled by 2**-22."""
    weights = torch.from_numpy(pil_bicubic_coefficients(in_size, out_size)).to(torch.float64)
    # A power-of-two scale is exact; it turns PIL's ">> 22" into a floor.
    return (weights * 2.0**-_PRECISION_BITS).T.contiguous().to(device)


@functools.lru_cache(maxsize=64)
def _split_weights(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """in_size x (2 * out_size) float32: [hi | lo] halves of the coefficients, for ``x @ W``."""
    weights = torch.from_numpy(pil_bicubic_coefficients(in_size, out_size))
    high = torch.div(weights, 1 << _SPLIT_BITS, rounding_mode="floor")
    low = weights - (high << _SPLIT_BITS)
    return torch.cat([high, low]).T.contiguous().to(device, torch.float32)


@functools.lru_cache(maxsize=256)
def _max_taps(in_size: int, out_size: int) -> int:
    """Most nonzero coefficients of any output sample."""
    return int((pil_bicubic_coefficients(in_size, out_size) != 0).sum(axis=1).max())


def _pass_float64(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """One PIL pass along the last axis: (..., n) float64 8-bit values -> (..., out_size)."""
    scaled = torch.matmul(x, _float64_weights(x.shape[-1], out_size, x.device))
    # clip8: floor((acc + 2**21) / 2**22) clipped to 0..255.
    return scaled.add_(0.5).floor_().clamp_(0.0, 255.0)


def _pass_float32_split(x: torch.Tensor, out_size: int) -> torch.Tensor:
    """One PIL pass along the last axis: (..., n) float32 8-bit values -> (..., out_size)."""
    halves = torch.matmul(x, _split_weights(x.shape[-1], out_size, x.device))
    high, low = halves.to(torch.int32).split(out_size, dim=-1)
    accumulated = (high << _SPLIT_BITS).add_(low).add_(1 << (_PRECISION_BITS - 1))
    return (accumulated >> _PRECISION_BITS).clamp_(0, 255).to(torch.float32)


def exact_resize_dtype(device: torch.device, height: int, width: int, size: int) -> torch.dtype:
    """The arithmetic :func:`pil_bicubic_resize` picks: float32 split on CUDA where exact, else float64."""
    if device.type != "cuda" or torch.get_float32_matmul_precision() == "medium":
        return torch.float64  # "medium" lets float32 GEMMs round operands to bfloat16
    if max(_max_taps(width, size), _max_taps(height, size)) > _MAX_SPLIT_TAPS:
        return torch.float64
    return torch.float32


def pil_bicubic_resize(images: torch.Tensor, size: int, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Resize 8-bit images to ``size x size`` bit-identically to PIL's ``resize(..., BICUBIC)``.

    images: B x C x h x w uint8, on any device.
    Returns B x C x size x size uint8 on the same device.

    Separable, as PIL: a horizontal pass (skipped when ``w == size``) rounded and clipped to
    8 bits, then a vertical pass (skipped when ``h == size``), each one GEMM over the whole batch
    against PIL's fixed-point coefficients (cached per size pair and device). ``dtype`` picks the
    exact arithmetic (float64, or the float32 split; see the comment above); ``None`` lets
    :func:`exact_resize_dtype` choose. Both give the same bytes on every device.

    Square inputs (what CLIP-DIY's crops are) match every Pillow version. For non-square inputs
    whose height shrinks, Pillow >= 13 sometimes runs the vertical pass first (a speed heuristic);
    this function always runs the horizontal pass first, as Pillow <= 12 does.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"expected B x C x h x w uint8, got {images.dtype} {tuple(images.shape)}")
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    height, width = images.shape[-2:]
    if height < 1 or width < 1:
        raise ValueError(f"empty images of shape {tuple(images.shape)}")
    if dtype is None:
        dtype = exact_resize_dtype(images.device, height, width, size)
    if dtype == torch.float64:
        one_pass = _pass_float64
    elif dtype == torch.float32:
        if max(_max_taps(width, size), _max_taps(height, size)) > _MAX_SPLIT_TAPS:
            raise ValueError(f"the float32 split is not exact for {height} x {width} -> {size}; use float64")
        one_pass = _pass_float32_split
    else:
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    x = images.to(dtype)
    if width != size:
        x = one_pass(x, size)  # B x C x h x size
    if height != size:
        # On transposed rows the vertical pass is one GEMM too (B * C * size rows x h).
        x = one_pass(x.transpose(-1, -2), size).transpose(-1, -2)
    return x.to(torch.uint8).contiguous()


def crop_grid(height: int, width: int, patch_size: int) -> tuple[int, int]:
    """(rows, cols) of ``patch_size`` crops with stride ``patch_size // 2``, no padding (SPEC 1.2)."""
    if patch_size < 2 or patch_size % 2:
        raise ValueError(f"patch sizes must be even and >= 2, got {patch_size}")
    if height < patch_size or width < patch_size:
        raise ValueError(f"a {height} x {width} image is smaller than the {patch_size} px crops")
    stride = patch_size // 2
    return (height - patch_size) // stride + 1, (width - patch_size) // stride + 1


def crops_per_image(height: int, width: int, patch_sizes: tuple[int, ...]) -> int:
    """Number of crops of one ``height x width`` image over all ``patch_sizes``."""
    return sum(math.prod(crop_grid(height, width, p)) for p in patch_sizes)
