"""Segmentation methods behind one interface, created by name from a registry.

A method is a module that registers a :class:`MethodEntry` with :func:`register_method`: how a
CPU worker prepares an image for it (no model needed), whether it needs a saliency model, and a
factory that builds the :class:`~clipdiy.segmentation.methods.base.SegmentationMethod` from loaded models.
The :class:`~clipdiy.segmentation.segmenter.Segmenter` owns pre- and post-processing, batching, refinement
and summaries, and only ever goes through :func:`method_entry`. Built in: ``clipdiy`` (the
paper, SPEC 1-3) and ``naclip`` (SPEC 8) and ``trident`` (TRIDENT.md). A new method touches no existing method's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clipdiy.segmentation.methods.base import MethodDecision, MethodLogits, SegmentationMethod

if TYPE_CHECKING:
    import torch

    from clipdiy.segmentation.config import SegmenterConfig
    from clipdiy.segmentation.prepared import PreparedImage
    from clipdiy.segmentation.vocabulary import Vocabulary


@dataclass(frozen=True)
class MethodEntry:
    """A registered method.

    prepare:        (H x W x 3 uint8 RGB, config) -> PreparedImage, on a CPU worker.
    build:          (clip, saliency or None, vocabulary, config, text_embeddings or None,
                    device) -> SegmentationMethod.
    needs_saliency: whether :func:`clipdiy.segmentation.segmenter.create_segmenter` loads the saliency model.
    """

    name: str
    prepare: Callable[[np.ndarray, SegmenterConfig], PreparedImage]
    build: Callable[[Any, Any, Vocabulary, SegmenterConfig, torch.Tensor | None, torch.device], SegmentationMethod]
    needs_saliency: bool = True


_METHODS: dict[str, MethodEntry] = {}


def register_method(entry: MethodEntry) -> MethodEntry:
    if entry.name in _METHODS and _METHODS[entry.name] is not entry:
        raise ValueError(f"segmentation method {entry.name!r} is already registered")
    _METHODS[entry.name] = entry
    return entry


def available_methods() -> tuple[str, ...]:
    return tuple(sorted(_METHODS))


def method_entry(name: str) -> MethodEntry:
    """The registered method ``name``; ValueError naming the known ones otherwise."""
    entry = _METHODS.get(name)
    if entry is None:
        raise ValueError(f"unknown segmentation method {name!r} (--method); available: {', '.join(available_methods())}")
    return entry


# Built-in methods register themselves on import.
from clipdiy.segmentation.methods import clipdiy as _clipdiy  # noqa: F401
from clipdiy.segmentation.methods import naclip as _naclip  # noqa: F401
from clipdiy.segmentation.methods import trident as _trident  # noqa: F401

__all__ = [
    "MethodDecision",
    "MethodEntry",
    "MethodLogits",
    "SegmentationMethod",
    "available_methods",
    "method_entry",
    "register_method",
]
