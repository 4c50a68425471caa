"""``naclip``: NACLIP (Hajimiri et al., WACV 2025) as its authors' code runs it (SPEC 8).

One CLIP ViT forward per image (or per 224-px window), made dense and local by the reduced last
block (:class:`~clipdiy.segmentation.models.naclip.NaclipEncoder`); cosine logits against one text embedding
per query word (80 templates each), upsampled to the original size; PAMR refines them (by
default); probabilities are the softmax over queries at logit scale 40, a class's the max over
its queries, and pixels whose best probability is under the threshold go to background.

Batching: images with the same model input size *and* original size share every step (the
forward over their common input size, the upsampling to their common original size).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from clipdiy.segmentation.batching import default_crop_batch_size
from clipdiy.segmentation.config import (
    NACLIP,
    WINDOW_AUTO,
    WINDOW_SLIDE,
    WINDOW_WHOLE,
    NaclipConfig,
    SegmenterConfig,
)
from clipdiy.segmentation.methods import MethodEntry, register_method
from clipdiy.segmentation.methods.base import MethodDecision, MethodLogits
from clipdiy.segmentation.prepared import PreparedImage
from clipdiy.segmentation.vocabulary import Vocabulary

#: The authors' normalisation of 0-255 RGB pixels (CLIP's mean and std x 255, rounded; SPEC 8.2).
NACLIP_MEAN = (122.771, 116.746, 104.094)
NACLIP_STD = (68.501, 66.632, 70.323)

#: The authors' inference setting per built-in vocabulary (SPEC 8.7); anything else slides, as
#: their configurations for every other data set do.
WINDOW_BY_VOCABULARY = {"naclip-voc21": WINDOW_WHOLE, "voc": WINDOW_WHOLE, "naclip-coco-object": WINDOW_SLIDE, "coco": WINDOW_SLIDE}


def resolve_window(config: NaclipConfig, vocabulary_name: str) -> str:
    """``whole`` or ``slide``: the configured setting, or the vocabulary's published one."""
    if config.window != WINDOW_AUTO:
        return config.window
    return WINDOW_BY_VOCABULARY.get(vocabulary_name, WINDOW_SLIDE)


#: The least side of NACLIP's model input: one patch of the CLIP ViT with the largest patches
#: (B/32), so that any model sees at least one patch row and column. SPEC 8.2's rescale gives a
#: side under it only to images more elongated than 2048:32 (64:1); a 1 x 5000 strip would get a
#: side of 0 pixels, which the reference cannot resize.
NACLIP_MIN_INPUT_SIDE = 32


def naclip_input_size(height: int, width: int, config: NaclipConfig) -> tuple[int, int]:
    """(h, w) of the model input (SPEC 8.2, mmcv's rescale): short side 336, long side <= 2048;
    each side at least :data:`NACLIP_MIN_INPUT_SIDE` (the image is then squashed that far), so
    every image of at least 1 x 1 pixel is labelled."""
    scale = min(config.short_side / min(height, width), config.long_side / max(height, width))
    return (max(NACLIP_MIN_INPUT_SIDE, int(height * scale + 0.5)),
            max(NACLIP_MIN_INPUT_SIDE, int(width * scale + 0.5)))


def prepare_naclip(rgb: np.ndarray, config: SegmenterConfig):
    """CPU preprocessing (SPEC 8.2): the aspect-kept resize with OpenCV's bilinear, no saliency input."""
    height, width = rgb.shape[:2]
    size = naclip_input_size(height, width, config.naclip)
    resized = rgb if size == (height, width) else cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    return PreparedImage(model_input=np.ascontiguousarray(resized), saliency_input=None, original_size=(int(height), int(width)))


