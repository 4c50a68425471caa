"""``clipdiy``: the paper's method (SPEC 1-3), multi-scale CLIP crops fused with a saliency map.

The forward gives the fused logits S * [1 - s, s, ..., s] (SPEC 3.2; S alone without saliency),
whose softmax over classes is the method's probability map. An optional refinement works on
those logits, guided by the model input normalised as CLIP's crops are.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipdiy.segmentation.batching import default_crop_batch_size, group_by_shape, to_device
from clipdiy.segmentation.config import CLIPDIY, SegmenterConfig
from clipdiy.segmentation.dense import DenseScorer
from clipdiy.segmentation.methods import MethodEntry, register_method
from clipdiy.segmentation.methods.base import MethodDecision, MethodLogits, forward_by_key
from clipdiy.segmentation.prepared import prepare_image
from clipdiy.segmentation.vocabulary import Vocabulary


def prepare_clipdiy(rgb: np.ndarray, config: SegmenterConfig):
    """CPU preprocessing (SPEC 1.1): the 256 x 256 (or aspect) model input and the saliency input
    (at ``config.saliency.max_side``)."""
    return prepare_image(rgb, config.mode, config.saliency.max_side)


def fused_logits(scores: torch.Tensor, saliency: torch.Tensor | None) -> torch.Tensor:
    """SPEC 3.2: the logits S * [1 - s, s, ..., s] of score maps weighted by a saliency map.

    scores: B x C x h x w (class 0 = background); saliency: B x 1 x h x w in [0, 1], or ``None``
    for no saliency (SPEC 3.5: no weighting, background competes with its own score: S itself).
    """
    if saliency is None:
        return scores
    weights = saliency.expand(-1, scores.shape[1], -1, -1).clone()
    weights[:, 0] = 1.0 - saliency[:, 0]
    return scores * weights


def fuse(scores: torch.Tensor, saliency: torch.Tensor | None) -> torch.Tensor:
    """SPEC 3.2: class probabilities B x C x h x w, the softmax over classes of :func:`fused_logits`."""
    return torch.softmax(fused_logits(scores, saliency), dim=1)


class ClipDiyMethod:
    """CLIP-DIY on a loaded CLIP and saliency model (see :class:`~clipdiy.segmentation.methods.base.SegmentationMethod`)."""

    name = CLIPDIY

    def __init__(self, clip, saliency, vocabulary: Vocabulary, config: SegmenterConfig, text_embeddings, device):
        if text_embeddings is None:
            from clipdiy.segmentation.text_embeddings import class_text_embeddings

            text_embeddings = class_text_embeddings(clip, vocabulary, config.prompts, config.text_cache_dir)
        if text_embeddings.shape[0] != len(vocabulary):
            raise ValueError(
                f"{text_embeddings.shape[0]} text embeddings for a vocabulary of {len(vocabulary)} classes"
            )
        self.device = device
        self.saliency = saliency
        self.saliency_backend = saliency.name
        self.saliency_weights = saliency.weights_id
        self.mode = config.mode
        self.text_embeddings = text_embeddings.to(device, torch.float32)
        self.mean = torch.tensor(clip.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(clip.std, device=device).view(1, 3, 1, 1)
        self.scorer = DenseScorer(
            clip.encode_image,
            self.text_embeddings,
            input_size=clip.image_size,
            mean=clip.mean,
            std=clip.std,
            crop_batch_size=config.crop_batch_size or default_crop_batch_size(device),
        )

    def batch_key(self, prepared) -> Hashable:
        return tuple(prepared.model_input.shape)

    def forward_groups(self, prepared: Sequence) -> Iterator[tuple[list[int], MethodLogits]]:
        return forward_by_key(self, prepared, self.device)

    def forward(self, pixels: torch.Tensor, prepared: Sequence) -> MethodLogits:
        """Fused logits B x C x h x w at the model resolution (SPEC 1 and 3.2), saliency as foreground."""
        scores = self.scorer(pixels)
        saliency = self._saliency([p.saliency_input for p in prepared], scores.shape[-2:])
        # A backend standing for "no saliency" (``none``) leaves S unweighted (SPEC 3.5).
        weighting = saliency if getattr(self.saliency, "weights_scores", True) else None
        guide = pixels.float().div_(255.0).sub_(self.mean).div_(self.std)
        return MethodLogits(logits=fused_logits(scores, weighting), guide=guide, foreground=saliency)

    def working_bytes(self, prepared) -> int:
        """What grows with the photo: the label map resized to the original H x W (uint16, with
        int64 row and column indices: 10 bytes a pixel, bounded by ``--max-pixels``), and the
        saliency model's activations at its input (DINO ViT-S/8: one 384-wide float32 token per
        8 x 8 pixels, about a dozen such tensors alive at once; full resolution unless
        ``SaliencyConfig.max_side`` shrinks it). Attention is counted as linear in the tokens, as
        PyTorch's fused attention runs it."""
        height, width = prepared.original_size
        saliency = 0
        if prepared.saliency_input is not None and self.saliency_backend != "none":
            tokens = (prepared.saliency_input.shape[0] // 8 + 1) * (prepared.saliency_input.shape[1] // 8 + 1)
            saliency = tokens * 384 * 4 * 12
        return 10 * height * width + saliency

    def decide(self, logits: torch.Tensor, forward: MethodLogits) -> MethodDecision:
        probabilities = torch.softmax(logits, dim=1)
        return MethodDecision(probabilities, probabilities.argmax(dim=1), forward.foreground)

    def _saliency(self, rgbs: Sequence[np.ndarray], size: torch.Size) -> torch.Tensor:
        """B x 1 x h x w soft saliency at the model resolution (SPEC 2 on the saliency inputs, then 3.1)."""
        if not getattr(self.saliency, "needs_pixels", True):
            # A backend that never reads pixels (``none``) gets a placeholder: no host-device copy.
            placeholder = torch.zeros(len(rgbs), 3, *size, device=self.device)
            return self.saliency(placeholder).float().clamp_(0.0, 1.0)
        maps: list[torch.Tensor | None] = [None] * len(rgbs)
        for indices in group_by_shape([rgb.shape for rgb in rgbs]):
            images = to_device([rgbs[i] for i in indices], self.device).float().div_(255.0)
            full = self.saliency(images).float()
            resized = F.interpolate(full, size=tuple(size), mode="bilinear", align_corners=False)
            for i, saliency_map in zip(indices, resized):
                maps[i] = saliency_map
        return torch.stack(maps).clamp_(0.0, 1.0)  # type: ignore[arg-type]


register_method(
    MethodEntry(
        name=CLIPDIY,
        prepare=prepare_clipdiy,
        build=lambda clip, saliency, vocabulary, config, text, device: ClipDiyMethod(
            clip, saliency, vocabulary, config, text, device
        ),
        needs_saliency=True,
    )
)
