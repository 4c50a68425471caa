"""What the segmenter returns for one image."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from clipdiy import rle
from clipdiy.rle import Rle


@dataclass(frozen=True)
class ClassMask:
    """One present class of one image.

    ``rle``: COCO compressed RLE at the original resolution; ``area``: its pixel count; ``bbox``:
    COCO ``[x, y, width, height]``; ``score``: mean probability of the class over the pixels it
    wins, at the model resolution (256 x 256 in faithful mode).
    """

    class_id: int
    class_name: str
    rle: Rle
    area: int
    bbox: list[float]
    score: float


@dataclass
class SegmentationResult:
    """The labels of one image.

    label_map:           H x W uint16 class ids at the original resolution (nearest resize).
    class_scores:        (C,) float32, image-level score per class: the class's mean probability
                         over the whole model-resolution map (they sum to 1 over classes).
    mask_scores:         (C,) float32, mean probability of each class over the pixels it wins
                         (0 where it wins none).
    foreground_fraction: mean of the saliency map (1 = all foreground).
    saliency:            h x w float32 soft saliency at the model resolution, in [0, 1].
    probabilities:       C x h x w float32 class probabilities at the model resolution, only when
                         asked for (``return_probabilities=True``), else None.
    class_names:         the vocabulary's class names, index = class id (0 = background).
    """

    label_map: np.ndarray
    class_scores: np.ndarray
    mask_scores: np.ndarray
    foreground_fraction: float
    saliency: np.ndarray
    class_names: tuple[str, ...]
    probabilities: np.ndarray | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the original image."""
        return int(self.label_map.shape[0]), int(self.label_map.shape[1])

    def present_classes(self) -> np.ndarray:
        """Sorted ids of the classes that win at least one pixel."""
        return np.flatnonzero(np.bincount(self.label_map.ravel(), minlength=len(self.class_names)))

    def masks(self) -> list[ClassMask]:
        """One :class:`ClassMask` per present class, by class id."""
        return [
            ClassMask(
                class_id=class_id,
                class_name=self.class_names[class_id],
                rle=encoded,
                area=area,
                bbox=bbox,
                score=float(self.mask_scores[class_id]),
            )
            for class_id, encoded, area, bbox in rle.encode_label_map(self.label_map)
        ]
