"""What the driver takes from the models before any work: the run's text embeddings and provenance."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from clipdiy.segmentation.config import SegmenterConfig

if TYPE_CHECKING:
    from clipdiy.segmentation.segmenter import Provenance


@dataclass(frozen=True)
class DriverModels:
    """What the driver resolves from the models before any work: embeddings and provenance."""

    text_embeddings: np.ndarray  # C x D float32, L2-normalised
    provenance: Provenance
    class_names: tuple[str, ...]


def resolve_models(segmenter_config: SegmenterConfig) -> DriverModels:
    """Load the models once in the driver (CPU): missing weights or a bad vocabulary fail here,
    before any work; the text embeddings computed here are the run's only ones."""
    from clipdiy.segmentation.segmenter import create_segmenter

    segmenter = create_segmenter(dataclasses.replace(segmenter_config, device="cpu"))
    models = DriverModels(
        text_embeddings=segmenter.text_embeddings.detach().cpu().numpy().astype(np.float32),
        provenance=segmenter.provenance,
        class_names=tuple(segmenter.class_names),
    )
    del segmenter
    return models
