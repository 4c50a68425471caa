"""PAMR: pixel-adaptive mask refinement (Araslanov & Roth, CVPR 2020), as NACLIP runs it (SPEC 8.8).

Parameter-free: the image decides, per pixel, how much each of its dilated 3 x 3 neighbours
counts (a softmax over colour differences scaled by the local colour spread), and every class's
logit map is replaced, ``iterations`` times, by that weighted sum of its neighbours' values.

Batched over images of one size and device-agnostic. Memory: the affinities take
``B x 8·len(dilations) x H x W`` floats; the logits are refined a chunk of classes at a time,
sized so that one chunk's working tensors stay under ``max_elements`` (large photos with many
classes stay bounded). Each iteration is a sum of shifted views: nothing ``B x C x P x H x W``
is ever materialised.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: (row, column) steps of the 8 neighbours, in the reference kernels' order (row-major, no centre).
NEIGHBOUR_STEPS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _shifted(padded: torch.Tensor, dilation: int, step: tuple[int, int], height: int, width: int) -> torch.Tensor:
    """View of a replicate-padded map at offset ``dilation * step``: value of pixel (y + dy, x + dx)."""
    top = dilation * (1 + step[0])
    left = dilation * (1 + step[1])
    return padded[..., top : top + height, left : left + width]


def pamr_affinity(images: torch.Tensor, dilations: Sequence[int]) -> torch.Tensor:
    """Neighbour weights of every pixel (SPEC 8.8).

    images: B x K x H x W float (the normalised guide image). Returns B x P x H x W float32,
    P = 8 * len(dilations), neighbours dilation-major in :data:`NEIGHBOUR_STEPS` order, summing to
    1 over P: softmax over neighbours of the channel mean of -|I(x) - I(n)| / (1e-8 + 0.1 sigma(x)),
    sigma the unbiased standard deviation, per channel, of all 9 * len(dilations) window values.
    """
    images = images.float()
    _, _, height, width = images.shape
    padded = [F.pad(images, [d] * 4, mode="replicate") for d in dilations]
    window = [(d, (dy, dx)) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    pads = dict(zip(dilations, padded))
    # Two-pass unbiased standard deviation over the window values, without stacking them.
    mean = torch.zeros_like(images)
    for dilation, step in window:
        mean += _shifted(pads[dilation], dilation, step, height, width)
    mean /= len(window)
    variance = torch.zeros_like(images)
    for dilation, step in window:
        variance += (_shifted(pads[dilation], dilation, step, height, width) - mean).square_()
    scale = variance.div_(len(window) - 1).sqrt_().mul_(0.1).add_(1e-8)
    del mean
    affinity = torch.stack(
        [
            (images - _shifted(pads[dilation], dilation, step, height, width)).abs_().div_(scale).mean(dim=1).neg_()
            for dilation in dilations
            for step in NEIGHBOUR_STEPS
        ],
        dim=1,
    )  # B x P x H x W
    return affinity.softmax(dim=1)


def pamr(
    images: torch.Tensor,
    logits: torch.Tensor,
    iterations: int = 10,
    dilations: Sequence[int] = (8, 16),
    max_elements: int = 64_000_000,
) -> torch.Tensor:
    """Refined logits: ``iterations`` affinity-weighted neighbour sums of every class map.

    images: B x K x H x W guide (normalised image, same H x W); logits: B x C x H x W.
    Returns B x C x H x W float32 on the logits' device.
    """
    if images.ndim != 4 or logits.ndim != 4 or images.shape[0] != logits.shape[0] or images.shape[-2:] != logits.shape[-2:]:
        raise ValueError(f"PAMR needs B x K x H x W images and B x C x H x W logits, got {tuple(images.shape)}, {tuple(logits.shape)}")
    batch, classes, height, width = logits.shape
    dilations = tuple(int(d) for d in dilations)
    affinity = pamr_affinity(images, dilations)  # B x P x H x W
    weights = [
        [affinity[:, index * len(NEIGHBOUR_STEPS) + k, None] for k in range(len(NEIGHBOUR_STEPS))]
        for index in range(len(dilations))
    ]
    # Working set of one chunk: the map, its largest padded copy and the accumulator.
    largest = max(dilations)
    per_class = batch * ((height + 2 * largest) * (width + 2 * largest) + 2 * height * width)
    chunk = max(1, min(classes, max_elements // max(per_class, 1)))
    refined = torch.empty(batch, classes, height, width, device=logits.device, dtype=torch.float32)
    for start in range(0, classes, chunk):
        current = logits[:, start : start + chunk].float()
        for _ in range(iterations):
            total = torch.zeros_like(current)
            for dilation, dilation_weights in zip(dilations, weights):
                padded = F.pad(current, [dilation] * 4, mode="replicate")
                for step, weight in zip(NEIGHBOUR_STEPS, dilation_weights):
                    total.addcmul_(_shifted(padded, dilation, step, height, width), weight)
                del padded
            current = total
        refined[:, start : start + chunk] = current
    return refined
