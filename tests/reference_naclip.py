"""A plain, per-image transcription of NACLIP + PAMR (SPEC 8), written for obviousness, not speed.

Used only by the tests to check the batched implementation (clipdiy.segmentation.methods.naclip,
clipdiy.segmentation.models.naclip, clipdiy.segmentation.refine). Nothing here imports those modules: the resize is
OpenCV's with mmcv's size rule, blocks 1-11 are open_clip's own, the reduced last block is
written out head by head, the neighbourhood bias is built pixel pair by pixel pair, the sliding
window is two loops, and PAMR takes its neighbours one offset at a time with clamped indices.
"""

from __future__ import annotations

import math

import cv2
import numpy as np
import torch
import torch.nn.functional as F

MEAN = np.array([122.771, 116.746, 104.094])
STD = np.array([68.501, 66.632, 70.323])
_BIAS_CACHE: dict[tuple[int, int, float], torch.Tensor] = {}


def reference_resize(rgb: np.ndarray, short: int = 336, long: int = 2048) -> np.ndarray:
    """SPEC 8.2: scale = min(336 / short, 2048 / long), size int(x * scale + 0.5), cv2 bilinear."""
    h, w = rgb.shape[:2]
    scale = min(short / min(h, w), long / max(h, w))
    new_w, new_h = int(w * scale + 0.5), int(h * scale + 0.5)
    return cv2.resize(rgb, (new_w, new_h), interpolation=cv2.INTER_LINEAR)


def reference_normalise(rgb: np.ndarray) -> torch.Tensor:
    """h x w x 3 uint8 -> 1 x 3 x h x w float32, (x - mean) / std on 0-255 values."""
    x = (rgb.astype(np.float64) - MEAN) / STD
    return torch.from_numpy(x).float().permute(2, 0, 1)[None].contiguous()


def reference_bias(gh: int, gw: int, sigma: float) -> torch.Tensor:
    """Omega, one token pair at a time: zero for the class token, Gaussian of grid distance otherwise."""
    key = (gh, gw, sigma)
    if key not in _BIAS_CACHE:
        n = gh * gw
        omega = np.zeros((n + 1, n + 1))
        for p in range(n):
            i, j = divmod(p, gw)
            for q in range(n):
                k, l = divmod(q, gw)
                omega[1 + p, 1 + q] = math.exp(-((i - k) ** 2 + (j - l) ** 2) / (2 * sigma**2))
        _BIAS_CACHE[key] = torch.from_numpy(omega).float()
    return _BIAS_CACHE[key]


def reference_features(visual, pixels: torch.Tensor, sigma: float = 5.0) -> torch.Tensor:
    """One image 1 x 3 x h x w -> gh x gw x D patch features (SPEC 8.3-8.5), L2-normalised."""
    patch = visual.conv1.kernel_size[0]
    _, _, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    x = visual.conv1(pixels)  # 1 x W x gh x gw
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.view(1, 1, -1), x], dim=1)
    table = visual.positional_embedding
    n = int(math.sqrt(table.shape[0] - 1))
    if (gh, gw) == (n, n):
        pos = table
    else:  # the DINO rule, as the authors' interpolate_pos_encoding
        grid = table[1:].reshape(1, n, n, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, scale_factor=((gh + 0.1) / n, (gw + 0.1) / n), mode="bicubic")
        assert grid.shape[-2:] == (gh, gw)
        pos = torch.cat([table[:1], grid.permute(0, 2, 3, 1).reshape(gh * gw, -1)])
    x = visual.ln_pre(x + pos)
    for block in visual.transformer.resblocks[:-1]:  # open_clip's own blocks 1-11
        x = block(x)
    last = visual.transformer.resblocks[-1]
    attn = last.attn
    y = last.ln_1(x)[0]  # N x W
    width = y.shape[-1]
    heads = attn.num_heads
    d = width // heads
    qkv = y @ attn.in_proj_weight.T + attn.in_proj_bias
    k = qkv[:, width : 2 * width]
    v = qkv[:, 2 * width :]
    omega = reference_bias(gh, gw, sigma)
    outputs = []
    for head in range(heads):
        kh = k[:, head * d : (head + 1) * d]
        vh = v[:, head * d : (head + 1) * d]
        weights = torch.softmax(kh @ kh.T / math.sqrt(d) + omega, dim=-1)
        outputs.append(weights @ vh)
    out = torch.cat(outputs, dim=-1) @ attn.out_proj.weight.T + attn.out_proj.bias  # no residual, no MLP
    tokens = visual.ln_post(out) @ visual.proj
    features = tokens[1:]
    features = features / features.norm(dim=-1, keepdim=True)
    return features.reshape(gh, gw, -1)