def query_words(vocabulary: Vocabulary) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(query words, class index of each), classes in order (SPEC 8.6, 8.9).

    A class's words are its ``queries`` when the vocabulary gives them (built-in NACLIP
    vocabularies), else its synonyms; background with synonyms is queried through those only
    (the authors' convention: "background" itself is not a query).
    """
    words: list[str] = []
    owners: list[int] = []
    for index, cls in enumerate(vocabulary.classes):
        if cls.queries is not None:
            mine = cls.queries
        elif index == 0 and len(cls.synonyms) > 1:
            mine = cls.synonyms[1:]
        else:
            mine = cls.synonyms
        words += mine
        owners += [index] * len(mine)
    return tuple(words), tuple(owners)


@lru_cache(maxsize=32)
def window_boxes(height: int, width: int, size: int, stride: int) -> tuple[tuple[int, int, int, int], ...]:
    """(y1, y2, x1, x2) of every sliding window, clamped to the image as the reference (SPEC 8.7)."""
    rows = max(height - size + stride - 1, 0) // stride + 1
    cols = max(width - size + stride - 1, 0) // stride + 1
    boxes = []
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride + size, height), min(j * stride + size, width)
            boxes.append((max(y2 - size, 0), y2, max(x2 - size, 0), x2))
    return tuple(boxes)


class NaclipMethod:
    """NACLIP on a loaded CLIP (see :class:`~clipdiy.segmentation.methods.base.SegmentationMethod`)."""

    name = NACLIP
    saliency_backend = "none"
    saliency_weights = None

    def __init__(self, clip, vocabulary: Vocabulary, config: SegmenterConfig, text_embeddings, device):
        from clipdiy.segmentation.models.naclip import NaclipEncoder

        self.config = config.naclip
        self.device = device
        self.encoder = NaclipEncoder(clip.model.visual, sigma=self.config.sigma)
        words, owners = query_words(vocabulary)
        if text_embeddings is None:
            from clipdiy.segmentation.config import PromptConfig
            from clipdiy.segmentation.text_embeddings import query_text_embeddings
            from clipdiy.segmentation.vocabulary import prompt_templates

            templates = prompt_templates(PromptConfig(ensemble="imagenet"))
            text_embeddings = query_text_embeddings(clip, words, templates, config.text_cache_dir)
        if text_embeddings.shape[0] != len(words):
            raise ValueError(f"{text_embeddings.shape[0]} text embeddings for {len(words)} NACLIP query words")
        self.text_embeddings = text_embeddings.to(device, torch.float32)
        self.num_classes = len(vocabulary)
        # Queries of one class are contiguous: the class maximum is a max over a slice.
        self.spans = [(owners.index(c), len(owners) - owners[::-1].index(c)) for c in range(len(vocabulary))]
        self.mode = resolve_window(self.config, vocabulary.name)
        self.window_batch = config.crop_batch_size or default_crop_batch_size(device)
        self.mean = torch.tensor(NACLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(NACLIP_STD, device=device).view(1, 3, 1, 1)

    def batch_key(self, prepared) -> Hashable:
        return tuple(prepared.model_input.shape), tuple(prepared.original_size)

    def forward(self, pixels: torch.Tensor, prepared: Sequence) -> MethodLogits:
        """Query logits B x Q x H x W at the original size, guide = normalised input resized to it."""
        size = tuple(prepared[0].original_size)
        normalised = pixels.float().sub_(self.mean).div_(self.std)
        if self.mode == WINDOW_WHOLE:
            logits = self._logits(normalised)
        else:
            logits = self._slide(normalised)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        guide = F.interpolate(normalised, size=size, mode="bilinear", align_corners=False)
        return MethodLogits(logits=logits, guide=guide)

    def decide(self, logits: torch.Tensor, forward: MethodLogits) -> MethodDecision:
        """SPEC 8.9: softmax over queries of 40 x logits, max per class, threshold to background."""
        query_probabilities = torch.softmax(logits * self.config.logit_scale, dim=1)
        if all(end - start == 1 for start, end in self.spans):
            best = query_probabilities
        else:
            best = torch.stack([query_probabilities[:, s:e].amax(dim=1) for s, e in self.spans], dim=1)
        del query_probabilities
        top, labels = best.max(dim=1)
        labels[top < self.config.threshold] = 0
        probabilities = best.div_(best.sum(dim=1, keepdim=True))  # the authors' class probabilities
        foreground = 1.0 - probabilities[:, :1]
        return MethodDecision(probabilities, labels, foreground)

    def _logits(self, normalised: torch.Tensor) -> torch.Tensor:
        """Cosine logits of a batch of inputs, B x Q x h x w (patch grid bilinearly to the input size)."""
        features = self.encoder(normalised)  # B x gh x gw x D
        grid = (features @ self.text_embeddings.T).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=tuple(normalised.shape[-2:]), mode="bilinear", align_corners=False)

    def _slide(self, normalised: torch.Tensor) -> torch.Tensor:
        """Window logits summed into place and divided by the windows covering each pixel (SPEC 8.7)."""
        batch, _, height, width = normalised.shape
        boxes = window_boxes(height, width, self.config.window_size, self.config.window_stride)
        total = normalised.new_zeros(batch, self.text_embeddings.shape[0], height, width)
        count = normalised.new_zeros(1, 1, height, width)
        # Windows of every image in the batch go through the encoder together, ``window_batch`` at a time.
        per_chunk = max(1, self.window_batch // batch)
        for start in range(0, len(boxes), per_chunk):
            chunk = boxes[start : start + per_chunk]
            crops = torch.cat([normalised[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])  # window-major
            logits = self._logits(crops).view(len(chunk), batch, -1, *crops.shape[-2:])
            for (y1, y2, x1, x2), window in zip(chunk, logits):
                total[:, :, y1:y2, x1:x2] += window
                count[:, :, y1:y2, x1:x2] += 1
        return total.div_(count)


register_method(
    MethodEntry(
        name=NACLIP,
        prepare=prepare_naclip,
        build=lambda clip, saliency, vocabulary, config, text, device: NaclipMethod(clip, vocabulary, config, text, device),
        needs_saliency=False,
    )
)
