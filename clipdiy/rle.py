"""COCO run-length encoding, byte-identical to pycocotools' compressed RLE.

A mask is read in column-major (Fortran) order; runs alternate 0s and 1s starting with 0s; the
counts are then packed into pycocotools' LEB128-like ASCII string (``maskApi.c: rleToString``).
Pure numpy + a short loop over runs, so pycocotools is not a runtime dependency.
"""

from __future__ import annotations

from typing import TypedDict

import numpy as np


class Rle(TypedDict):
    """A COCO RLE: ``size`` is ``[height, width]``; ``counts`` the compressed ASCII string."""

    size: list[int]
    counts: str


def run_lengths(mask: np.ndarray) -> np.ndarray:
    """Uncompressed COCO counts of a 2-D mask (H x W, any dtype; non-zero = in the mask)."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H x W), got shape {mask.shape}")
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return np.zeros(0, dtype=np.int64)
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds)
    if flat[0]:
        counts = np.concatenate(([0], counts))
    return counts.astype(np.int64)


def _pack(counts: np.ndarray) -> str:
    out = []
    for i, count in enumerate(counts.tolist()):
        x = count - counts[i - 2] if i > 2 else count
        x = int(x)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def _unpack(counts: str) -> np.ndarray:
    values: list[int] = []
    pos = 0
    data = counts.encode("ascii")
    while pos < len(data):
        x = 0
        k = 0
        more = True
        while more:
            c = data[pos] - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            pos += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(values) > 2:
            x += values[-2]
        values.append(x)
    return np.asarray(values, dtype=np.int64)


def encode(mask: np.ndarray) -> Rle:
    """Compressed COCO RLE of a 2-D boolean mask (H x W)."""
    height, width = mask.shape[:2]
    return {"size": [int(height), int(width)], "counts": _pack(run_lengths(mask))}


def decode(rle: Rle) -> np.ndarray:
    """The H x W boolean mask of a compressed (str or bytes) or uncompressed (list) COCO RLE."""
    height, width = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    runs = _unpack(counts) if isinstance(counts, str) else np.asarray(counts, dtype=np.int64)
    if runs.sum() != height * width:
        raise ValueError(f"RLE counts sum to {int(runs.sum())}, expected {height * width} for size {rle['size']}")
    values = np.zeros(runs.size, dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, runs)
    return flat.reshape((width, height)).T.copy()


def area(rle: Rle) -> int:
    """Foreground pixel count of a compressed RLE."""
    return int(_unpack(rle["counts"])[1::2].sum()) if isinstance(rle["counts"], str) else int(np.asarray(rle["counts"])[1::2].sum())


def bbox_of_mask(mask: np.ndarray) -> list[float]:
    """COCO box ``[x, y, width, height]`` of a 2-D mask; all zeros for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] - cols[0] + 1), float(rows[-1] - rows[0] + 1)]
