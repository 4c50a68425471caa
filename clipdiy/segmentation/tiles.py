"""Tiles of the original image for the steps after a method's forward (NACLIP: upsampling, PAMR,
the decision, the summaries), so that their working memory is set by the tile, not the photo.

Every step after the forward is local: bilinear upsampling reads the 2 x 2 source pixels around a
pixel's sample point, PAMR's ``iterations`` passes with dilations up to ``d`` reach ``iterations
* d`` pixels and its affinity reads ``d`` more of the guide, the decision is per pixel, and the
class scores are sums. A tile is an *interior* (the pixels it answers for; the interiors partition
the image) inside a *region* (the interior and a halo of ``halo`` pixels each side, clipped to the
image): running the steps over the region gives every interior pixel exactly what it gets in the
whole image, as long as the halo is at least the steps' reach. Where a region is clipped, it is
clipped by the image's own border, where the whole-image path's replicate padding applies too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch


@dataclass(frozen=True)
class Span:
    """One axis of a tile: the interior [start, end) inside the region [region_start, region_end)."""

    start: int
    end: int
    region_start: int
    region_end: int

    @property
    def inner(self) -> slice:
        """The interior, as a slice of the region."""
        return slice(self.start - self.region_start, self.end - self.region_start)


@dataclass(frozen=True)
class Tile:
    rows: Span
    cols: Span


def axis_spans(size: int, side: int, halo: int) -> list[Span]:
    """Spans of one axis of ``size`` pixels whose regions are at most ``side`` long.

    One span (the whole axis, no halo) when it fits; else the axis is cut into the fewest equal
    interiors of at most ``side - 2 * halo`` pixels, each region the interior plus ``halo`` each
    side, clipped to [0, size).
    """
    if size <= side:
        return [Span(0, size, 0, size)]
    interior = side - 2 * halo
    if interior < 1:
        raise ValueError(f"a tile side of {side} leaves no interior inside a halo of {halo} on each side")
    count = math.ceil(size / interior)
    edges = [round(i * size / count) for i in range(count + 1)]
    return [Span(a, b, max(0, a - halo), min(size, b + halo)) for a, b in pairwise(edges)]


def plan_tiles(height: int, width: int, side: int, halo: int) -> list[Tile]:
    """The tiles of an H x W image, row-major: regions at most ``side`` x ``side`` pixels."""
    return [Tile(rows, cols) for rows in axis_spans(height, side, halo) for cols in axis_spans(width, side, halo)]


#: Output rows gathered at once by :func:`bilinear_region` (bounds its temporary copy).
ROW_BLOCK = 64


def _bilinear_taps(out_size: int, in_size: int, start: int, end: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of output samples [start, end) of a bilinear resize
    (align_corners=False) from ``in_size`` to ``out_size``, computed as PyTorch's kernel does
    (scale = in / out in float32, source = max(scale * (dst + 0.5) - 0.5, 0) rounded once to
    float32, as its fused multiply-add does: exact in float64, then rounded).

    Returns (index0, index1, weight0, weight1), each (end - start,).
    """
    scale = (torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)).double()
    dst = torch.arange(start, end, device=device, dtype=torch.float64)
    source = ((dst + 0.5) * scale.to(device) - 0.5).float().clamp_(min=0.0)
    index0 = source.to(torch.int64)
    weight1 = source - index0.to(torch.float32)
    index1 = torch.where(index0 < in_size - 1, index0 + 1, index0)
    return index0, index1, 1.0 - weight1, weight1


def source_span(out_size: int, in_size: int, start: int, end: int) -> tuple[int, int]:
    """[first, last) of the source samples that output samples [start, end) of a bilinear resize
    (align_corners=False) from ``in_size`` to ``out_size`` read."""
    index0, index1, _, _ = _bilinear_taps(out_size, in_size, start, end, "cpu")
    return int(index0.min()), int(index1.max()) + 1


def nearest_indices(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output sample of ``F.interpolate(mode="nearest")`` from ``in_size``
    to ``out_size`` (int64, (out_size,)).

    Torch computes floorf(dst * (float)in / out) in float32, which differs from the exact integer
    floor(dst * in / out) where dst * in / out is an integer (e.g. 256 -> 230, 388, 428 rows).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)


