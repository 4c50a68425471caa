"""``none``: the paper's no-saliency ablation (SPEC 3.5): label = argmax of the score map itself.

Its map is all ones ("everything foreground") for the outputs' saliency and foreground fields
only; ``weights_scores = False`` tells the fusion not to weight by it (weighting by s = 1 would
zero the background channel, so that background could never win).
"""

from __future__ import annotations

import torch

from clipdiy.segmentation.config import SaliencyConfig
from clipdiy.segmentation.models.saliency import register_saliency_backend
from clipdiy.segmentation.models.saliency.base import SaliencyModel, check_images


class NoSaliency(SaliencyModel):
    name = "none"
    weights_id = None
    needs_pixels = False
    weights_scores = False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W -> B x 1 x H x W of ones (same dtype and device)."""
        check_images(images)
        return images.new_ones((images.shape[0], 1, images.shape[2], images.shape[3]))


@register_saliency_backend("none", needs_pixels=NoSaliency.needs_pixels)
def create_no_saliency(config: SaliencyConfig, device: torch.device, dtype: torch.dtype | None) -> NoSaliency:
    return NoSaliency().to(device)
