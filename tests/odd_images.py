"""Hostile but small images for the per-image boundary tests: a corrupt EXIF block, extreme shapes."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

#: The seed of the one mutation of :func:`exif_photo`'s EXIF block used by the tests; with it,
#: ``ImageOps.exif_transpose`` raises ``struct.error`` (checked by the tests, on Pillow itself).
CORRUPT_EXIF_SEED = 607
#: Width x height of images no model input is shaped like: strips, a needle, a single pixel.
ODD_SIZES = ((1, 5000), (5000, 1), (3, 9000), (1, 1))


def exif_photo(photo: Path) -> tuple[bytes, int, int]:
    """A real photo, shrunk, saved as a JPEG with an EXIF block (orientation and three tags):
    (bytes, offset of the EXIF block's TIFF data, its length)."""
    with Image.open(photo) as image:
        rgb = image.convert("RGB").resize((64, 48))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate to display
    exif[0x010F] = "Camera maker"
    exif[0x0110] = "Model 1"
    exif[0x0132] = "2020:01:01 10:00:00"
    buffer = io.BytesIO()
    rgb.save(buffer, format="JPEG", exif=exif, quality=90)
    data = buffer.getvalue()
    start = data.index(b"Exif\x00\x00") + 6
    length = int.from_bytes(data[start - 8 : start - 6], "big") - 8  # APP1 length - its 2 bytes - "Exif\0\0"
    return data, start, length


def corrupt_exif_jpeg(photo: Path, seed: int = CORRUPT_EXIF_SEED) -> bytes:
    """:func:`exif_photo` with 1-6 bytes of its EXIF block replaced at random (``seed``): the
    pixels decode, the metadata is broken."""
    data, start, length = exif_photo(photo)
    rng = np.random.default_rng(seed)
    mutated = bytearray(data)
    for offset in rng.integers(0, length, int(rng.integers(1, 7))):
        mutated[start + int(offset)] = int(rng.integers(0, 256))
    return bytes(mutated)


def exif_transpose_error(data: bytes) -> BaseException | None:
    """What Pillow's ``ImageOps.exif_transpose`` raises on the decoded ``data`` (None: nothing)."""
    from PIL import ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the corrupt tags it skips
        image = Image.open(io.BytesIO(data))
        image.load()
        try:
            ImageOps.exif_transpose(image)
        except Exception as error:  # noqa: BLE001 - returned for the test to judge
            return error
    return None


def write_odd_images(folder: Path, photo: Path) -> dict[str, tuple[int, int]]:
    """The :data:`ODD_SIZES` images (PNG, a gradient) and ``corrupt_exif.jpg`` in ``folder``:
    {file name: (width, height)} of the odd sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes = {}
    for width, height in ODD_SIZES:
        name = f"odd_{width}x{height}.png"
        pixels = (np.add.outer(np.arange(height), np.arange(width)) % 256).astype(np.uint8)
        Image.fromarray(np.stack([pixels, 255 - pixels, pixels // 2], axis=2)).save(folder / name)
        sizes[name] = (width, height)
    (folder / "corrupt_exif.jpg").write_bytes(corrupt_exif_jpeg(photo))
    return sizes
