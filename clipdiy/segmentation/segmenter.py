"""The segmenter: owns pre- and post-processing, batching, refinement and summaries; the methods
(``clipdiy.segmentation.methods``: CLIP-DIY, NACLIP) and the models stay pure.

Three stages, so a pipeline can put each where it belongs:

- :func:`prepare_input` (CPU): any image -> the method's model input (CLIP-DIY: 256 x 256 and
  the saliency input; NACLIP: short side 336) and the original size.
- :meth:`Segmenter.predict` (accelerator): the method's forward for a batch (CLIP-DIY: dense
  multi-scale CLIP scores, saliency, fusion, SPEC 1-3, at the model resolution; NACLIP: SPEC 8
  at the original resolution), the optional PAMR refinement, labels and scores.
- :func:`finalize` (CPU): the label map back at the original resolution (nearest).

:meth:`Segmenter.segment` chains the three for library users.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from clipdiy.segmentation.batching import to_device
from clipdiy.segmentation.config import CLIPDIY, PromptConfig, SegmenterConfig
from clipdiy.segmentation.images import ImageLike, to_rgb_uint8
from clipdiy.segmentation.prepared import PreparedImage
from clipdiy.segmentation.result import SegmentationResult
from clipdiy.segmentation.tiles import (
    area_bin_sizes,
    area_pool_region,
    bilinear_region,
    nearest_indices,
)
from clipdiy.segmentation.vocabulary import Vocabulary, vocabulary_hash


class ImageTextEncoder(Protocol):
    """What the segmenter needs of a CLIP model (``clipdiy.segmentation.models.clip.ClipModel`` is one)."""

    model_name: str
    weights_id: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor: ...

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor: ...


class SaliencyMap(Protocol):
    """What the segmenter needs of a saliency backend: B x 3 x H x W in [0, 1] -> B x 1 x H x W.

    Optional attributes (see ``SaliencyModel``): ``needs_pixels`` and ``weights_scores``, both
    True when absent.
    """

    name: str
    weights_id: str | None

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class Provenance:
    """Which models and settings produced a label; written into every output row."""

    clip_model: str
    clip_weights: str
    saliency_backend: str
    saliency_weights: str | None
    mode: str
    vocabulary_name: str
    vocabulary_hash: str
    saliency_max_side: int | None = None
    precision: str = "fp32"
    method: str = CLIPDIY
    refine: str | None = None


@dataclass
class ModelOutput:
    """The segmenter's output for one image at the method's output resolution (h x w: 256 x 256
    for faithful CLIP-DIY, the original H x W for NACLIP).

    label_map: h x w uint16; class_scores, mask_scores: (C,) float32 (see SegmentationResult);
    saliency: h' x w' float32 in [0, 1], the method's foreground map (CLIP-DIY: the saliency
    map; NACLIP: 1 - background probability, at its model input size); original_size: (H, W);
    probabilities: C x h x w or None.
    """

    label_map: np.ndarray
    class_scores: np.ndarray
    mask_scores: np.ndarray
    foreground_fraction: float
    saliency: np.ndarray
    original_size: tuple[int, int]
    probabilities: np.ndarray | None = None


def prepare_input(image: ImageLike, config: SegmenterConfig) -> PreparedImage:
    """CPU preprocessing of one image for ``config.method`` (no model needed: decode workers call it).

    Raises :class:`~clipdiy.errors.InvalidImageError` for images that cannot be labelled.
    """
    from clipdiy.segmentation.methods import method_entry

    return method_entry(config.method).prepare(to_rgb_uint8(image), config)


def finalize(output: ModelOutput, class_names: Sequence[str]) -> SegmentationResult:
    """Resize the label map to the original H x W (nearest, as the reference demo does)."""
    height, width = output.original_size
    h, w = output.label_map.shape
    if (h, w) == (height, width):  # already at the original size (NACLIP): no copy
        label_map = output.label_map
    else:
        rows = _nearest_source_indices(height, h)
        cols = _nearest_source_indices(width, w)
        label_map = output.label_map.take(rows, axis=0).take(cols, axis=1)  # ~4x faster than a 2-D gather
    return SegmentationResult(
        label_map=label_map,
        class_scores=output.class_scores,
        mask_scores=output.mask_scores,
        foreground_fraction=output.foreground_fraction,
        saliency=output.saliency,
        class_names=tuple(class_names),
        probabilities=output.probabilities,
    )


def _nearest_source_indices(out_size: int, in_size: int) -> np.ndarray:
    """Source index of each output sample of F.interpolate(mode="nearest"), as the demo resizes
    (:func:`~clipdiy.segmentation.tiles.nearest_indices`)."""
    return nearest_indices(out_size, in_size)


class Segmenter:
    """Segments batches of images into the classes of a vocabulary with the method ``config.method``.

    ``clip`` and ``saliency`` are models on the same device (``saliency`` is ``None`` for a
    method without saliency); ``text_embeddings`` (the method's: C x D class embeddings for
    CLIP-DIY, Q x D query embeddings for NACLIP) may be passed when already computed (e.g. once
    per run by a driver), else they are computed here.
    """

    def __init__(
        self,
        clip: ImageTextEncoder,
        saliency: SaliencyMap | None,
        vocabulary: Vocabulary,
        config: SegmenterConfig,
        text_embeddings: torch.Tensor | None = None,
    ):
        from clipdiy.segmentation.methods import method_entry

        _check_precision(config.precision, clip=clip, saliency=saliency)
        self.clip = clip
        self.saliency = saliency
        self.vocabulary = vocabulary
        self.config = config
        self.device = _module_device(clip) if config.device is None else torch.device(config.device)
        entry = method_entry(config.method)
        if entry.needs_saliency and saliency is None:
            raise ValueError(f"method {config.method!r} needs a saliency model")
        self.method = entry.build(clip, saliency, vocabulary, config, text_embeddings, self.device)
        self.text_embeddings = self.method.text_embeddings
        #: CLIP-DIY's dense scorer (None for other methods).
        self.scorer = getattr(self.method, "scorer", None)
        self.refinement = config.refinement
        prompts = config.prompts if config.method == CLIPDIY else PromptConfig(ensemble="imagenet")
        self.provenance = Provenance(
            clip_model=clip.model_name,
            clip_weights=clip.weights_id,
            saliency_backend=self.method.saliency_backend,
            saliency_weights=self.method.saliency_weights,
            mode=self.method.mode,
            vocabulary_name=vocabulary.name,
            vocabulary_hash=vocabulary_hash(vocabulary, prompts),
            saliency_max_side=config.saliency.max_side if entry.needs_saliency else None,
            method=config.method,
            refine=self._refine_id(),
            precision=config.precision,
        )

    def _refine_id(self) -> str | None:
        """Provenance of the refinement: its name and settings, e.g. ``pamr:10:8,16``."""
        if self.refinement is None:
            return None
        if self.refinement == "sam":
            return self.method.refine_id
        pamr = self.config.pamr
        return f"pamr:{pamr.iterations}:{','.join(str(d) for d in pamr.dilations)}"

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.vocabulary.class_names

    def segment(self, images: Sequence[ImageLike], *, return_probabilities: bool = False) -> list[SegmentationResult]:
        """Label maps at the original resolution, class scores and masks for each image."""
        prepared = []
        for index, image in enumerate(images):
            try:
                prepared.append(prepare_input(image, self.config))
            except ValueError as error:
                # Say which image of the batch is bad; keep the error's type and kind.
                error.args = (f"image {index}: {error.args[0]}",) + error.args[1:]
                raise
        outputs = self.predict(prepared, return_probabilities=return_probabilities)
        return [finalize(output, self.class_names) for output in outputs]

    def working_bytes(self, prepared: PreparedImage) -> int:
        """About how many bytes labelling ``prepared`` holds at once beyond the weights (the
        method's estimate, :meth:`SegmentationMethod.working_bytes`)."""
        return int(self.method.working_bytes(prepared))

    @torch.inference_mode()
    def predict(self, prepared: Sequence[PreparedImage], *, return_probabilities: bool = False) -> list[ModelOutput]:
        """Outputs for a batch of prepared images: the method's forward, refinement, labels, scores.

        The method decides which images share forwards (CLIP-DIY: those of one model input size;
        NACLIP: all, up to a token bound); refinement and decisions run per group of equal batch
        key (CLIP-DIY: model input size; NACLIP: input and original size).
        """
        if not prepared:
            return []
        outputs: list[ModelOutput | None] = [None] * len(prepared)
        for indices, forward in self.method.forward_groups(prepared):
            group = [prepared[i] for i in indices]
            if forward.logits is None:  # a photo larger than one tile (NACLIP)
                for i, output in zip(indices, self._predict_tiled(forward, group, return_probabilities)):
                    outputs[i] = output
                continue
            logits = forward.logits
            if self.refinement == "pamr":
                from clipdiy.segmentation.refine import pamr

                settings = self.config.pamr
                logits = pamr(forward.guide, logits, settings.iterations, settings.dilations, settings.max_elements)
            decision = self.method.decide(logits, forward)
            del logits, forward
            for i, output in zip(indices, self._summarise(decision, group, return_probabilities)):
                output.original_size = prepared[i].original_size
                outputs[i] = output
        return outputs  # type: ignore[return-value]

    def _predict_tiled(self, forward, group: Sequence[PreparedImage], return_probabilities: bool) -> list[ModelOutput]:
        """Outputs of one group whose upsampling the method deferred (``forward.logits`` is None),
        run tile by tile: the method's ``tile_decisions`` (Trident: bands of rows, refined by SAM)
        or :meth:`_tile_decisions` (NACLIP), each decision of a tile's interior summed into the
        same summaries :meth:`_summarise` gives (sums in float64). Holds one tile's maps, the
        label maps and the preview sums.
        """
        source, size = forward.source, tuple(forward.size)
        batch, height, width = source.shape[0], size[0], size[1]
        classes = len(self.vocabulary)
        device = source.device
        model_size = tuple(group[0].model_input.shape[:2])
        pool = height * width > model_size[0] * model_size[1]  # as _summarise: a preview no larger than the input
        labels_host = np.empty((batch, height, width), np.uint16)
        probabilities_host = np.empty((batch, classes, height, width), np.float32) if return_probabilities else None
        saliency_host = None if pool else np.empty((batch, height, width), np.float32)
        totals = {name: torch.zeros(batch, classes, device=device, dtype=torch.float64) for name in ("scores", "won", "summed")}
        foreground_total = torch.zeros(batch, device=device, dtype=torch.float64)
        preview = torch.zeros(batch, 1, *model_size, device=device, dtype=torch.float64) if pool else None
        tile_decisions = getattr(self.method, "tile_decisions", None)
        for tile, decision in (tile_decisions or self._tile_decisions)(forward):
            probabilities, labels = decision.probabilities, decision.labels
            top = probabilities.gather(1, labels[:, None])[:, 0].view(batch, -1).to(torch.float64)
            flat_labels = labels.view(batch, -1)
            totals["scores"] += probabilities.sum(dim=(2, 3), dtype=torch.float64)
            totals["won"].scatter_add_(1, flat_labels, torch.ones_like(top))
            totals["summed"].scatter_add_(1, flat_labels, top)
            foreground_total += decision.foreground.sum(dim=(1, 2, 3), dtype=torch.float64)
            interior = (slice(None), slice(tile.rows.start, tile.rows.end), slice(tile.cols.start, tile.cols.end))
            if pool:
                preview += area_pool_region(decision.foreground, size, model_size, (tile.rows.start, tile.rows.end), (tile.cols.start, tile.cols.end))
            else:
                saliency_host[interior] = decision.foreground[:, 0].float().cpu().numpy()
            labels_host[interior] = labels.to(torch.int32).cpu().numpy()
            if probabilities_host is not None:
                probabilities_host[(slice(None), slice(None)) + interior[1:]] = probabilities.float().cpu().numpy()
            del decision, probabilities, labels, top
        pixels = float(height * width)
        class_scores = (totals["scores"] / pixels).float().cpu().numpy()
        mask_scores = (totals["summed"] / totals["won"].clamp(min=1.0)).float().cpu().numpy()
        foreground_fraction = (foreground_total / pixels).cpu().numpy()
        if pool:
            saliency_host = (preview / area_bin_sizes(size, model_size, device))[:, 0].float().cpu().numpy()
        return [
            ModelOutput(
                label_map=labels_host[b],
                class_scores=class_scores[b],
                mask_scores=mask_scores[b],
                foreground_fraction=float(foreground_fraction[b]),
                saliency=saliency_host[b],
                original_size=size,
                probabilities=None if probabilities_host is None else probabilities_host[b],
            )
            for b in range(batch)
        ]

    def _tile_decisions(self, forward):
        """(tile, decision of its interior) for each of the method's tiles (NACLIP): the region's
        logits resized from the input-size maps, refined by PAMR over the region (its guide with
        PAMR's further margin), decided on the interior."""
        from clipdiy.segmentation.refine import pamr

        source, source_guide, size = forward.source, forward.source_guide, tuple(forward.size)
        height, width = size
        margin = self.method.guide_margin
        for tile in self.method.plan_tiles(size):
            rows = (tile.rows.region_start, tile.rows.region_end)
            cols = (tile.cols.region_start, tile.cols.region_end)
            logits = bilinear_region(source, size, rows, cols)  # B x U x region, pixel-major
            if self.refinement == "pamr":
                guide_rows = (max(0, rows[0] - margin), min(height, rows[1] + margin))
                guide_cols = (max(0, cols[0] - margin), min(width, cols[1] + margin))
                guide = bilinear_region(source_guide, size, guide_rows, guide_cols)
                margins = (rows[0] - guide_rows[0], guide_rows[1] - rows[1], cols[0] - guide_cols[0], guide_cols[1] - cols[1])
                settings = self.config.pamr
                logits = pamr(guide, logits, settings.iterations, settings.dilations, settings.max_elements, guide_margins=margins)
                del guide
            decision = self.method.decide(logits[:, :, tile.rows.inner, tile.cols.inner], forward)
            del logits
            yield tile, decision

    def _to_device(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """B arrays of h x w x 3 uint8 -> B x 3 x h x w uint8 on the device, one transfer."""
        return to_device(arrays, self.device)

    def _summarise(self, decision, group: Sequence[PreparedImage], return_probabilities: bool) -> list[ModelOutput]:
        """Label maps and scores of a B x C x h x w decision, moved to the host once."""
        probabilities, labels = decision.probabilities, decision.labels
        batch, classes = probabilities.shape[:2]
        top = probabilities.gather(1, labels[:, None])[:, 0]
        class_scores = probabilities.mean(dim=(2, 3))
        flat_labels = labels.view(batch, -1)
        won = torch.zeros(batch, classes, device=labels.device).scatter_add_(
            1, flat_labels, torch.ones_like(top.view(batch, -1), dtype=torch.float32)
        )
        summed = torch.zeros(batch, classes, device=labels.device).scatter_add_(1, flat_labels, top.view(batch, -1).float())
        mask_scores = summed / won.clamp(min=1.0)
        foreground = decision.foreground
        model_size = tuple(group[0].model_input.shape[:2])
        if foreground.shape[-2] * foreground.shape[-1] > model_size[0] * model_size[1]:
            # Ship the preview map no larger than the model input (NACLIP's is at the original size).
            foreground = F.interpolate(foreground, size=model_size, mode="area")
        host = {
            "labels": labels.to(torch.int32).cpu().numpy().astype(np.uint16),
            "class_scores": class_scores.float().cpu().numpy(),
            "mask_scores": mask_scores.float().cpu().numpy(),
            "foreground": decision.foreground.float().mean(dim=(1, 2, 3)).cpu().numpy(),
            "saliency": foreground[:, 0].float().cpu().numpy(),
            "probabilities": probabilities.float().cpu().numpy() if return_probabilities else None,
        }
        return [
            ModelOutput(
                label_map=host["labels"][b],
                class_scores=host["class_scores"][b],
                mask_scores=host["mask_scores"][b],
                foreground_fraction=float(host["foreground"][b]),
                saliency=host["saliency"][b],
                original_size=(0, 0),
                probabilities=None if host["probabilities"] is None else host["probabilities"][b],
            )
            for b in range(batch)
        ]


def _module_device(module: object) -> torch.device:
    parameters = getattr(module, "parameters", None)
    if parameters is not None:
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def select_device(requested: str | None = None) -> torch.device:
    """The requested device, else CUDA when present, else CPU."""
    if requested is not None:
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def select_dtype(precision: str) -> torch.dtype:
    """The torch dtype of a ``SegmenterConfig.precision`` (the same on every device)."""
    return DTYPES[precision]


def _check_precision(precision: str, **models: object) -> None:
    """Refuse models whose weights are not in ``precision``: rows record it as what produced them."""
    expected = DTYPES[precision]
    for role, model in models.items():
        dtype = getattr(model, "dtype", None)
        if isinstance(dtype, torch.dtype) and dtype != expected:
            raise ValueError(f"the {role} model runs in {dtype}, but the segmenter config says precision={precision}")


def create_segmenter(config: SegmenterConfig | None = None, *, text_embeddings: torch.Tensor | None = None) -> Segmenter:
    """Load the models a config names and build a :class:`Segmenter`.

    Fails fast with :class:`~clipdiy.errors.WeightsNotFoundError` when weights are missing.
    """
    from clipdiy.segmentation.methods import method_entry
    from clipdiy.segmentation.models.clip import create_clip_model
    from clipdiy.segmentation.models.saliency import create_saliency_model
    from clipdiy.segmentation.vocabulary import load_vocabulary

    config = config or SegmenterConfig()
    entry = method_entry(config.method)  # an unknown method fails before any model loads
    vocabulary = load_vocabulary(config.vocabulary)
    device = select_device(config.device)
    dtype = select_dtype(config.precision)
    clip = create_clip_model(config.clip, device=device, dtype=dtype)
    saliency = create_saliency_model(config.saliency, device=device, dtype=dtype) if entry.needs_saliency else None
    return Segmenter(clip, saliency, vocabulary, config, text_embeddings=text_embeddings)
