"""Typed configuration of the segmenter.

One dataclass per concern; the segmenter, the Ray job and the command lines all build these and
pass them down, never loose dicts. Defaults are the paper's faithful setting (../shared/SPEC.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Where FOUND's trained head is published (valeoai/FOUND, Apache-2.0). Users without a network
#: pass a local path instead (``SaliencyConfig.head``).
FOUND_HEAD_URL = "https://raw.githubusercontent.com/valeoai/FOUND/main/data/weights/decoder_weights.pt"

#: Smallest ``SaliencyConfig.max_side``: a few of DINO's 8-pixel patches.
MIN_SALIENCY_SIDE = 32

FAITHFUL = "faithful"
ASPECT = "aspect"
MODES = (FAITHFUL, ASPECT)

#: Model precisions; the first is the default (SPEC 3.6).
PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class ClipConfig:
    """Which CLIP to run, and where its weights come from.

    ``checkpoint`` (a local path or any fsspec URI) wins over ``pretrained`` (an open_clip tag
    fetched from the hub on first use). ``model_config`` is an open_clip model-config JSON for an
    architecture open_clip does not ship (it is registered under its file stem, which then is the
    model name to pass as ``model``).
    """

    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    checkpoint: str | None = None
    model_config: str | None = None
    cache_dir: str | None = None


@dataclass(frozen=True)
class SaliencyConfig:
    """Which foreground/background saliency backend to run (a name in the saliency registry).

    ``found``: DINO ``backbone`` from timm (pretrained from the hub, or ``backbone_checkpoint``, a
    local path or fsspec URI) plus FOUND's 1x1-conv ``head`` (a local path, fsspec URI or URL).
    ``none``: the paper's no-saliency ablation (SPEC 3.5): no weighting, the label is the argmax
    of the score map itself (background competes with its own score).
    ``max_side``: ``None`` (faithful, SPEC 2.1) runs the saliency model on the image at its full
    resolution; a number first shrinks images whose longer side exceeds it to that side (area
    interpolation, aspect kept). DINO's attention grows with the square of the pixel count, so
    on large photos this is the difference between milliseconds and minutes per image; the map
    is resized to 256 x 256 for fusion either way.
    """

    backend: str = "found"
    backbone: str = "vit_small_patch8_224.dino"
    backbone_checkpoint: str | None = None
    head: str = FOUND_HEAD_URL
    max_side: int | None = None

    def __post_init__(self) -> None:
        if self.max_side is not None and self.max_side < MIN_SALIENCY_SIDE:
            raise ValueError(
                f"SaliencyConfig.max_side (--saliency-max-side) must be >= {MIN_SALIENCY_SIDE} pixels "
                f"(or unset: full resolution), got {self.max_side}"
            )


@dataclass(frozen=True)
class PromptConfig:
    """How class names become text prompts.

    Faithful: the single template ``"a photo of a {}"`` and no a/an rule (SPEC 1.5).
    ``ensemble="imagenet"`` averages the usual CLIP ImageNet templates; ``article=True`` writes
    "an" before a vowel.
    """

    templates: tuple[str, ...] = ("a photo of a {}",)
    ensemble: str | None = None
    article: bool = False


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything the segmenter needs.

    ``vocabulary`` is a built-in name (``voc``: the paper's spelling, ``voc-readable``, ``coco``) or
    a path to a vocabulary file.
    ``mode``: ``faithful`` squashes to 256 x 256 like the paper; ``aspect`` keeps the aspect
    ratio (short side 256). ``crop_batch_size`` bounds the crops in one CLIP forward (``None``: 256 on
    CUDA, 32 on CPU, where larger batches run no faster and use more memory).
    ``device``: ``None`` picks CUDA when present, else CPU. ``precision`` of every model:
    ``fp32`` (faithful, SPEC 3.6: the reference runs float32, on every device), or ``fp16`` /
    ``bf16`` when asked for explicitly (faster on GPUs; how far they move the labels: README).
    It is recorded in every row and in the run's fingerprint. ``text_cache_dir``: where text
    embeddings are cached on disk (``None``: memory only).
    """

    vocabulary: str = "voc"
    clip: ClipConfig = field(default_factory=ClipConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    prompts: PromptConfig = field(default_factory=PromptConfig)
    mode: str = FAITHFUL
    crop_batch_size: int | None = None
    device: str | None = None
    precision: str = "fp32"
    text_cache_dir: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.crop_batch_size is not None and self.crop_batch_size < 1:
            raise ValueError(f"crop_batch_size must be >= 1, got {self.crop_batch_size}")
