"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as NACLIP runs it (SPEC 8.8).

Parameter-free: the image decides, per pixel, how much each of its dilated 3 x 3 neighbours
counts (a softmax over colour differences scaled by the local colour spread), and every class's
logit map is replaced, ``iterations`` times, by that weighted sum of its neighbours' values.

Batched over images of one size and device-agnostic. Two exact ways to run the iterations,
chosen by size (``max_elements`` bounds the working tensors):

- the affinities as one sparse CSR matrix (``B·H·W`` rows, ``P = 8·len(dilations)`` entries
  each, :func:`pamr_matrix`) applied to the pixel-major (pixels x classes) logits: one sparse
  product per iteration, reading the affinities once for all classes (about 4x faster on a CPU
  than shifted sums), written into one of two buffers used in turn (a fresh buffer per
  iteration costs a CPU more in page faults than the product itself);
- for larger batches (large photos), sums of shifted views over a chunk of classes at a time,
  whose working set stays under ``max_elements``.

Nothing ``B x C x P x H x W`` is ever materialised.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: (row, column) steps of the 8 neighbours, in the reference kernels' order (row-major, no centre).
NEIGHBOUR_STEPS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(padded: torch.Tensor, margin: int, dilation: int, step: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """View of a map padded by ``margin`` on each side at offset ``dilation * step``: value of
    pixel (y + dy, x + dx) for every pixel (y, x) of the H x W centre."""
    top = margin + dilation * step[0]
    left = margin + dilation * step[1]
    return padded[..., top : top + height, left : left + width]


def pamr_affinity(images: torch.Tensor, dilations: Sequence[int], margins: tuple[int, int, int, int] = (0, 0, 0, 0)) -> torch.Tensor:
    """Neighbour weights of every pixel (SPEC 8.8).

    images: B x K x (H + top + bottom) x (W + left + right) float (the normalised guide image),
    ``margins`` = (top, bottom, left, right) pixels of it around the H x W pixels whose weights
    are wanted (a tile's guide carries the image around it, each margin at most max(dilations));
    what a margin lacks is replicate padding (the image's true border). Returns B x P x H x W
    float32, P = 8 * len(dilations), neighbours dilation-major in :data:`NEIGHBOUR_STEPS` order,
    summing to 1 over P: softmax over neighbours of the channel mean of -|I(x) - I(n)| / (1e-8 +
    0.1 sigma(x)), sigma the unbiased standard deviation, per channel, of all 9 * len(dilations)
    window values.
    """
    images = images.float()
    top, bottom, left, right = margins
    largest = max(dilations)
    if max(margins) > largest:
        raise ValueError(f"guide margins {margins} exceed the largest dilation {largest}")
    height = images.shape[-2] - top - bottom
    width = images.shape[-1] - left - right
    padded = F.pad(images, [largest - left, largest - right, largest - top, largest - bottom], mode="replicate")
    window = [(d, (dy, dx)) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    centre = _shifted(padded, largest, 0, (0, 0), height, width)
    # Two-pass unbiased standard deviation over the window values, without stacking them.
    mean = torch.zeros_like(centre)
    for dilation, step in window:
        mean += _shifted(padded, largest, dilation, step, height, width)
    mean /= len(window)
    variance = torch.zeros_like(centre)
    for dilation, step in window:
        variance += (_shifted(padded, largest, dilation, step, height, width) - mean).square_()
    scale = variance.div_(len(window) - 1).sqrt_().mul_(0.1).add_(1e-8)
    del mean
    affinity = torch.stack(
        [
            (centre - _shifted(padded, largest, dilation, step, height, width)).abs_().div_(scale).mean(dim=1).neg_()
            for dilation in dilations
            for step in NEIGHBOUR_STEPS
        ],
        dim=1,
    )  # B x P x H x W
    return affinity.softmax(dim=1)


def pamr_reach(iterations: int, dilations: Sequence[int]) -> tuple[int, int]:
    """(logit halo, guide margin): how far PAMR's result at a pixel reads the logits (each
    iteration reads neighbours up to max(dilations) away) and, beyond those, the guide (the
    affinity of a pixel reads the guide up to max(dilations) away)."""
    largest = max(int(d) for d in dilations)
    return iterations * largest, largest


def pamr(
    images: torch.Tensor,
    logits: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = (8, 16),
    max_elements: int = 128_000_000,
    guide_margins: tuple[int, int, int, int] = (0, 0, 0, 0),
) -> torch.Tensor:
    """Refined logits: ``iterations`` affinity-weighted neighbour sums of every class map.

    images: B x K x H x W guide (normalised image, same H x W), or, with ``guide_margins`` =
    (top, bottom, left, right), the guide with that many more pixels around the logits' H x W (a
    tile's, see :func:`pamr_affinity`); logits: B x C x H x W. Beyond the given pixels the maps
    are replicate-padded (the image border).
    Returns B x C x H x W float32 on the logits' device, in the logits' layout: pixel-major
    (channels-last strides, what the sparse products work in) when the logits are, else
    class-major (contiguous).
    """
    top, bottom, left, right = guide_margins
    guide_size = (logits.shape[-2] + top + bottom, logits.shape[-1] + left + right) if logits.ndim == 4 else None
    if images.ndim != 4 or logits.ndim != 4 or images.shape[0] != logits.shape[0] or tuple(images.shape[-2:]) != guide_size:
        raise ValueError(f"PAMR needs B x K x H x W images and B x C x H x W logits, got {tuple(images.shape)}, {tuple(logits.shape)}")
    batch, classes, height, width = logits.shape
    if classes == 0:
        return logits.float()
    dilations = tuple(int(d) for d in dilations)
    affinity = pamr_affinity(images, dilations, guide_margins)  # B x P x H x W
    pixels = batch * height * width
    neighbours = affinity.shape[1]
    if pixels * neighbours <= max_elements // 2 and pixels * neighbours < 2**31:
        # The sparse matrix takes up to half the budget, the classes in flight the rest.
        chunk = max(1, (max_elements - pixels * neighbours) // (2 * pixels))
        return _pamr_sparse(affinity, logits, iterations, dilations, chunk)
    return _pamr_shifted(affinity, logits, iterations, dilations, max_elements)


def _neighbour_columns(batch: int, height: int, width: int, dilations: Sequence[int], device) -> torch.Tensor:
    """Flat index of every pixel's neighbours (clamped at the border: replicate padding), B*H*W x P int32.

    Built as (row index of the neighbour) * W + (its column index) + (the image's offset), one
    broadcast sum over tiny per-row and per-column tables.
    """
    steps = [(dilation * dy, dilation * dx) for dilation in dilations for dy, dx in NEIGHBOUR_STEPS]
    row_steps = torch.tensor([dy for dy, _ in steps], device=device, dtype=torch.int32)
    column_steps = torch.tensor([dx for _, dx in steps], device=device, dtype=torch.int32)
    ys = torch.arange(height, device=device, dtype=torch.int32).view(height, 1)
    xs = torch.arange(width, device=device, dtype=torch.int32).view(width, 1)
    rows = (ys + row_steps).clamp_(0, height - 1).mul_(width)  # H x P
    columns = (xs + column_steps).clamp_(0, width - 1)  # W x P
    offsets = torch.arange(batch, device=device, dtype=torch.int32).mul_(height * width).view(batch, 1, 1, 1)
    return ((rows.view(1, height, 1, -1) + offsets) + columns.view(1, 1, width, -1)).view(-1, len(steps))


def pamr_matrix(affinity: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """The affinities as a sparse CSR matrix over the batch's pixels (SPEC 8.8).

    affinity: B x P x H x W (:func:`pamr_affinity`). Returns a (B·H·W) x (B·H·W) float32 CSR
    matrix, pixels in row-major order image after image, whose row x holds pixel x's P neighbour
    weights in the columns of those neighbours (a border pixel's clamped neighbours may repeat a
    column: their weights add up). One PAMR iteration of a pixel-major (B·H·W) x C map is
    ``matrix @ map``.
    """
    batch, neighbours, height, width = affinity.shape
    pixels = batch * height * width
    columns = _neighbour_columns(batch, height, width, dilations, affinity.device)
    rows = torch.arange(0, pixels * neighbours + 1, neighbours, device=affinity.device, dtype=torch.int32)
    values = affinity.float().permute(0, 2, 3, 1).reshape(-1)  # pixel-major, neighbours in column order
    with warnings.catch_warnings():  # "CSR support is in beta": the product used here is long supported
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(rows, columns.view(-1), values, size=(pixels, pixels), check_invariants=False)


def _pamr_sparse(
    affinity: torch.Tensor, logits: torch.Tensor, iterations: int, dilations: Sequence[int], chunk: int
) -> torch.Tensor:
    """The iterations as products with the sparse (pixels x pixels) affinity matrix, ``chunk`` classes at a time.

    The products run pixel-major (B·H·W x classes, what a CSR product reads and writes fastest:
    each neighbour's classes are one contiguous row). Pixel-major logits (channels-last strides)
    get the result in place as it is; class-major ones get it transposed back to B x C x H x W
    contiguous.
    """
    batch, classes, height, width = logits.shape
    pixels = batch * height * width
    matrix = pamr_matrix(affinity, dilations)
    del affinity
    chunk = min(chunk, classes)
    pixel_major = _is_pixel_major(logits)
    # Two separate buffers: with one chunk, the spare one becomes the result and the other is freed.
    buffers = [torch.empty(pixels * chunk, device=logits.device, dtype=torch.float32) for _ in range(2)]
    refined = None
    if chunk < classes:
        layout = torch.channels_last if pixel_major else torch.contiguous_format
        refined = torch.empty(batch, classes, height, width, device=logits.device, dtype=torch.float32, memory_format=layout)
    for start in range(0, classes, chunk):
        part = logits[:, start : start + chunk]
        count = part.shape[1]
        result, spare = (buffer[: pixels * count].view(pixels, count) for buffer in buffers)
        _iterate(matrix, part.permute(0, 2, 3, 1), iterations, result, spare)
        if pixel_major and refined is None:
            return result.view(batch, height, width, classes).permute(0, 3, 1, 2)
        if pixel_major:
            refined.permute(0, 2, 3, 1)[..., start : start + count].copy_(result.view(batch, height, width, count))
            continue
        target = spare.view(batch, count, height * width) if refined is None else refined[:, start : start + count].flatten(2)
        _to_class_major(result.view(batch, height * width, count), target)
    return spare.view(batch, classes, height, width) if refined is None else refined


def _is_pixel_major(tensor: torch.Tensor) -> bool:
    """True for a B x C x H x W tensor with channels-last strides (and C > 1: else both layouts agree)."""
    return tensor.shape[1] > 1 and tensor.is_contiguous(memory_format=torch.channels_last) and not tensor.is_contiguous()


def _to_class_major(source: torch.Tensor, target: torch.Tensor, block: int = 4096) -> None:
    """target (B x n x HW view) = source (B x HW x n) transposed, ``block`` pixels at a time.

    A block's rows and columns stay in cache, which makes the transposing copy about 3x faster on
    a CPU than one strided copy of the whole map.
    """
    for start in range(0, source.shape[1], block):
        target[:, :, start : start + block].copy_(source[:, start : start + block].transpose(1, 2))


def _iterate(matrix: torch.Tensor, source: torch.Tensor, iterations: int, result: torch.Tensor, spare: torch.Tensor) -> None:
    """``result`` = matrix^iterations @ source (B x H x W x n, any strides; result: B·H·W x n).

    Ping-pong between ``result`` and ``spare`` (same size), starting in the one that makes the
    last product land in ``result``: no allocation per iteration. On a CPU, writing into memory
    already touched matters as much as the product: a fresh buffer of this size is mapped anew
    by the allocator and page-faulted (about 4x the product's own time).
    """
    current, other = (result, spare.view(result.shape)) if iterations % 2 == 0 else (spare.view(result.shape), result)
    current.view(source.shape).copy_(source)
    for _ in range(iterations):
        torch.addmm(other, matrix, current, beta=0, out=other)  # beta=0: other's old values are ignored
        current, other = other, current


def _pamr_shifted(
    affinity: torch.Tensor, logits: torch.Tensor, iterations: int, dilations: Sequence[int], max_elements: int
) -> torch.Tensor:
    """The iterations as sums of shifted views, a chunk of classes at a time (bounded memory)."""
    batch, classes, height, width = logits.shape
    weights = [
        [affinity[:, index * len(NEIGHBOUR_STEPS) + k, None] for k in range(len(NEIGHBOUR_STEPS))]
        for index in range(len(dilations))
    ]
    # Working set of one chunk: the map, its largest padded copy and the accumulator.
    largest = max(dilations)
    per_class = batch * ((height + 2 * largest) * (width + 2 * largest) + 2 * height * width)
    chunk = max(1, min(classes, max_elements // max(per_class, 1)))
    layout = torch.channels_last if _is_pixel_major(logits) else torch.contiguous_format
    refined = torch.empty(batch, classes, height, width, device=logits.device, dtype=torch.float32, memory_format=layout)
    buffers = torch.empty(2, batch * chunk * height * width, device=logits.device, dtype=torch.float32)
    for start in range(0, classes, chunk):
        part = logits[:, start : start + chunk]
        current, total = (buffer[: part.numel()].view(part.shape) for buffer in buffers)
        current.copy_(part)
        for _ in range(iterations):
            total.zero_()
            for dilation, dilation_weights in zip(dilations, weights):
                padded = F.pad(current, [dilation] * 4, mode="replicate")
                for step, weight in zip(NEIGHBOUR_STEPS, dilation_weights):
                    total.addcmul_(_shifted(padded, dilation, dilation, step, height, width), weight)
                del padded
            current, total = total, current
        refined[:, start : start + chunk] = current
    return refined