def bilinear_region(
    source: torch.Tensor,
    size: tuple[int, int],
    rows: tuple[int, int],
    cols: tuple[int, int],
    *,
    source_size: tuple[int, int] | None = None,
    source_origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """``F.interpolate(source, size, mode="bilinear", align_corners=False)[..., r0:r1, c0:c1]``
    without the whole output.

    source: B x K x h x w float (any layout), or only a window of the map being resized: then
    ``source_size`` is the whole map's (h, w) and ``source_origin`` the window's first (row,
    column) in it; the window must hold :func:`source_span` of the region on each axis. Returns
    B x K x (r1 - r0) x (c1 - c0) float32, pixel-major (channels-last strides). The whole resize's
    taps and weights, each output value lerp(lerp(a, b, w_col), lerp(c, d, w_col), w_row), so the
    two agree to float32 rounding, every region to the bit with every other that covers its
    pixels, and, as PyTorch's kernel, equal sources give exactly their value (the runs of equal
    values a resize makes along a map's borders stay exact ties, which an argmax over them needs). Only the few source rows under the region are
    read: along columns first on those rows (small), then along rows into the output.
    """
    height, width = size
    r0, r1 = rows
    c0, c1 = cols
    device = source.device
    in_h, in_w = source_size or tuple(source.shape[-2:])
    top, left = source_origin
    y0, y1, _, wy1 = _bilinear_taps(height, in_h, r0, r1, device)
    x0, x1, _, wx1 = _bilinear_taps(width, in_w, c0, c1, device)
    y0, y1, x0, x1 = y0 - top, y1 - top, x0 - left, x1 - left
    first, last = int(y0.min()), int(y1.max()) + 1
    if first < 0 or last > source.shape[-2] or int(x0.min()) < 0 or int(x1.max()) >= source.shape[-1]:
        raise ValueError(f"the source window at {source_origin} of {tuple(source.shape[-2:])} does not hold the rows and columns the region reads")
    band = source[:, :, first:last].float().permute(0, 2, 3, 1)  # B x rows x w x K
    across = torch.lerp(band[:, :, x0], band[:, :, x1], wx1.view(1, 1, -1, 1))  # B x rows x cols x K
    del band
    out = across.new_empty(across.shape[0], r1 - r0, c1 - c0, across.shape[-1])
    for start in range(0, r1 - r0, ROW_BLOCK):  # blocks of rows: one block's gathered copy at a time
        block = slice(start, start + ROW_BLOCK)
        torch.lerp(across[:, y0[block] - first], across[:, y1[block] - first], wy1[block].view(1, -1, 1, 1), out=out[:, block])
    return out.permute(0, 3, 1, 2)


def area_pool_region(values: torch.Tensor, size: tuple[int, int], out_size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """This region's part of ``F.interpolate(whole, out_size, mode="area")`` (adaptive average
    pooling) of an H x W map, as sums: add the parts of all regions that partition the image and
    divide by :func:`area_bin_sizes` to get the pooled map.

    values: B x K x (r1 - r0) x (c1 - c0), the map's pixels [r0, r1) x [c0, c1). Returns
    B x K x h' x w' float64 sums over each output bin's pixels inside the region (bins are
    [floor(i * H / h'), ceil((i + 1) * H / h')), as adaptive pooling's), by prefix sums.
    """
    sums = values.double()
    for axis, (start, end), full, bins in ((-2, rows, size[0], out_size[0]), (-1, cols, size[1], out_size[1])):
        low, high = _bin_edges(full, bins, sums.device)
        low = (low - start).clamp_(0, end - start)
        high = (high - start).clamp_(0, end - start)
        prefix = torch.nn.functional.pad(sums.cumsum(axis), (0, 0, 1, 0) if axis == -2 else (1, 0))
        sums = prefix.index_select(axis, high) - prefix.index_select(axis, low)
    return sums


def _bin_edges(size: int, bins: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    index = torch.arange(bins, device=device, dtype=torch.int64)
    return (index * size) // bins, ((index + 1) * size + bins - 1) // bins


def area_bin_sizes(size: tuple[int, int], out_size: tuple[int, int], device) -> torch.Tensor:
    """h' x w' float64 pixel counts of adaptive pooling's bins (see :func:`area_pool_region`)."""
    row_low, row_high = _bin_edges(size[0], out_size[0], device)
    col_low, col_high = _bin_edges(size[1], out_size[1], device)
    return (row_high - row_low).double().view(-1, 1) * (col_high - col_low).double().view(1, -1)
