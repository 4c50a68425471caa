"""The segmentation library: CLIP-DIY and NACLIP on batches of images, with no Ray and no storage.

``from clipdiy.segmentation import create_segmenter, SegmenterConfig`` is the front door; the
names below are loaded on first use, so importing a light module of the library (its config, a
vocabulary) does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "ClipConfig": "config",
    "NaclipConfig": "config",
    "PamrConfig": "config",
    "PromptConfig": "config",
    "SaliencyConfig": "config",
    "SegmenterConfig": "config",
    "SegmentationResult": "result",
    "Segmenter": "segmenter",
    "create_segmenter": "segmenter",
    "finalize": "segmenter",
    "prepare_input": "segmenter",
    "Vocabulary": "vocabulary",
    "load_vocabulary": "vocabulary",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
