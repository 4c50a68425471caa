"""NACLIP's whole-photo labels on windows of a photo too large to label whole (not a test module).

A 24- or 100-MP photo cannot be labelled untiled on a test machine (its query logits alone are
10-45 GB), so the checks of the tiled job compare windows of it: for a window of the photo, the
whole-photo path's labels there are computed here without the segmenter's tiles and without
``clipdiy.segmentation.tiles``:

- the input-size logits and guide come from the method's forward (the part before any tile);
- the bilinear resize (align_corners=False, as ``F.interpolate``) is rebuilt as two dense
  interpolation matrices in float64 from its definition, applied to the source rows and columns
  under the window;
- PAMR runs on the window widened by its whole reach (``iterations * max(dilations)`` for the
  logits plus ``max(dilations)`` for the affinity's guide): its wrong values at the widened
  window's cut edges travel at most that far, so the window itself is exact; at the photo's true
  borders the window is clipped, where the whole-photo path pads by replication too;
- the decision (softmax of ``logit_scale`` x logits over the query words, each word counted as
  often as it is listed, each class its best query, background under ``threshold``) is written
  out here, so that its margins are known: a pixel is *decided* where the best class leads the
  second and the threshold by more than ``margin``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from clipdiy.segmentation.refine import pamr, pamr_reach


@dataclass(frozen=True)
class WindowLabels:
    """labels: h x w int64 whole-photo labels of the window; decided: h x w bool (see module);
    probabilities: C x h x w float64 class probabilities (each class's best query, normalised
    over the classes, as ``return_probabilities`` gives them)."""

    labels: np.ndarray
    decided: np.ndarray
    probabilities: np.ndarray


def bilinear_matrix(out_size: int, in_size: int, start: int, end: int) -> torch.Tensor:
    """(end - start) x in_size float64 weights of output samples [start, end) of a bilinear
    resize from ``in_size`` to ``out_size`` with align_corners=False: sample point
    max((i + 0.5) * in / out - 0.5, 0), its two neighbours, the last one clamped."""
    point = ((torch.arange(start, end, dtype=torch.float64) + 0.5) * (in_size / out_size) - 0.5).clamp(min=0.0)
    low = point.floor().long()
    high = (low + 1).clamp(max=in_size - 1)
    weight = point - low
    matrix = torch.zeros(end - start, in_size, dtype=torch.float64)
    rows = torch.arange(end - start)
    matrix.index_put_((rows, low), 1.0 - weight, accumulate=True)
    matrix.index_put_((rows, high), weight, accumulate=True)
    return matrix


def resize_window(source: torch.Tensor, size: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    """1 x K x h' x w' source -> 1 x K x (r1 - r0) x (c1 - c0) float32: rows/cols of its bilinear
    resize to ``size``."""
    along_rows = bilinear_matrix(size[0], source.shape[-2], *rows)
    along_cols = bilinear_matrix(size[1], source.shape[-1], *cols)
    return torch.einsum("rh,khw,cw->krc", along_rows, source[0].double(), along_cols).float()[None]


@torch.inference_mode()
def deferred_forward(segmenter, prepared):
    """The method's forward of one photo larger than one tile: its input-size maps (``source``,
    ``source_guide``: 1 x U x h x w, 1 x 3 x h x w) and the original ``size``, not yet resized."""
    ((_, forward),) = list(segmenter.method.forward_groups([prepared]))
    if forward.source is None:
        raise ValueError("window_labels is for photos larger than one tile (the method defers their resize)")
    return forward


@torch.inference_mode()
def window_labels(segmenter, forward, rows: tuple[int, int], cols: tuple[int, int], margin: float = 1e-3) -> WindowLabels:
    """Whole-photo NACLIP (+ PAMR when the segmenter refines) labels of the photo's pixels
    [r0, r1) x [c0, c1), from its :func:`deferred_forward` (see the module)."""
    method = segmenter.method
    height, width = forward.size
    source = forward.source
    settings = segmenter.config.pamr
    refine = segmenter.refinement == "pamr"
    halo, guide_margin = pamr_reach(settings.iterations, settings.dilations) if refine else (0, 0)
    reach = halo + guide_margin
    wide_rows = (max(0, rows[0] - reach), min(height, rows[1] + reach))
    wide_cols = (max(0, cols[0] - reach), min(width, cols[1] + reach))
    logits = resize_window(source, (height, width), wide_rows, wide_cols)
    if refine:
        guide = resize_window(forward.source_guide, (height, width), wide_rows, wide_cols)
        logits = pamr(guide, logits, settings.iterations, settings.dilations, settings.max_elements)
    inner = logits[0, :, rows[0] - wide_rows[0] : rows[1] - wide_rows[0], cols[0] - wide_cols[0] : cols[1] - wide_cols[0]]
    return _decide(method, inner, margin)


def _decide(method, logits: torch.Tensor, margin: float) -> WindowLabels:
    """U x h x w query logits -> the labels of SPEC 8.9, and where they are decided by ``margin``."""
    config = method.config
    multiplicity = method.multiplicity if method.multiplicity is not None else torch.ones(logits.shape[0])
    scaled = logits.double() * config.logit_scale + multiplicity.double().log().view(-1, 1, 1)
    query_probabilities = scaled.softmax(dim=0) / multiplicity.double().view(-1, 1, 1)
    classes = torch.stack([query_probabilities[queries].amax(dim=0) for queries in method.class_queries])  # C x h x w
    ranked = classes.sort(dim=0, descending=True).values
    labels = classes.argmax(dim=0)
    labels[ranked[0] < config.threshold] = 0
    decided = (ranked[0] - ranked[1] > margin) & ((ranked[0] - config.threshold).abs() > margin)
    return WindowLabels(labels.numpy(), decided.numpy(), (classes / classes.sum(dim=0, keepdim=True)).numpy())


def random_windows(height: int, width: int, side: int, count: int, seed: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """``count`` seeded side x side windows anywhere in an H x W photo, plus its four corners
    (where the whole-photo path's replicate padding meets the tiles' clipped regions)."""
    rng = np.random.default_rng(seed)
    windows = [((0, side), (0, side)), ((0, side), (width - side, width)), ((height - side, height), (0, side)),
               ((height - side, height), (width - side, width))]
    for _ in range(count):
        top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
        windows.append(((top, top + side), (left, left + side)))
    return windows


def make_large_photo(source, path, width: int, height: int, seed: int = 0, quality: int = 90) -> None:
    """A ``width`` x ``height`` JPEG at ``path``: the photo ``source`` upscaled (bilinear) plus
    seeded Gaussian noise (sigma 6), so that PAMR's colour affinities see texture at every scale.
    Built in bands of rows so that no more than the upscaled photo is held."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    with Image.open(source) as image:
        rgb = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))
    noisy = np.empty_like(rgb)
    for top in range(0, height, 512):
        band = rgb[top : top + 512].astype(np.int16)
        band += rng.normal(0.0, 6.0, band.shape).round().astype(np.int16)
        noisy[top : top + 512] = band.clip(0, 255).astype(np.uint8)
    del rgb
    Image.fromarray(noisy).save(path, quality=quality)
