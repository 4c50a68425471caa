"""A plain, per-image, per-crop transcription of CLIP-DIY (SPEC sections 1 and 3). Not a test module.

Written the way the authors' reference code runs, one image and one crop at a time, to check the
batched implementation against. It deliberately shares no code with ``clipdiy.segmentation.dense`` or
``clipdiy.segmentation.preprocess``: OpenCV resizes the image, every crop becomes an 8-bit PIL image resized
with PIL's bicubic, and every crop gets its own CLIP forward.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MODEL_SIZE = 256
PATCH_SIZES = (256, 128, 64)
CLIP_INPUT = 224
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def reference_resize(image: np.ndarray) -> np.ndarray:
    """SPEC 1.1: H x W x 3 uint8 -> 256 x 256 x 3 uint8, OpenCV bilinear, aspect not kept."""
    return cv2.resize(image, (MODEL_SIZE, MODEL_SIZE), interpolation=cv2.INTER_LINEAR)


def clip_preprocess(crop: np.ndarray) -> torch.Tensor:
    """SPEC 1.3 as the reference's image processor does it: p x p x 3 uint8 -> 1 x 3 x 224 x 224."""
    resized = Image.fromarray(crop).resize((CLIP_INPUT, CLIP_INPUT), Image.BICUBIC)
    pixels = np.asarray(resized).astype(np.float32) / 255.0
    pixels = (pixels - CLIP_MEAN) / CLIP_STD
    return torch.from_numpy(pixels).permute(2, 0, 1)[None]


@torch.no_grad()
def reference_scores(
    image: np.ndarray,
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    text_embeddings: torch.Tensor,
    patch_sizes: tuple[int, ...] = PATCH_SIZES,
) -> torch.Tensor:
    """SPEC 1.2-1.8 on an already resized h x w x 3 uint8 image -> C x h x w float32 score map S.

    The crops of each scale walk the image with stride p / 2 and no padding; a 256 x 256 image
    gives 1 + 9 + 49 = 59 crops. Any h x w (aspect mode) gives its own grid.
    """
    height, width = image.shape[:2]
    text = text_embeddings.float()
    text = text / text.norm(dim=-1, keepdim=True)
    scale_maps = []
    for patch in patch_sizes:
        stride = patch // 2
        rows = list(range(0, height - patch + 1, stride))
        cols = list(range(0, width - patch + 1, stride))
        grid = torch.zeros(text.shape[0], len(rows), len(cols))
        for i, top in enumerate(rows):
            for j, left in enumerate(cols):
                crop = np.ascontiguousarray(image[top : top + patch, left : left + patch])
                feature = encode_image(clip_preprocess(crop)).float()[0]
                feature = feature / feature.norm()
                grid[:, i, j] = text @ feature
        upsampled = F.interpolate(grid[None], size=(height, width), mode="bilinear", align_corners=False)
        scale_maps.append(upsampled[0])
    return sum(scale_maps) / len(scale_maps)


def reference_fuse(scores: torch.Tensor, saliency: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 3.1-3.3: S (C x h x w) and a soft saliency map (H x W in [0, 1], any size).

    Returns (P, labels): C x h x w class probabilities and the h x w argmax label map.
    """
    height, width = scores.shape[-2:]
    s = torch.from_numpy(np.asarray(saliency, dtype=np.float32))[None, None]
    s = F.interpolate(s, size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    weighted = scores.clone()
    weighted[0] = scores[0] * (1.0 - s)
    for c in range(1, scores.shape[0]):
        weighted[c] = scores[c] * s
    probabilities = torch.softmax(weighted, dim=0)
    return probabilities, probabilities.argmax(dim=0)


def reference_segment(
    image: np.ndarray,
    encode_image: Callable[[torch.Tensor], torch.Tensor],
    text_embeddings: torch.Tensor,
    saliency: np.ndarray,
) -> dict[str, torch.Tensor]:
    """The whole faithful method on one H x W x 3 uint8 RGB image with its H x W saliency map.

    Returns ``scores`` (C x 256 x 256), ``probabilities`` (C x 256 x 256), ``labels`` (256 x 256)
    and ``label_map`` (H x W, nearest, SPEC 3.4).
    """
    scores = reference_scores(reference_resize(image), encode_image, text_embeddings)
    probabilities, labels = reference_fuse(scores, saliency)
    full = F.interpolate(labels[None, None].float(), size=image.shape[:2], mode="nearest")[0, 0].long()
    return {"scores": scores, "probabilities": probabilities, "labels": labels, "label_map": full}
