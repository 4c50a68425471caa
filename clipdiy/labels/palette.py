"""The fixed class palette: PASCAL VOC's, so that masks look the same in every tool.

Class ``i`` gets VOC colour ``i`` (background black, aeroplane dark red, ...); 255 (ignore) is
VOC's off-white. The palette has 256 entries, so vocabularies up to 255 classes get distinct
colours; larger ones wrap around (colour of ``i % 255``).
"""

from __future__ import annotations

import functools
import io
from typing import BinaryIO

import numpy as np
from PIL import Image

IGNORE = 255


@functools.cache
def voc_palette() -> np.ndarray:
    """256 x 3 uint8: the PASCAL VOC colour map (bit-interleaved class id)."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        value, colour = index, [0, 0, 0]
        for shift in range(7, -1, -1):
            for channel in range(3):
                colour[channel] |= ((value >> channel) & 1) << shift
            value >>= 3
        palette[index] = colour
    palette.setflags(write=False)
    return palette


def class_colour(class_id: int) -> tuple[int, int, int]:
    """RGB colour of a class id (255 = ignore)."""
    index = class_id if class_id == IGNORE else class_id % IGNORE
    return tuple(int(c) for c in voc_palette()[index])  # type: ignore[return-value]


def colorize(label_map: np.ndarray) -> np.ndarray:
    """H x W class ids (any integer dtype) -> H x W x 3 uint8 RGB in the palette."""
    ids = np.asarray(label_map).astype(np.int64)
    ids = np.where(ids == IGNORE, IGNORE, ids % IGNORE)
    return voc_palette()[ids]


def to_palette_image(label_map: np.ndarray) -> Image.Image:
    """H x W class ids (< 256) -> a mode-P PIL image carrying the VOC palette (VOC's PNG form)."""
    ids = np.asarray(label_map)
    if ids.ndim != 2:
        raise ValueError(f"label map must be 2-D (H x W), got shape {ids.shape}")
    if ids.size and int(ids.max()) > 255:
        raise ValueError("a palette PNG holds class ids 0..255; this label map has larger ids")
    image = Image.fromarray(ids.astype(np.uint8), mode="P")
    image.putpalette(voc_palette().ravel().tolist())
    return image


def write_palette_png(label_map: np.ndarray, file: BinaryIO) -> None:
    """Write a label map as a VOC-style palette PNG to an open binary file."""
    to_palette_image(label_map).save(file, format="PNG")


def palette_png_bytes(label_map: np.ndarray) -> bytes:
    """The VOC-style palette PNG of a label map, as bytes."""
    buffer = io.BytesIO()
    write_palette_png(label_map, buffer)
    return buffer.getvalue()
