"""Trident's SAM refinement (TRIDENT.md 7): the coarse labels' regions prompt SAM, and each
class keeps what SAM's confident masks cover.

Per image, at half the original resolution: the pixels whose best class probability is under
``coarse_thresh`` are set aside; every other class region (8-connected, at least
``minimal_area`` half-resolution pixels, of a class whose probability reaches ``coarse_thresh``
somewhere) becomes one SAM prompt: its most probable pixel, its bounding box and its class's
probability map (scaled by ``mask_coefficient`` above ``coarse_thresh``) as the mask prompt.
SAM's masks whose predicted IoU exceeds ``iou_thresh`` are kept; at the original size, class c
scores ``R_c = [any kept mask of c covers the pixel] * max over them of sigmoid(mask logit) * P_c``;
a pixel takes the best-scoring class, or keeps its coarse label where no class scores. Pixels of
the regions whose masks were dropped score at least their coarse probabilities (labels unchanged).
An image with no kept mask keeps its coarse labels and probabilities.

Batched: the regions of all images of a batch (one original size, one SAM input size) go through
SAM's decoder together (:func:`~clipdiy.segmentation.models.sam_decoder.decode_masks`); only the
connected-component labelling runs per image and class, on the CPU (OpenCV), at half resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: SAM's square encoder input and its mask-prompt side (segment-anything's ``ResizeLongestSide``).
SAM_SIZE = 1024
MASK_PROMPT_SIZE = 256
#: Upsampled masks in flight at once (each H0 x W0 float32).
UPSAMPLE_CHUNK = 16


@dataclass(frozen=True)
class SamRefineSetting:
    """The refinement's settings (TRIDENT.md 2.1, 7): the authors' per-data-set ``coarse_thresh``
    and their base ``minimal_area``, ``sam_iou_thresh`` and ``sam_mask_coff``."""

    coarse_thresh: float
    minimal_area: int = 225
    iou_thresh: float = 0.80
    mask_coefficient: float = 0.005


def preprocess_shape(height: int, width: int, longest: int) -> tuple[int, int]:
    """segment-anything's ``get_preprocess_shape``: the longest side to ``longest``, int(x + 0.5)."""
    scale = longest / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


@dataclass
class Regions:
    """The prompts of a batch: one per kept region (n), one mask prompt per (image, class) with
    regions (K). Coordinates are half-resolution pixels."""

    image: list[int]
    klass: list[int]
    point: list[tuple[int, int]]  # (x, y)
    box: list[tuple[int, int, int, int]]  # (x1, y1, x2, y2), inclusive
    prompt: list[int]  # index into the (image, class) pairs
    pairs: list[tuple[int, int]]
    component_maps: list[np.ndarray]  # per pair: dh x dw int32 component labels
    component: list[int]  # the region's label in its pair's map