def reference_window_logits(visual, pixels: torch.Tensor, text: torch.Tensor, sigma: float) -> torch.Tensor:
    """1 x 3 x h x w -> Q x h x w: cosine logits on the patch grid, bilinear to the input size."""
    features = reference_features(visual, pixels, sigma)
    grid = torch.einsum("ijd,qd->qij", features, text)
    return F.interpolate(grid[None], size=tuple(pixels.shape[-2:]), mode="bilinear", align_corners=False)[0]


def reference_logits(visual, rgb: np.ndarray, text: torch.Tensor, window: str, sigma: float = 5.0):
    """(Q x H x W logits at the original size, 1 x 3 x H x W guide) of one H x W x 3 photo (SPEC 8.2-8.7)."""
    height, width = rgb.shape[:2]
    pixels = reference_normalise(reference_resize(rgb))
    _, _, h, w = pixels.shape
    if window == "whole":
        logits = reference_window_logits(visual, pixels, text, sigma)
    else:
        size, stride = 224, 112
        rows = max(h - size + stride - 1, 0) // stride + 1
        cols = max(w - size + stride - 1, 0) // stride + 1
        total = torch.zeros(text.shape[0], h, w)
        count = torch.zeros(1, h, w)
        for i in range(rows):
            for j in range(cols):
                y2 = min(i * stride + size, h)
                x2 = min(j * stride + size, w)
                y1 = max(y2 - size, 0)
                x1 = max(x2 - size, 0)
                total[:, y1:y2, x1:x2] += reference_window_logits(visual, pixels[:, :, y1:y2, x1:x2], text, sigma)
                count[:, y1:y2, x1:x2] += 1
        logits = total / count
    logits = F.interpolate(logits[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    guide = F.interpolate(pixels, size=(height, width), mode="bilinear", align_corners=False)
    return logits, guide


def reference_pamr(guide: np.ndarray, logits: np.ndarray, iterations: int = 10, dilations=(8, 16)) -> np.ndarray:
    """SPEC 8.8 with explicit neighbour loops, float64. guide: K x H x W; logits: C x H x W."""
    _, height, width = guide.shape
    ys, xs = np.arange(height), np.arange(width)

    def at(image: np.ndarray, dy: int, dx: int) -> np.ndarray:  # replicate padding = clamped indices
        return image[:, np.clip(ys + dy, 0, height - 1)][:, :, np.clip(xs + dx, 0, width - 1)]

    guide = guide.astype(np.float64)
    window = [at(guide, d * a, d * b) for d in dilations for a in (-1, 0, 1) for b in (-1, 0, 1)]
    sigma = np.std(np.stack(window), axis=0, ddof=1)  # K x H x W
    offsets = [(d * a, d * b) for d in dilations for a in (-1, 0, 1) for b in (-1, 0, 1) if (a, b) != (0, 0)]
    scores = np.stack([(-np.abs(guide - at(guide, dy, dx)) / (1e-8 + 0.1 * sigma)).mean(axis=0) for dy, dx in offsets])
    scores -= scores.max(axis=0, keepdims=True)
    weights = np.exp(scores)
    weights /= weights.sum(axis=0, keepdims=True)  # softmax over neighbours
    mask = logits.astype(np.float64)
    for _ in range(iterations):
        new = np.zeros_like(mask)
        for n, (dy, dx) in enumerate(offsets):
            new += weights[n][None] * at(mask, dy, dx)
        mask = new
    return mask


def reference_decide(logits: torch.Tensor, owners: list[int], num_classes: int, scale: float = 40.0, threshold: float = 0.1):
    """SPEC 8.9 for one image: (class probabilities before normalising C x H x W, labels H x W)."""
    probabilities = torch.softmax(scale * logits.double(), dim=0)
    classes = torch.zeros(num_classes, *logits.shape[1:], dtype=torch.float64)
    for c in range(num_classes):
        mine = [q for q, owner in enumerate(owners) if owner == c]
        classes[c] = probabilities[mine].max(dim=0).values
    top, labels = classes.max(dim=0)
    labels[top < threshold] = 0
    return classes, labels
