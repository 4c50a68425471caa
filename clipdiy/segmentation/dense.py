"""Dense multi-scale CLIP scores (SPEC section 1), batched over crops and images.

Every crop of every image in the batch is cut with strided views, resized to CLIP's input with
the PIL-exact bicubic (:func:`clipdiy.segmentation.preprocess.pil_bicubic_resize`), and goes through CLIP in
chunks of ``crop_batch_size``; the scores are laid out on each scale's crop grid, upsampled and
averaged. No per-crop Python, no PIL, no host round trips: everything stays on the device of the
input images.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from clipdiy.segmentation.preprocess import crop_grid, pil_bicubic_resize

#: CLIP's image normalisation (SPEC 1.3).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: The reference's patch sizes: grids of 1x1, 3x3 and 7x7 on a 256 x 256 image (SPEC 1.2).
PATCH_SIZES = (256, 128, 64)


def cut_crops(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """All ``patch_size`` square crops with stride ``patch_size // 2``, no padding (SPEC 1.2).

    images: B x 3 x H x W. Returns (B * g_h * g_w) x 3 x p x p, ordered image-major, then grid
    row, then grid column, where (g_h, g_w) = :func:`clipdiy.segmentation.preprocess.crop_grid`.
    """
    batch, channels, height, width = images.shape
    grid_h, grid_w = crop_grid(height, width, patch_size)
    stride = patch_size // 2
    windows = images.unfold(2, patch_size, stride).unfold(3, patch_size, stride)  # B x 3 x gh x gw x p x p
    windows = windows.permute(0, 2, 3, 1, 4, 5)
    return windows.reshape(batch * grid_h * grid_w, channels, patch_size, patch_size)


class DenseScorer:
    """CLIP-DIY's dense score map: multi-scale crops classified by CLIP, spread back over pixels.

    ``encode_image``: B x 3 x S x S normalised float pixels -> B x D image embeddings (S =
    ``input_size``; they are L2-normalised here again, so a raw projection works too).
    ``text_embeddings``: C x D class embeddings (class 0 = background); normalised here.
    ``crop_batch_size`` bounds the crops of one CLIP forward and of one resize call, so memory
    stays bounded whatever the batch. ``pixel_dtype``: dtype of the pixels handed to
    ``encode_image`` (``None``: float32).
    """

    def __init__(
        self,
        encode_image: Callable[[torch.Tensor], torch.Tensor],
        text_embeddings: torch.Tensor,
        *,
        input_size: int = 224,
        mean: Sequence[float] = CLIP_MEAN,
        std: Sequence[float] = CLIP_STD,
        patch_sizes: Sequence[int] = PATCH_SIZES,
        crop_batch_size: int = 256,
        pixel_dtype: torch.dtype | None = None,
    ):
        if text_embeddings.ndim != 2 or text_embeddings.shape[0] < 1:
            raise ValueError(f"text_embeddings must be C x D, got {tuple(text_embeddings.shape)}")
        if not patch_sizes:
            raise ValueError("patch_sizes must name at least one patch size")
        for size in patch_sizes:
            if size < 2 or size % 2:
                raise ValueError(f"patch sizes must be even and >= 2, got {size}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std must be 3 values (std > 0), got {mean}, {std}")
        if crop_batch_size < 1:
            raise ValueError(f"crop_batch_size must be >= 1, got {crop_batch_size}")
        if input_size < 1:
            raise ValueError(f"input_size must be positive, got {input_size}")
        self.encode_image = encode_image
        self.text_embeddings = F.normalize(text_embeddings.detach().float(), dim=-1)
        self.input_size = int(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.patch_sizes = tuple(int(p) for p in patch_sizes)
        self.crop_batch_size = int(crop_batch_size)
        self.pixel_dtype = pixel_dtype or torch.float32

    @property
    def num_classes(self) -> int:
        return int(self.text_embeddings.shape[0])

    def crops_per_image(self, height: int, width: int) -> int:
        """Crops of one ``height x width`` image over all scales (59 for 256 x 256)."""
        total = 0
        for size in self.patch_sizes:
            grid_h, grid_w = crop_grid(height, width, size)
            total += grid_h * grid_w
        return total

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Mean multi-scale score map S (SPEC 1.2-1.8).

        images: B x 3 x H x W uint8 RGB, all of one size, H and W >= the largest patch size.
        Returns B x C x H x W float32 cosine scores (no logit scale, no softmax), on the images'
        device.
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected B x 3 x H x W uint8 images, got {images.dtype} {tuple(images.shape)}")
        batch, _, height, width = images.shape
        grids = [crop_grid(height, width, size) for size in self.patch_sizes]  # validates H, W
        if batch == 0:
            return torch.zeros(0, self.num_classes, height, width, device=images.device)
        crops = [cut_crops(images, size) for size in self.patch_sizes]
        scores = self._score(crops)  # N_total x C, scale-major, as ``crops``
        maps = torch.zeros(batch, self.num_classes, height, width, device=images.device)
        for (grid_h, grid_w), scale_scores in zip(grids, scores.split([len(c) for c in crops])):
            grid = scale_scores.view(batch, grid_h, grid_w, self.num_classes).permute(0, 3, 1, 2)
            maps += F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)
        return maps.div_(len(self.patch_sizes))

    def _score(self, crops: list[torch.Tensor]) -> torch.Tensor:
        """Cosine scores of every crop: list over scales of N_p x 3 x p x p uint8 -> N x C float32.

        Chunks run over the crops of all scales back to back, so every CLIP forward but the last
        is full; within a chunk the crops of one size are resized in one call.
        """
        device = crops[0].device
        text = self.text_embeddings.to(device)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        bounds = []
        start = 0
        for scale_crops in crops:
            bounds.append((start, start + len(scale_crops)))
            start += len(scale_crops)
        total = start
        scores = []
        for chunk_start in range(0, total, self.crop_batch_size):
            chunk_end = min(chunk_start + self.crop_batch_size, total)
            pieces = []
            for scale_crops, (first, last) in zip(crops, bounds):
                lo, hi = max(first, chunk_start), min(last, chunk_end)
                if lo < hi:
                    pieces.append(pil_bicubic_resize(scale_crops[lo - first : hi - first], self.input_size))
            # The image processor's arithmetic, in its order: x / 255, then (x - mean) / std.
            pixels = torch.cat(pieces).float().div_(255.0).sub_(mean).div_(std).to(self.pixel_dtype)
            features = F.normalize(self.encode_image(pixels).float(), dim=-1)
            scores.append(features @ text.T)
        return torch.cat(scores)
