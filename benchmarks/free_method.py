"""Benchmark-only segmentation methods that cost no model time: ``free-naclip``, ``free-clipdiy``.

They measure the job's host side (listing, reading, decoding, preparing model inputs, moving
arrays between tasks and actors, label maps back to the host, RLE, rows, Parquet) with the model
taken out. Each prepares its inputs exactly as the method it is named after (so decode workers do
the same work and ship the same arrays) and gives that method's output shapes (NACLIP: label map
at the original size; CLIP-DIY: at the model input size, 256 x 256 faithful), but its "forward" is
a fixed pattern looked up per output size: background with three objects (an ellipse, a box and a
band, classes 1, C/2 and C-1), so rows carry the masks and RLE runs of a plain photo.

Never reachable from the command line: the CLI's ``--method`` choices are the built-in methods,
and nothing under ``clipdiy/`` or ``jobs/`` imports this module. A benchmark registers the methods
with :func:`register` in its own process and, through Ray's ``worker_process_setup_hook``
(:func:`ray_runtime_env`), in every Ray worker before any task runs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from pathlib import Path

import numpy as np
import torch

from clipdiy.segmentation.config import SegmenterConfig
from clipdiy.segmentation.methods import MethodEntry, available_methods, register_method
from clipdiy.segmentation.methods.base import MethodDecision, MethodLogits, forward_by_key
from clipdiy.segmentation.methods.naclip import prepare_naclip

FREE_NACLIP = "free-naclip"
FREE_CLIPDIY = "free-clipdiy"
#: Output sizes whose fixed decision is kept (a web corpus has many sizes: bounded).
CACHED_SIZES = 64


def fixed_labels(height: int, width: int, classes: int) -> np.ndarray:
    """The fixed label map (H x W int64) of an output size: background, an ellipse of class 1,
    a box of class C // 2 and a bottom band of class C - 1 (fewer classes when C is small)."""
    rows = np.arange(height, dtype=np.float64)[:, None] / height
    cols = np.arange(width, dtype=np.float64)[None, :] / width
    labels = np.zeros((height, width), dtype=np.int64)
    labels[((rows - 0.45) / 0.3) ** 2 + ((cols - 0.35) / 0.2) ** 2 <= 1.0] = min(1, classes - 1)
    labels[(rows >= 0.2) & (rows < 0.6) & (cols >= 0.6) & (cols < 0.9)] = max(0, classes // 2)
    labels[np.broadcast_to(rows >= 0.85, labels.shape)] = classes - 1
    return labels


class FreeMethod:
    """A :class:`~clipdiy.segmentation.methods.base.SegmentationMethod` whose forward and decision are fixed
    tensors, cached per output size (h x w) and expanded over the batch (no copy per image)."""

    saliency_backend = "none"
    saliency_weights = None

    def __init__(self, name: str, like: str, num_classes: int, mode: str, device: torch.device):
        self.name = name
        self.like = like  # "naclip": output at the original size; "clipdiy": at the model input size
        self.num_classes = num_classes
        self.mode = mode
        self.device = device
        self.text_embeddings = torch.zeros(num_classes, 1)  # no text side: C x 1 placeholder
        self._cache: OrderedDict[tuple[int, int, int, int], tuple[torch.Tensor, ...]] = OrderedDict()

    def batch_key(self, prepared) -> Hashable:
        return tuple(prepared.model_input.shape), tuple(prepared.original_size) if self.like == "naclip" else None

    def _fixed(self, size: tuple[int, int], model_size: tuple[int, int]) -> tuple[torch.Tensor, ...]:
        """(logits 1 x C x h x w, probabilities 1 x C x h x w, labels 1 x h x w, foreground 1 x 1 x h' x w')."""
        key = (*size, *model_size)
        if key not in self._cache:
            labels = torch.from_numpy(fixed_labels(*size, self.num_classes)).to(self.device)
            winner = torch.arange(self.num_classes, device=self.device)[:, None, None] == labels
            # The softmax of logits 8 (the winner) and 0 (the rest), written out.
            high = 1.0 / (1.0 + (self.num_classes - 1) * float(np.exp(-8.0)))
            probabilities = torch.where(winner, high, (1.0 - high) / max(1, self.num_classes - 1))[None]
            logits = winner[None].float().mul_(8.0)
            small = torch.from_numpy(fixed_labels(*model_size, self.num_classes)).to(self.device)
            foreground = (small != 0).float()[None, None]
            self._cache[key] = (logits, probabilities, labels[None], foreground)
            while len(self._cache) > CACHED_SIZES:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return self._cache[key]

    def forward_groups(self, prepared: Sequence):
        """One :meth:`forward` per batch key (the plain way, as CLIP-DIY)."""
        return forward_by_key(self, prepared, self.device)

    def working_bytes(self, prepared) -> int:
        """Only the label map at the output size (uint16) and its indices: no model buffers."""
        height, width = prepared.original_size
        return 10 * height * width

    def forward(self, pixels: torch.Tensor, prepared: Sequence) -> MethodLogits:
        """Fixed logits B x C x h x w (expanded, not copied) at the method's output size."""
        model_size = tuple(pixels.shape[-2:])
        size = tuple(prepared[0].original_size) if self.like == "naclip" else model_size
        logits, _, _, foreground = self._fixed(size, model_size)
        batch = pixels.shape[0]
        return MethodLogits(logits=logits.expand(batch, -1, -1, -1), guide=pixels,
                            foreground=foreground.expand(batch, -1, -1, -1))

    def decide(self, logits: torch.Tensor, forward: MethodLogits) -> MethodDecision:
        batch, _, height, width = logits.shape
        model_size = tuple(forward.guide.shape[-2:])
        _, probabilities, labels, foreground = self._fixed((height, width), model_size)
        return MethodDecision(probabilities.expand(batch, -1, -1, -1), labels.expand(batch, -1, -1),
                              foreground.expand(batch, -1, -1, -1))


def _prepare_clipdiy(rgb: np.ndarray, config: SegmenterConfig):
    from clipdiy.segmentation.methods.clipdiy import prepare_clipdiy

    return prepare_clipdiy(rgb, config)


ENTRIES = (
    MethodEntry(
        name=FREE_NACLIP,
        prepare=prepare_naclip,
        build=lambda clip, saliency, vocabulary, config, text, device: FreeMethod(
            FREE_NACLIP, "naclip", len(vocabulary), "whole", device),
        needs_saliency=False,
    ),
    MethodEntry(
        name=FREE_CLIPDIY,
        prepare=_prepare_clipdiy,
        build=lambda clip, saliency, vocabulary, config, text, device: FreeMethod(
            FREE_CLIPDIY, "clipdiy", len(vocabulary), config.mode, device),
        needs_saliency=False,
    ),
)


def register() -> None:
    """Register the free methods in this process (idempotent); Ray's worker setup hook calls it."""
    for entry in ENTRIES:
        if entry.name not in available_methods():
            register_method(entry)


def ray_runtime_env() -> dict:
    """A Ray ``runtime_env`` whose workers import this module and register the free methods."""
    import os

    here = str(Path(__file__).resolve().parent)
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH", "")) if p)
    return {"env_vars": {"PYTHONPATH": path}, "worker_process_setup_hook": "free_method.register"}
