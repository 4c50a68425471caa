"""Turning whatever a user hands the library into the 8-bit RGB array the method runs on."""

from __future__ import annotations

from typing import Union

import numpy as np
from PIL import Image, ImageOps

from clipdiy.errors import InvalidImageError

ImageLike = Union[Image.Image, np.ndarray]

#: Beyond this many pixels an image is refused rather than risk exhausting memory (a 16k x 16k
#: photo; decompression bombs are stopped earlier, from the header, by the pipeline's decoder).
MAX_PIXELS = 16384 * 16384


def to_rgb_uint8(image: ImageLike) -> np.ndarray:
    """H x W x 3 uint8 RGB of a PIL image (any mode) or an array.

    PIL images get their EXIF orientation applied (as ``cv2.imread``, which the reference uses,
    does) and are converted from any mode (palette, grayscale, CMYK, 16-bit, alpha dropped like
    ``cv2.imread`` does). Arrays may be H x W, H x W x 1, H x W x 3 or H x W x 4 (alpha dropped),
    of dtype uint8, uint16 (scaled by 1/257), bool, or float in [0, 1].

    Raises :class:`InvalidImageError` (with ``kind``) for empty, oversized or unusable input.
    """
    if isinstance(image, Image.Image):
        return _pil_to_rgb(image)
    if isinstance(image, np.ndarray):
        return _array_to_rgb(image)
    raise InvalidImageError(
        f"expected a PIL image or a numpy array, got {type(image).__name__}", kind="unsupported"
    )


def _check_size(height: int, width: int) -> None:
    if height <= 0 or width <= 0:
        raise InvalidImageError(f"image is empty ({width} x {height} pixels)", kind="empty")
    if height * width > MAX_PIXELS:
        raise InvalidImageError(
            f"image has {width} x {height} = {width * height} pixels, more than the {MAX_PIXELS} allowed",
            kind="too_large",
        )


def _pil_to_rgb(image: Image.Image) -> np.ndarray:
    _check_size(image.height, image.width)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGB",):
        return np.asarray(image, dtype=np.uint8).copy()
    if image.mode.startswith("I") or image.mode == "F":
        # Pillow's own 16/32-bit -> 8-bit conversion clips instead of scaling: scale ourselves.
        return _array_to_rgb(np.asarray(image))
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def _array_to_rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InvalidImageError(
            f"expected an H x W, H x W x 1, H x W x 3 or H x W x 4 array, got shape {array.shape}",
            kind="unsupported",
        )
    _check_size(array.shape[0], array.shape[1])
    array = array[:, :, :3]
    array = _to_uint8(array)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        # 32-bit integer images (Pillow's "I" mode) usually carry 16-bit data.
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 65535:
            raise InvalidImageError(
                f"integer image values span [{low}, {high}], outside 0..65535", kind="unsupported"
            )
        scale = 257.0 if high > 255 else 1.0
        return np.round(array.astype(np.float32) / scale).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise InvalidImageError("float image has NaN or infinite values", kind="unsupported")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InvalidImageError(
                f"float images must lie in [0, 1], got values in [{low:g}, {high:g}]", kind="unsupported"
            )
        return np.round(array * 255.0).astype(np.uint8)
    raise InvalidImageError(f"unsupported image dtype {array.dtype}", kind="unsupported")
