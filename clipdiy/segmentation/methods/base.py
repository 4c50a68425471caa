"""The interface between the :class:`~clipdiy.segmentation.segmenter.Segmenter` and a segmentation method."""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from clipdiy.segmentation.prepared import PreparedImage


@dataclass
class MethodLogits:
    """What a method's forward gives for one batch (all on the device).

    logits:     B x Q x h x w float32, the maps a refinement (PAMR) works on; Q may exceed the
                vocabulary's classes (NACLIP: one map per query word). Any memory layout
                (NACLIP's are pixel-major: channels-last strides).
    guide:      B x 3 x h x w float, the normalised image at the logits' size (PAMR's guide).
    foreground: B x 1 x h' x w' in [0, 1] (CLIP-DIY: the saliency map) or None (derived from the
                probabilities by :meth:`SegmentationMethod.decide`).

    ``context``: what the method's own :meth:`SegmentationMethod.decide` needs beyond the
    logits (Trident's SAM refinement: SAM's image embeddings), or None.

    A method may instead defer the last resize (NACLIP, Trident on a photo larger than one
    tile): ``logits`` and ``guide`` are then None and ``source`` (B x Q x h' x w'),
    ``source_guide`` (B x 3 x h' x w', NACLIP's PAMR guide) are the maps that resize bilinearly
    (align_corners=False) to ``size``; the segmenter resizes, refines and decides them tile by
    tile (:mod:`clipdiy.segmentation.tiles`), or asks the method's own ``tile_decisions``
    (Trident: bands of rows, its SAM refinement in two passes over them).
    """

    logits: torch.Tensor | None
    guide: torch.Tensor | None
    foreground: torch.Tensor | None = None
    source: torch.Tensor | None = None
    source_guide: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    context: object | None = None


@dataclass
class MethodDecision:
    """Per-class probabilities (B x C x h x w, summing to 1 over classes), labels (B x h x w int64)
    and a soft foreground map (B x 1 x h' x w' in [0, 1])."""

    probabilities: torch.Tensor
    labels: torch.Tensor
    foreground: torch.Tensor


class SegmentationMethod(Protocol):
    """A dense method the segmenter drives: images of one batch key in, logits, then decisions.

    ``text_embeddings``: the method's text side (rows: classes or query words), computed once per
    run and shipped to workers. ``saliency_backend`` / ``saliency_weights``: provenance of the
    saliency model it uses (``"none"`` / ``None`` when it uses none). ``mode``: how images are
    presented to the model (written as the rows' ``mode``).
    """

    name: str
    text_embeddings: torch.Tensor
    saliency_backend: str
    saliency_weights: str | None
    mode: str

    def batch_key(self, prepared: PreparedImage) -> Hashable:
        """Images with equal keys share one :meth:`forward` (stacked into one batch)."""
        ...

    def forward_groups(self, prepared: Sequence[PreparedImage]) -> Iterator[tuple[list[int], MethodLogits]]:
        """The forwards of a whole batch: (indices, logits) per group of equal :meth:`batch_key`.

        A method may share its model forwards across groups (NACLIP); :func:`forward_by_key` is
        the plain way, one :meth:`forward` per group.
        """
        ...

    def forward(self, pixels: torch.Tensor, prepared: Sequence[PreparedImage]) -> MethodLogits:
        """pixels: B x 3 x h x w uint8 model inputs of one batch key, on the device."""
        ...

    def decide(self, logits: torch.Tensor, forward: MethodLogits) -> MethodDecision:
        """Probabilities and labels from (possibly refined) logits."""
        ...

    def working_bytes(self, prepared: PreparedImage) -> int:
        """About how many bytes labelling this one image holds at once beyond the model weights:
        the buffers that grow with its pixel count (a pipeline refuses an image whose estimate
        exceeds its bound rather than let it kill the process)."""
        ...


def forward_by_key(method: SegmentationMethod, prepared: Sequence[PreparedImage], device) -> Iterator[tuple[list[int], MethodLogits]]:
    """One :meth:`SegmentationMethod.forward` per group of equal batch key, its inputs moved in one transfer."""
    from clipdiy.segmentation.batching import group_by_shape, to_device

    for indices in group_by_shape([method.batch_key(p) for p in prepared]):
        group = [prepared[i] for i in indices]
        yield indices, method.forward(to_device([p.model_input for p in group], device), group)
