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
    """pycocotools' ``rleToString``, vectorised over the counts: each count (after the third, its
    difference to the count two before) in 5-bit groups, low first, 0x20 marking "more", until
    the rest is the sign extension of the group's bit 0x10; each group written as chr(48 + group)."""
    counts = np.asarray(counts, dtype=np.int64)
    values = counts.copy()
    values[3:] -= counts[1:-2]
    groups, active = [], np.ones(values.size, dtype=bool)
    while active.any():
        group = values & 0x1F
        values = values >> 5  # arithmetic: negative differences stay negative
        more = np.where(group & 0x10, values != -1, values != 0)
        groups.append((np.where(more, group | 0x20, group) + 48, active.copy()))
        active &= more
    chars = np.stack([g for g, _ in groups], axis=1).astype(np.uint8)
    written = np.stack([a for _, a in groups], axis=1)
    return chars[written].tobytes().decode("ascii")  # row-major: each count's groups in order


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


def encode_label_map(label_map: np.ndarray) -> list[tuple[int, Rle, int, list[float]]]:
    """(class id, RLE, area, COCO bbox) of every class present in an H x W label map, by class id.

    Equal to :func:`encode` / :func:`bbox_of_mask` of each ``label_map == class_id``, from one pass
    over the map: its column-major runs of equal labels are found once; a class's mask runs are
    its label runs, the gaps between them the mask's zero runs.
    """
    height, width = label_map.shape
    if height == 0 or width == 0:
        return []
    flat = np.ascontiguousarray(np.asarray(label_map).T).ravel()  # column-major (Fortran) order
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [flat.size]))
    labels = flat[starts]
    order = np.argsort(labels, kind="stable")  # grouped by class, in position order within each
    classes, first = np.unique(labels[order], return_index=True)
    bounds = np.append(first, order.size)
    out = []
    for index, class_id in enumerate(classes.tolist()):
        runs = order[bounds[index]:bounds[index + 1]]
        start, end = starts[runs], ends[runs]
        counts = np.empty(2 * runs.size + 1, dtype=np.int64)
        counts[0] = start[0]  # 0 when the mask starts with a 1-run, as pycocotools writes it
        counts[1::2] = end - start
        counts[2:-1:2] = start[1:] - end[:-1]
        counts[-1] = flat.size - end[-1]
        if counts[-1] == 0:
            counts = counts[:-1]
        # A run that crosses a column boundary covers the last row of one column and the first of the next.
        first_col, last_col = start // height, (end - 1) // height
        crosses = first_col != last_col
        top = int(np.where(crosses, 0, start % height).min())
        bottom = int(np.where(crosses, height - 1, (end - 1) % height).max())
        left, right = int(first_col.min()), int(last_col.max())
        rle: Rle = {"size": [int(height), int(width)], "counts": _pack(counts)}
        bbox = [float(left), float(top), float(right - left + 1), float(bottom - top + 1)]
        out.append((int(class_id), rle, int((end - start).sum()), bbox))
    return out


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
