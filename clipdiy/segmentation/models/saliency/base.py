"""The saliency interface: RGB images in, a soft foreground map out."""

from __future__ import annotations

import torch
from torch import nn


class SaliencyModel(nn.Module):
    """Foreground/background saliency (1 = foreground), frozen.

    ``name``: the backend's registry name. ``weights_id``: provenance of its weights (``None``
    when it has none). ``needs_pixels``: False for a backend whose map does not depend on the
    image's pixels (``none``): it is then given a placeholder batch of the right size instead.
    ``weights_scores``: False for a backend that stands for "no saliency" (``none``): the fusion
    then leaves the class scores unweighted (SPEC 3.5), and its map only fills the outputs'
    saliency and foreground fields.
    """

    name: str = ""
    weights_id: str | None = None
    needs_pixels: bool = True
    weights_scores: bool = True

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W float RGB in [0, 1] (one size per batch) -> B x 1 x H x W float in [0, 1]."""
        raise NotImplementedError


def check_images(images: torch.Tensor) -> None:
    """Raise ValueError unless ``images`` is a B x 3 x H x W floating-point batch."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"saliency expects B x 3 x H x W images, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"saliency expects float images in [0, 1], got {images.dtype}")
