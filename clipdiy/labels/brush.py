"""Label Studio's brush RLE (``BrushLabels`` results, ``"format": "rle"``), both ways.

The format (``label_studio_sdk.converter.brush``, and the Label Studio frontend that paints it):
a mask is an RGBA image of H x W pixels, flattened row-major to H * W * 4 bytes, run-length
encoded into a bit stream: a 32-bit value count, a 5-bit word size minus one, four 4-bit run-length
field sizes minus one, then tokens: ``1`` + 2-bit size index + (length - 1) + one word for a run of
one value, or ``0`` + 2-bit size index + (count - 1) + that many words for literal values; the
stream is zero-padded to whole bytes, and the result is the list of those bytes. A pixel is in the
mask when its alpha byte is at least 128 (the frontend paints alpha 255; the half-way cut ignores
anti-aliased edges).

Written here rather than imported: ``label-studio-sdk`` (maintained; the converter's home since
``label-studio-converter`` was folded into it) pins numpy < 2.3 and opencv-python-headless < 4.13
and pulls in some 35 packages (black, isort, Faker, ...), which would downgrade the project's own
numpy and OpenCV; ``label-studio-converter`` is no longer released. The tests check this code
against the SDK's ``decode_rle``/``encode_rle`` and a real Label Studio server.
"""

from __future__ import annotations

import numpy as np

#: Bits of the run-length field for size index 0..3 (the SDK's ``rle_sizes``; max run 2**16).
RUN_BITS = (3, 4, 8, 16)
WORD_BITS = 8
IN_MASK = 128


def encode(mask: np.ndarray) -> list[int]:
    """Brush RLE bytes of an H x W mask (non-zero = in the mask), painted white and opaque
    (255 in all four channels). Vectorised: one token per run of equal bytes."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H x W), got shape {mask.shape}")
    values = np.repeat(np.where(np.asarray(mask).ravel(), 255, 0).astype(np.int64), 4)  # RGBA, row-major
    n = values.size
    change = np.flatnonzero(values[1:] != values[:-1]) + 1
    starts = np.concatenate(([0], change)) if n else np.zeros(0, np.int64)
    lengths = np.diff(np.concatenate((starts, [n]))) if n else np.zeros(0, np.int64)
    run_values = values[starts] if n else np.zeros(0, np.int64)
    # Runs longer than 2**16 are split into pieces of 2**16 (the longest the 16-bit field holds).
    pieces = np.maximum(1, -(-lengths // 2**16))
    token_value = np.repeat(run_values, pieces)
    token_length = np.full(int(pieces.sum()), 2**16, np.int64)
    last = np.cumsum(pieces) - 1
    token_length[last] = lengths - (pieces - 1) * 2**16
    size_index = np.searchsorted(np.array([2**b for b in RUN_BITS]), token_length)  # smallest field that fits
    run_bits = np.array(RUN_BITS)[size_index]
    width = 1 + 2 + run_bits + WORD_BITS
    code = (((np.int64(1) << 2 | size_index) << run_bits | (token_length - 1)) << WORD_BITS) | token_value
    header = [(n, 32), (WORD_BITS - 1, 5)] + [(b - 1, 4) for b in RUN_BITS]
    bits = [_bits(np.array([v], np.int64), np.array([w])) for v, w in header] + [_bits(code, width)]
    stream = np.concatenate(bits)
    return np.packbits(stream).tolist()  # packbits pads with zeros to a whole byte


def _bits(values: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The big-endian bits of each value in its width, concatenated (uint8 0/1)."""
    widths = np.broadcast_to(np.asarray(widths), values.shape)
    if values.size == 0:
        return np.zeros(0, np.uint8)
    top = int(widths.max())
    shifts = widths[:, None] - 1 - np.arange(top)[None, :]
    bits = (values[:, None] >> np.maximum(shifts, 0)) & 1
    return bits[shifts >= 0].astype(np.uint8)  # row-major: each value's bits in order


#: The most values :func:`decode_values` accepts from a header when the caller names no size: a
#: 16384 x 16384 RGBA mask, 1 GiB (the header's 32-bit count alone could ask for 4 GiB).
MAX_VALUES = 16384 * 16384 * 4


def decode_values(rle: list[int] | bytes, *, max_values: int = MAX_VALUES, expected: int | None = None) -> np.ndarray:
    """The flat byte values a brush RLE holds (H * W * 4 for a mask).

    The value count comes from the RLE's own header, which an export can set to anything: it is
    checked (``expected`` when the caller knows the size, else at most ``max_values``) before
    anything of that size is allocated, so a small hostile RLE cannot ask for gigabytes. Any
    malformed stream (ends inside a token, a word wider than a byte holds) raises ValueError."""
    try:
        data = bytes(bytearray(rle))
    except (TypeError, ValueError) as error:
        raise ValueError(f"brush RLE is not a list of bytes ({error})") from None
    bits = np.unpackbits(np.frombuffer(data, np.uint8))
    position = 0

    def read(count: int) -> int:
        nonlocal position
        if position + count > bits.size:
            raise ValueError("brush RLE ends inside a token")
        chunk = bits[position:position + count].astype(np.int64)
        position += count
        return int(chunk @ (1 << np.arange(count - 1, -1, -1, dtype=np.int64))) if count else 0

    total = read(32)
    if expected is not None and total != expected:
        raise ValueError(f"brush RLE holds {total} values, expected {expected} (H x W x 4)")
    if total > max_values:
        raise ValueError(f"brush RLE holds {total} values, more than the {max_values} allowed")
    word = read(5) + 1
    run_bits = [read(4) + 1 for _ in range(4)]
    out = np.zeros(total, np.uint8)
    i = 0
    while i < total:
        repeated = read(1)
        j = min(total, i + 1 + read(run_bits[read(2)]))
        values = [read(word)] if repeated else [read(word) for _ in range(j - i)]
        if max(values) > 255:
            raise ValueError(f"brush RLE value {max(values)} does not fit a byte (word size {word} bits)")
        out[i:j] = values[0] if repeated else values
        i = j
    return out


def decode(rle: list[int] | bytes, height: int, width: int) -> np.ndarray:
    """H x W bool mask of a brush RLE: pixels whose alpha is at least 128. The RLE must hold
    exactly H * W * 4 values (checked from its header before decoding)."""
    values = decode_values(rle, expected=height * width * 4)
    return values.reshape(height, width, 4)[:, :, 3] >= IN_MASK
