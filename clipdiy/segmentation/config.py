"""Typed configuration of the segmenter.

One dataclass per concern; the segmenter, the Ray job and the command lines all build these and
pass them down, never loose dicts. Defaults are the paper's faithful setting (docs/methods/clipdiy.md).
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
#: Trident's precisions: float32 (faithful to the method, the default) or the authors' own fp16
#: casts; bf16 has no published counterpart for it.
TRIDENT_PRECISIONS = ("fp32", "fp16")
#: Segmentation methods (names in the ``clipdiy.segmentation.methods`` registry; ``clipdiy`` is the paper's).
CLIPDIY = "clipdiy"
NACLIP = "naclip"
TRIDENT = "trident"
#: ``SegmenterConfig.refine``: ``auto`` is the method's published setting (PAMR for NACLIP,
#: SAM for Trident, nothing for CLIP-DIY); ``pamr``, ``sam`` or ``none`` force it.
REFINE_AUTO = "auto"
REFINE_PAMR = "pamr"
REFINE_NONE = "none"
#: Trident's SAM refinement (TRIDENT.md section 7): SAM's mask decoder prompted per coarse region.
REFINE_SAM = "sam"
REFINES = (REFINE_AUTO, REFINE_PAMR, REFINE_SAM, REFINE_NONE)
#: NACLIP's inference settings (SPEC 8.7): the whole resized image in one forward, or 224-px
#: windows with stride 112; ``auto`` takes the built-in vocabulary's published choice.
WINDOW_AUTO = "auto"
WINDOW_WHOLE = "whole"
WINDOW_SLIDE = "slide"
WINDOWS = (WINDOW_AUTO, WINDOW_WHOLE, WINDOW_SLIDE)


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


#: NACLIP's CLIP (SPEC 8.1): OpenAI's ViT-B/16 (QuickGELU comes with the tag). For a local copy of
#: these weights pass ``model="ViT-B-16-quickgelu"`` with the checkpoint.
NACLIP_CLIP = ClipConfig(model="ViT-B-16", pretrained="openai")


def default_clip_config(method: str) -> ClipConfig:
    """The CLIP a method is published with: ViT-B/32 LAION-2B for CLIP-DIY, ViT-B/16 OpenAI for
    NACLIP and Trident (TRIDENT.md 1.1: the same QuickGELU OpenAI ViT-B/16)."""
    return NACLIP_CLIP if method in (NACLIP, TRIDENT) else ClipConfig()


@dataclass(frozen=True)
class PamrConfig:
    """PAMR refinement (SPEC 8.8): ``iterations`` and ``dilations`` as Araslanov & Roth / NACLIP.

    ``max_elements``: bound on PAMR's working tensors (affinities plus classes in flight, in
    float32 elements; 128M = 512 MB); classes are refined in chunks under it, so large photos
    stay within memory.
    """

    iterations: int = 10
    dilations: tuple[int, ...] = (8, 16)
    max_elements: int = 128_000_000

    def __post_init__(self) -> None:
        if self.iterations < 1:
            raise ValueError(f"PAMR iterations must be >= 1, got {self.iterations}")
        if not self.dilations or any(int(d) < 1 for d in self.dilations):
            raise ValueError(f"PAMR dilations must be positive integers, got {self.dilations!r}")
        if self.max_elements < 1:
            raise ValueError(f"PamrConfig.max_elements must be >= 1, got {self.max_elements}")


@dataclass(frozen=True)
class NaclipConfig:
    """NACLIP's settings (SPEC 8); the defaults are the authors'.

    ``window``: ``whole`` (one forward of the resized image, their VOC21 setting), ``slide``
    (``window_size`` windows with ``window_stride``, their COCO-Object setting) or ``auto`` (the
    built-in vocabulary's published choice; ``whole`` for vocabulary files).
    ``max_forward_tokens``: bound on one forward of the image tower, in tokens (images or
    windows in it times the longest token sequence among them; a 336 x 500 input is 652 tokens,
    a 224 window 197): images of all sizes share forwards up to it (``None``: 32768 on CUDA, 8192
    on CPU, where larger forwards run no faster and cost memory). An image longer than the
    bound runs alone.
    ``tile_side``: the steps after the forward (upsampling to the original size, PAMR, the
    decision, the scores) run over tiles of the original image at most ``tile_side`` x
    ``tile_side`` pixels, halo included (PAMR's reach, 176 px with its defaults), so their memory
    is set by it, not by the photo; a photo that fits in one tile runs whole. Exact either way
    (:mod:`clipdiy.segmentation.tiles`).
    """

    window: str = WINDOW_AUTO
    short_side: int = 336
    long_side: int = 2048
    window_size: int = 224
    window_stride: int = 112
    sigma: float = 5.0
    logit_scale: float = 40.0
    threshold: float = 0.1
    max_forward_tokens: int | None = None
    tile_side: int = 1344

    def __post_init__(self) -> None:
        if self.tile_side < 1:
            raise ValueError(f"NaclipConfig.tile_side must be >= 1, got {self.tile_side}")
        if self.max_forward_tokens is not None and self.max_forward_tokens < 1:
            raise ValueError(f"NaclipConfig.max_forward_tokens must be >= 1, got {self.max_forward_tokens}")
        if self.window not in WINDOWS:
            raise ValueError(f"NaclipConfig.window must be one of {WINDOWS}, got {self.window!r}")
        if min(self.short_side, self.long_side, self.window_size, self.window_stride) < 16:
            raise ValueError("NACLIP sizes must be at least one 16-pixel patch")
        if self.sigma <= 0:
            raise ValueError(f"NaclipConfig.sigma must be > 0, got {self.sigma}")


#: Trident's DINO (TRIDENT.md 1.2.7): timm's name for the DINO ViT-B/16 weights the authors load.
TRIDENT_DINO = "vit_base_patch16_224.dino"
#: SAM ViT-B (TRIDENT.md 1.3), the ``segment-anything`` package's checkpoint.
TRIDENT_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"


@dataclass(frozen=True)
class TridentConfig:
    """Trident's models and settings (TRIDENT.md); defaults are the authors'.

    ``dino``: timm name of the DINO ViT-B/16; ``dino_checkpoint``: its weights (local path or
    fsspec URI; ``None``: the timm pretrained tag from the Hugging Face hub). ``sam_checkpoint``:
    SAM ViT-B's ``sam_vit_b_01ec64.pth`` (local path, fsspec URI or URL). ``prob_thd``,
    ``slide_stride``, ``short_side``, ``cos_fac`` and ``refine_neg_cos``: ``None`` takes the built-in
    vocabulary's published setting (TRIDENT.md 2.1; the base configuration for anything else).
    ``coarse_thresh``: the SAM refinement's cut-off on the coarse class probabilities (``None``:
    the published setting); ``minimal_area``, ``sam_iou_thresh`` and ``sam_mask_coefficient``: its
    other settings, the authors' base configuration (TRIDENT.md 7).
    ``max_forward_windows``: 336-px windows per CLIP/DINO forward (``None``: 64 on CUDA, 8 on
    CPU); ``sam_batch_size``: images per SAM encoder forward (``None``: 8 on CUDA, 1 on CPU; a
    global block holds 12 x 4096^2 attention weights per image).
    ``tile_side``: a photo of more than ``tile_side`` squared pixels is upsampled, decided and
    refined in bands of whole rows of at most that many pixels (the refinement's half-resolution
    maps in bands too), so the maps of its classes at the original size are never held whole;
    smaller photos run whole (:func:`~clipdiy.segmentation.sam_refine.refine_in_bands`). Bands
    need no halo, so they can be small: 512^2 pixels hold about 1 GB of maps with the authors'
    COCO-Object words and refinement (about ten per-class planes a pixel).
    """

    dino: str = TRIDENT_DINO
    dino_checkpoint: str | None = None
    sam_checkpoint: str = TRIDENT_SAM_URL
    prob_thd: float | None = None
    slide_stride: int | None = None
    short_side: int | None = None
    cos_fac: float | None = None
    refine_neg_cos: bool | None = None
    long_side: int = 2048
    slide_crop: int = 336
    beta: float = 1.2
    gamma: float = 3.0
    logit_scale: float = 40.0
    max_forward_windows: int | None = None
    sam_batch_size: int | None = None
    coarse_thresh: float | None = None
    minimal_area: int = 225
    sam_iou_thresh: float = 0.80
    sam_mask_coefficient: float = 0.005
    tile_side: int = 512

    def __post_init__(self) -> None:
        if self.tile_side < 1:
            raise ValueError(f"TridentConfig.tile_side must be >= 1, got {self.tile_side}")
        if self.minimal_area < 0:
            raise ValueError(f"TridentConfig.minimal_area must be >= 0, got {self.minimal_area}")
        for name in ("max_forward_windows", "sam_batch_size", "slide_stride", "short_side"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TridentConfig.{name} must be >= 1, got {value}")
        if self.slide_crop != 336:
            raise ValueError("TridentConfig.slide_crop must be 336 (the authors' window; the DINO and CLIP grids must match)")


@dataclass(frozen=True)
class SegmenterConfig:
    """Everything the segmenter needs.

    ``vocabulary`` is a built-in name (``voc``: the paper's spelling, ``voc-readable``, ``coco``) or
    a path to a vocabulary file.
    ``mode``: ``faithful`` squashes to 256 x 256 like the paper; ``aspect`` keeps the aspect
    ratio (short side 256). ``crop_batch_size`` bounds CLIP-DIY's crops in one CLIP forward (``None``:
    256 on CUDA, 32 on CPU, where larger batches run no faster and use more memory; NACLIP's bound
    is ``naclip.max_forward_tokens``).
    ``device``: ``None`` picks CUDA when present, else CPU. ``precision`` of every model:
    ``fp32`` (faithful, SPEC 3.6: the reference runs float32, on every device), or ``fp16`` /
    ``bf16`` when asked for explicitly (faster on GPUs; how far they move the labels: docs/methods/faithfulness.md;
    Trident: ``fp32`` or ``fp16``, the authors' casts, docs/methods/trident.md).
    It is recorded in every row and in the run's fingerprint. ``text_cache_dir``: where text
    embeddings are cached on disk (``None``: memory only).
    ``method``: ``clipdiy`` (the paper, faithful), ``naclip`` (SPEC 8; ``naclip`` settings) or
    ``trident`` (``trident`` settings: its DINO and SAM weights, the published per-vocabulary values).
    Left at its default, ``clip`` becomes the method's published CLIP
    (:func:`default_clip_config`). ``refine``: ``auto`` (PAMR for NACLIP, SAM for Trident, none
    for CLIP-DIY, as published), ``pamr`` (not Trident), ``sam`` (Trident only) or ``none``;
    ``pamr`` holds PAMR's settings, ``trident`` SAM's.
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
    method: str = CLIPDIY
    refine: str = REFINE_AUTO
    pamr: PamrConfig = field(default_factory=PamrConfig)
    naclip: NaclipConfig = field(default_factory=NaclipConfig)
    trident: TridentConfig = field(default_factory=TridentConfig)

    def __post_init__(self) -> None:
        if self.refine not in REFINES:
            raise ValueError(f"refine must be one of {REFINES}, got {self.refine!r}")
        if self.refine == REFINE_SAM and self.method != TRIDENT:
            raise ValueError(f"refine='sam' (--refine sam) is Trident's refinement; method {self.method!r} takes 'pamr', 'none' or 'auto'")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.method == TRIDENT and self.precision not in TRIDENT_PRECISIONS:
            raise ValueError(
                f"precision={self.precision!r} (--precision) is not available for Trident: its reduced precision is the "
                f"authors' fp16 casts (docs/methods/trident.md); use {' or '.join(TRIDENT_PRECISIONS)}"
            )
        if self.method == TRIDENT and self.refinement == REFINE_PAMR:
            raise ValueError("Trident is not refined with PAMR (refine='pamr'); use refine='sam', 'none' or 'auto'")
        if self.method in (NACLIP, TRIDENT) and self.clip == ClipConfig():
            object.__setattr__(self, "clip", NACLIP_CLIP)  # the method's own CLIP, not CLIP-DIY's
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.crop_batch_size is not None and self.crop_batch_size < 1:
            raise ValueError(f"crop_batch_size must be >= 1, got {self.crop_batch_size}")

    @property
    def refinement(self) -> str | None:
        """``"pamr"``, ``"sam"`` or ``None``: ``refine`` with ``auto`` resolved for the method."""
        if self.refine == REFINE_AUTO:
            return {NACLIP: REFINE_PAMR, TRIDENT: REFINE_SAM}.get(self.method)
        return None if self.refine == REFINE_NONE else self.refine
