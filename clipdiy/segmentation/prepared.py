"""The prepared image: what a CPU worker hands the segmenter for one image, and the CLIP-DIY
preparation (model input and saliency input)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipdiy.segmentation.images import ImageLike, to_rgb_uint8
from clipdiy.segmentation.preprocess import resize_for_model, resize_for_saliency


@dataclass
class PreparedImage:
    """What :meth:`Segmenter.predict` needs of one image, prepared on the CPU.

    ``model_input``: h x w x 3 uint8 (256 x 256 faithful); ``saliency_input``: h' x w' x 3 uint8,
    the saliency model's input (the original itself at full resolution, unless shrunk by
    ``SaliencyConfig.max_side``), ``None`` for a method without saliency; ``original_size``:
    (H, W) after EXIF orientation. The original is not kept: a pipeline ships only these to its
    accelerators.
    """

    model_input: np.ndarray
    saliency_input: np.ndarray | None
    original_size: tuple[int, int]


def prepare_image(image: ImageLike, mode: str = "faithful", saliency_max_side: int | None = None) -> PreparedImage:
    """CPU preprocessing of one image; raises :class:`~clipdiy.errors.InvalidImageError`.

    ``saliency_max_side``: see :attr:`clipdiy.segmentation.config.SaliencyConfig.max_side` (``None``: the
    saliency model sees the full resolution).
    """
    rgb = to_rgb_uint8(image)
    return PreparedImage(
        model_input=resize_for_model(rgb, mode),
        saliency_input=resize_for_saliency(rgb, saliency_max_side),
        original_size=(int(rgb.shape[0]), int(rgb.shape[1])),
    )
