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

Large photos (:func:`refine_in_bands`): the same refinement with the class maps at the original
size never held whole. The coarse decision is asked for bands of rows, twice: a first pass
builds the half-resolution maps the regions need (labels, the probability of each pixel's own
class, each class's mask prompt, which classes reach ``coarse_thresh``), SAM decodes, and a
second pass scores each band. What it holds beyond a band is per half-resolution pixel (about 4
bytes an original pixel) and per prompt (SAM's 256 x 256 masks), never C maps of the photo.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
    regions (K). Coordinates are half-resolution pixels; ``region_map`` (B x dh x dw int32) gives
    each half-resolution pixel's kept region (its index in these lists), -1 for none (classes'
    regions never overlap: a pixel has one coarse label)."""

    image: list[int]
    klass: list[int]
    point: list[tuple[int, int]]  # (x, y)
    box: list[tuple[int, int, int, int]]  # (x1, y1, x2, y2), inclusive
    prompt: list[int]  # index into the (image, class) pairs
    pairs: list[tuple[int, int]]
    region_map: np.ndarray


def find_regions(labels_half: np.ndarray, own: np.ndarray, eligible: np.ndarray, minimal_area: int) -> Regions:
    """The coarse regions of every image and class (TRIDENT.md 7.3).

    labels_half: B x dh x dw int (C marks the set-aside pixels); own: B x dh x dw float, each
    pixel's half-resolution probability of its own label's class (inside a region of class c,
    P_d[c]; elsewhere unread); eligible: B x C bool, classes whose half-resolution probability
    reaches ``coarse_thresh``. The point of a region is its most probable pixel, the first in
    row-major order among equals (torch.argmax's rule, as the authors' code).
    """
    regions = Regions([], [], [], [], [], [], np.full(labels_half.shape, -1, np.int32))
    for b in range(labels_half.shape[0]):
        values = own[b].ravel()
        for c in np.unique(labels_half[b]).tolist():
            if c >= eligible.shape[1] or not eligible[b, c]:
                continue
            count, components, stats, _ = cv2.connectedComponentsWithStats((labels_half[b] == c).astype(np.uint8), connectivity=8, ltype=cv2.CV_32S)
            kept = [k for k in range(1, count) if stats[k, cv2.CC_STAT_AREA] >= minimal_area]
            if not kept:
                continue
            regions.pairs.append((b, c))
            lookup = np.full(count, -1, np.int32)
            lookup[kept] = np.arange(len(regions.image), len(regions.image) + len(kept), dtype=np.int32)
            ids = lookup[components]
            np.copyto(regions.region_map[b], ids, where=ids >= 0)
            del ids
            flat = components.ravel()
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
    return regions


@dataclass
class Decoded:
    """SAM's answer to a batch's prompts: the kept masks' low-resolution logits (k x 256 x 256),
    the (image, class) each scores (``targets``, k, as image * C + class), and which regions'
    masks were dropped (n bool)."""

    low_res: torch.Tensor
    targets: torch.Tensor
    failed: np.ndarray


def decode_regions(sam: nn.Module, image_embeddings: torch.Tensor, regions: Regions, prompt_maps: torch.Tensor, size: tuple[int, int], classes: int, setting: SamRefineSetting) -> Decoded:
    """Prompt SAM with every region (TRIDENT.md 7.4, 7.5): its point, its box, its class's mask prompt.

    prompt_maps: K x h' x w', each (image, class) pair's half-resolution probabilities resized
    bilinearly to ``preprocess_shape(H0, W0, 256)``; size: (H0, W0)."""
    height, width = size
    half_h, half_w = height // 2, width // 2
    device = prompt_maps.device
    # Prompts in SAM's frame: the half-resolution photo's own 1024-px shape (7.4.2).
    frame_h, frame_w = preprocess_shape(half_h, half_w, SAM_SIZE)
    scale = torch.tensor([frame_w / half_w, frame_h / half_h], device=device)
    points = torch.tensor(regions.point, dtype=torch.float32, device=device) * scale
    boxes = (torch.tensor(regions.box, dtype=torch.float32, device=device).view(-1, 2, 2) * scale).view(-1, 4)
    # Mask prompts (7.4.1): the class's half-resolution map at 256 px (the photo's shape), padded.
    maps = F.pad(prompt_maps, (0, MASK_PROMPT_SIZE - prompt_maps.shape[-1], 0, MASK_PROMPT_SIZE - prompt_maps.shape[-2]))
    maps = torch.where(maps > setting.coarse_thresh, setting.mask_coefficient * maps, torch.zeros_like(maps))

    from clipdiy.segmentation.models.sam_decoder import (
        decode_masks,
        mask_prompt_embeddings,
    )

    dense = mask_prompt_embeddings(sam.prompt_encoder, maps.to(sam.prompt_encoder.no_mask_embed.weight.dtype))
    image_index = torch.tensor(regions.image, device=device)
    low_res, ious = decode_masks(sam, image_embeddings, image_index, points, boxes, dense, torch.tensor(regions.prompt, device=device))
    valid = (ious > setting.iou_thresh).cpu().numpy()
    kept = np.flatnonzero(valid)
    targets = torch.tensor([regions.image[i] * classes + regions.klass[i] for i in kept], device=device, dtype=torch.long)
    return Decoded(low_res[torch.as_tensor(kept, device=device, dtype=torch.long)], targets, ~valid)


def failed_half_map(regions: Regions, decoded: Decoded) -> np.ndarray:
    """B x dh x dw bool: the half-resolution pixels of the regions whose masks were dropped."""
    failed_ids = np.flatnonzero(decoded.failed)
    return np.isin(regions.region_map, failed_ids) if failed_ids.size else np.zeros(regions.region_map.shape, bool)


def score_rows(
    decoded: Decoded,
    failed_half: np.ndarray,
    probabilities: torch.Tensor,
    labels: torch.Tensor,
    rows: tuple[int, int],
    size: tuple[int, int],
    input_size: tuple[int, int],
    refined: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The refined labels and scores R of original rows [r0, r1) (all of a photo's, or a band's)
    (TRIDENT.md 7.6, 7.7).

    probabilities: B x C x (r1 - r0) x W0, the authors' coarse class probabilities of those rows;
    labels: B x (r1 - r0) x W0 their coarse labels; refined: B bool, the images with a kept mask
    (the others keep their coarse labels and probabilities). Each kept mask's logits are resized
    to the photo as SAM's ``postprocess_masks`` does, only those rows of it
    (:func:`~clipdiy.segmentation.models.sam_decoder.upsample_mask_rows`).
    """
    from clipdiy.segmentation.models.sam_decoder import upsample_mask_rows
    from clipdiy.segmentation.tiles import nearest_indices

    batch, classes, band, width = probabilities.shape
    height = size[0]
    device = probabilities.device
    stretched = (-(-height // 16) * 16, -(-width // 16) * 16)  # the image SAM was given (3.4.1)
    scores = torch.zeros(probabilities.shape, dtype=probabilities.dtype, device=device)
    if decoded.targets.numel():
        scored, order = torch.unique(decoded.targets, return_inverse=True)
        best = torch.full((scored.numel(), band * width), float("-inf"), device=device)
        for start in range(0, decoded.targets.numel(), UPSAMPLE_CHUNK):
            upsampled = upsample_mask_rows(decoded.low_res[start : start + UPSAMPLE_CHUNK].float(), input_size, stretched, size, rows)
            best.scatter_reduce_(0, order[start : start + UPSAMPLE_CHUNK, None].expand(-1, band * width), upsampled.flatten(1), "amax")
            del upsampled
        # max_m(sigmoid(l_m) * P_c) = sigmoid(max_m l_m) * P_c (both monotone); gated by the union of masks.
        flat_probabilities = probabilities[scored // classes, scored % classes].reshape(-1, band * width)  # only the scored maps
        scores.view(batch * classes, band * width)[scored] = torch.where(best > 0, torch.sigmoid(best) * flat_probabilities, 0.0)
        del best, flat_probabilities
    refined_labels = torch.where(scores.sum(dim=1) == 0, labels, scores.argmax(dim=1))

    # Regions whose masks were dropped (7.7): their pixels score at least the coarse probabilities
    # (the half-resolution map, nearest to the original size, these rows).
    half_rows = nearest_indices(height, failed_half.shape[1])[rows[0] : rows[1]]
    half_cols = nearest_indices(width, failed_half.shape[2])
    failed = torch.from_numpy(failed_half[:, half_rows][:, :, half_cols]).to(device)
    scores = torch.maximum(scores, failed[:, None] * probabilities)
    labels = torch.where(refined[:, None, None], refined_labels, labels)
    scores = torch.where(refined[:, None, None, None], scores, probabilities)
    return labels, scores


def _refined_images(decoded: Decoded, classes: int, batch: int, device) -> torch.Tensor:
    refined = torch.zeros(batch, dtype=torch.bool, device=device)
    refined[torch.div(decoded.targets, classes, rounding_mode="floor")] = True
    return refined


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
    own = probabilities_half.gather(1, labels_half.clamp(max=classes - 1)[:, None])[:, 0]
    regions = find_regions(labels_half.cpu().numpy(), own.float().cpu().numpy(), eligible, setting.minimal_area)
    del own
    if not regions.image:
        return labels, probabilities, unchanged
    pair_images = torch.tensor([b for b, _ in regions.pairs], device=device)
    pair_classes = torch.tensor([c for _, c in regions.pairs], device=device)
    prompt_h, prompt_w = preprocess_shape(height, width, MASK_PROMPT_SIZE)
    prompt_maps = F.interpolate(probabilities_half[pair_images, pair_classes][:, None], (prompt_h, prompt_w), mode="bilinear", align_corners=False)[:, 0]
    del probabilities_half
    decoded = decode_regions(sam, image_embeddings, regions, prompt_maps, (height, width), classes, setting)
    refined = _refined_images(decoded, classes, batch, device)
    labels, scores = score_rows(decoded, failed_half_map(regions, decoded), probabilities, labels, (0, height), (height, width), input_size, refined)
    return labels, scores, refined


#: Coarse decision of original rows [r0, r1): (B x C x rows x W0 the authors' class probabilities,
#: B x rows x W0 labels).
CoarseRows = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def refine_in_bands(
    sam: nn.Module,
    image_embeddings: torch.Tensor,
    coarse_rows: CoarseRows,
    batch: int,
    classes: int,
    size: tuple[int, int],
    input_size: tuple[int, int],
    setting: SamRefineSetting,
    band_rows: int,
) -> Iterator[tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`sam_refine` of B photos of one size H0 x W0 whose coarse maps are computed a band
    of rows at a time (``coarse_rows``, asked twice for every row), never whole.

    Yields (r0, r1, probabilities, labels, scores) for consecutive bands of at most ``band_rows``
    original rows: the coarse probabilities (B x C x rows x W0), the refined labels and the
    refined scores R of those rows, as :func:`sam_refine` gives them for the whole photo (to
    float32 rounding: the same resizes, computed for a band's rows; :mod:`clipdiy.segmentation.tiles`).

    Pass 1 walks the half-resolution rows in bands: the original rows their bilinear (and
    nearest) downsampling reads, decided by ``coarse_rows``, give their labels, each pixel's own
    class probability, the classes that reach ``coarse_thresh`` and the rows of every class's
    256-px mask prompt whose first source row falls in the band. Then the regions and SAM's
    decoder, as :func:`sam_refine`; pass 2 scores each band.
    """
    from clipdiy.segmentation.tiles import bilinear_region, nearest_indices, source_span

    height, width = size
    device = image_embeddings.device
    half_h, half_w = height // 2, width // 2
    refined = torch.zeros(batch, dtype=torch.bool, device=device)
    decoded = None
    if half_h and half_w:
        coarse = setting.coarse_thresh
        label_rows, label_cols = nearest_indices(half_h, height), nearest_indices(half_w, width)
        prompt_h, prompt_w = preprocess_shape(height, width, MASK_PROMPT_SIZE)
        prompt_first = _bilinear_first_rows(prompt_h, half_h)
        labels_half = np.empty((batch, half_h, half_w), np.int16 if classes < 2**15 else np.int32)
        own = np.empty((batch, half_h, half_w), np.float32)
        eligible = torch.zeros(batch, classes, dtype=torch.bool, device=device)
        prompt_maps = torch.empty(batch, classes, prompt_h, prompt_w, device=device)
        step = max(1, band_rows // 2)
        for h0 in range(0, half_h, step):
            h1 = min(half_h, h0 + step)
            # The half rows [h0, h1) and one more: a prompt row reads two consecutive half rows.
            reach = min(half_h, h1 + 1)
            lo, hi = source_span(half_h, height, h0, reach)
            lo, hi = min(lo, int(label_rows[h0])), max(hi, int(label_rows[h1 - 1]) + 1)
            probabilities, labels = coarse_rows(lo, hi)
            half = bilinear_region(probabilities, (half_h, half_w), (h0, reach), (0, half_w), source_size=size, source_origin=(lo, 0))
            del probabilities
            band = labels[:, torch.as_tensor(label_rows[h0:h1] - lo, device=labels.device)][:, :, torch.as_tensor(label_cols, device=labels.device)]
            top = half[:, :, : h1 - h0].amax(dim=1)
            if coarse > 0:
                band = band.masked_fill(top < coarse, classes)
            eligible |= half[:, :, : h1 - h0].amax(dim=(2, 3)) >= coarse
            own[:, h0:h1] = half[:, :, : h1 - h0].gather(1, band.clamp(max=classes - 1)[:, None])[:, 0].float().cpu().numpy()
            labels_half[:, h0:h1] = band.cpu().numpy()
            first = int(np.searchsorted(prompt_first, h0))
            last = int(np.searchsorted(prompt_first, h1))
            if last > first:
                prompt_maps[:, :, first:last] = bilinear_region(half, (prompt_h, prompt_w), (first, last), (0, prompt_w), source_size=(half_h, half_w), source_origin=(h0, 0))
            del half, band, top, labels
        regions = find_regions(labels_half, own, eligible.cpu().numpy(), setting.minimal_area)
        del labels_half, own
        if regions.image:
            pair_images = torch.tensor([b for b, _ in regions.pairs], device=device)
            pair_classes = torch.tensor([c for _, c in regions.pairs], device=device)
            decoded = decode_regions(sam, image_embeddings, regions, prompt_maps[pair_images, pair_classes], size, classes, setting)
            refined = _refined_images(decoded, classes, batch, device)
            failed_half = failed_half_map(regions, decoded)
        del prompt_maps, regions
    for r0 in range(0, height, band_rows):
        r1 = min(height, r0 + band_rows)
        probabilities, labels = coarse_rows(r0, r1)
        if decoded is None:
            yield r0, r1, probabilities, labels, probabilities
            continue
        refined_labels, scores = score_rows(decoded, failed_half, probabilities, labels, (r0, r1), size, input_size, refined)
        yield r0, r1, probabilities, refined_labels, scores


def _bilinear_first_rows(out_size: int, in_size: int) -> np.ndarray:
    """The first source row each output row of a bilinear resize reads (nondecreasing)."""
    from clipdiy.segmentation.tiles import _bilinear_taps

    return _bilinear_taps(out_size, in_size, 0, out_size, "cpu")[0].numpy()