def find_regions(labels_half: np.ndarray, probabilities_half: torch.Tensor, eligible: np.ndarray, minimal_area: int) -> Regions:
    """The coarse regions of every image and class (TRIDENT.md 7.3).

    labels_half: B x dh x dw int (C marks the set-aside pixels); probabilities_half: B x C x dh x dw
    (on any device); eligible: B x C bool, classes whose half-resolution probability reaches
    ``coarse_thresh``. The point of a region is its most probable pixel, the first in row-major
    order among equals (torch.argmax's rule, as the authors' code).
    """
    regions = Regions([], [], [], [], [], [], [], [])
    for b in range(labels_half.shape[0]):
        for c in np.unique(labels_half[b]).tolist():
            if c >= eligible.shape[1] or not eligible[b, c]:
                continue
            count, components, stats, _ = cv2.connectedComponentsWithStats((labels_half[b] == c).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
            kept = [k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= minimal_area]
            if not kept:
                continue
            regions.pairs.append((b, c))
            regions.component_maps.append(components)
            flat = components.ravel()
            values = probabilities_half[b, c].float().cpu().numpy().ravel()
            # Per component: the highest value, the first index among equals.
            order = np.lexsort((np.arange(flat.size), -values, flat))
            starts = np.searchsorted(flat[order], kept)
            for k, start in zip(kept, starts):
                index = int(order[start])
                left, top, width, height = (int(v) for v in stats[k, :4])
                regions.image.append(b)
                regions.klass.append(c)
                regions.point.append((index % components.shape[1], index // components.shape[1]))
                regions.box.append((left, top, left + width - 1, top + height - 1))
                regions.prompt.append(len(regions.pairs) - 1)
                regions.component.append(k)
    return regions


@torch.no_grad()
def sam_refine(
    sam: nn.Module,
    image_embeddings: torch.Tensor,
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    input_size: tuple[int, int],
    setting: SamRefineSetting,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refine B images of one original size H0 x W0 (TRIDENT.md 7).

    sam: segment-anything's ``Sam`` (its prompt encoder and mask decoder); image_embeddings:
    B x 256 x 64 x 64 from SAM's encoder; probabilities: B x C x H0 x W0, the authors' class
    probabilities (background the max of its queries, not renormalised); labels: B x H0 x W0
    coarse labels; input_size: (h, w) of SAM's resized input (before padding to 1024).
    Returns the refined labels B x H0 x W0, the refined scores R (B x C x H0 x W0; an image
    without kept masks keeps its ``probabilities``), and which images were refined (B bool).
    """
    batch, classes, height, width = probabilities.shape
    device = probabilities.device
    unchanged = torch.zeros(batch, dtype=torch.bool, device=device)
    half_h, half_w = height // 2, width // 2
    if half_h == 0 or half_w == 0:  # no region of minimal_area fits (the authors' code cannot resize to 0)
        return labels, probabilities, unchanged
    labels_half = F.interpolate(labels[:, None].float(), (half_h, half_w), mode="nearest")[:, 0].long()
    probabilities_half = F.interpolate(probabilities, (half_h, half_w), mode="bilinear", align_corners=False)
    coarse = setting.coarse_thresh
    if coarse > 0:
        labels_half = labels_half.masked_fill(probabilities_half.amax(dim=1) < coarse, classes)
    eligible = (probabilities_half.amax(dim=(2, 3)) >= coarse).cpu().numpy()
    regions = find_regions(labels_half.cpu().numpy(), probabilities_half, eligible, setting.minimal_area)
    if not regions.image:
        return labels, probabilities, unchanged

    # Prompts in SAM's frame: the half-resolution photo's own 1024-px shape (7.4.2).
    frame_h, frame_w = preprocess_shape(half_h, half_w, SAM_SIZE)
    scale = torch.tensor([frame_w / half_w, frame_h / half_h], device=device)
    points = torch.tensor(regions.point, dtype=torch.float32, device=device) * scale
    boxes = (torch.tensor(regions.box, dtype=torch.float32, device=device).view(-1, 2, 2) * scale).view(-1, 4)
    # Mask prompts (7.4.1): the class's half-resolution map at 256 px (the photo's shape), padded.
    pair_images = torch.tensor([b for b, _ in regions.pairs], device=device)
    pair_classes = torch.tensor([c for _, c in regions.pairs], device=device)
    prompt_h, prompt_w = preprocess_shape(height, width, MASK_PROMPT_SIZE)
    maps = F.interpolate(probabilities_half[pair_images, pair_classes][:, None], (prompt_h, prompt_w), mode="bilinear", align_corners=False)[:, 0]
    maps = F.pad(maps, (0, MASK_PROMPT_SIZE - prompt_w, 0, MASK_PROMPT_SIZE - prompt_h))
    maps = torch.where(maps > coarse, setting.mask_coefficient * maps, torch.zeros_like(maps))

    from clipdiy.segmentation.models.sam_decoder import (
        decode_masks,
        mask_prompt_embeddings,
        upsample_mask_logits,
    )

    dense = mask_prompt_embeddings(sam.prompt_encoder, maps.to(sam.prompt_encoder.no_mask_embed.weight.dtype))
    image_index = torch.tensor(regions.image, device=device)
    low_res, ious = decode_masks(sam, image_embeddings, image_index, points, boxes, dense, torch.tensor(regions.prompt, device=device))
    valid = (ious > setting.iou_thresh).cpu().numpy()

    # Per (image, class) with kept masks: the max over them of the mask logit at H0 x W0 (7.6).
    stretched = (-(-height // 16) * 16, -(-width // 16) * 16)  # the image SAM was given (3.4.1)
    kept = np.flatnonzero(valid)
    scores = torch.zeros(probabilities.shape, dtype=probabilities.dtype, device=device)
    if kept.size:
        targets = torch.tensor([regions.image[i] * classes + regions.klass[i] for i in kept], device=device, dtype=torch.long)
        scored, rows = torch.unique(targets, return_inverse=True)
        best = torch.full((scored.numel(), height * width), float("-inf"), device=device)
        for start in range(0, kept.size, UPSAMPLE_CHUNK):
            chunk = torch.as_tensor(kept[start : start + UPSAMPLE_CHUNK], device=device)
            upsampled = upsample_mask_logits(low_res[chunk].float(), input_size, stretched, (height, width))
            best.scatter_reduce_(0, rows[start : start + UPSAMPLE_CHUNK, None].expand(-1, height * width), upsampled.flatten(1), "amax")
        # max_m(sigmoid(l_m) * P_c) = sigmoid(max_m l_m) * P_c (both monotone); gated by the union of masks.
        flat_probabilities = probabilities.reshape(batch * classes, height * width)[scored]
        scores.view(batch * classes, height * width)[scored] = torch.where(best > 0, torch.sigmoid(best) * flat_probabilities, 0.0)
        del best, flat_probabilities
    refined_labels = torch.where(scores.sum(dim=1) == 0, labels, scores.argmax(dim=1))

    # Regions whose masks were dropped (7.7): their pixels score at least the coarse probabilities.
    failed = torch.zeros(batch, half_h, half_w, dtype=torch.bool)
    for i in np.flatnonzero(~valid):
        failed[regions.image[i]] |= torch.from_numpy(regions.component_maps[regions.prompt[i]] == regions.component[i])
    failed = F.interpolate(failed[:, None].float().to(device), (height, width), mode="nearest")[:, 0] > 0
    scores = torch.maximum(scores, failed[:, None] * probabilities)

    refined = torch.zeros(batch, dtype=torch.bool)
    refined[torch.as_tensor([regions.image[i] for i in kept], dtype=torch.long)] = True
    refined = refined.to(device)
    labels = torch.where(refined[:, None, None], refined_labels, labels)
    scores = torch.where(refined[:, None, None, None], scores, probabilities)
    return labels, scores, refined
