"""The CLIP-DIY segmenter: owns pre- and post-processing and fusion; the models stay pure.

Three stages, so a pipeline can put each where it belongs:

- :func:`prepare_image` (CPU): any image -> original RGB + the 256 x 256 model input.
- :meth:`Segmenter.predict` (accelerator): dense multi-scale CLIP scores, saliency, fusion
  (SPEC sections 1-3) for a batch, at the model resolution.
- :func:`finalize` (CPU): the label map back at the original resolution (nearest).

:meth:`Segmenter.segment` chains the three for library users.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from clipdiy.config import SegmenterConfig
from clipdiy.dense import DenseScorer
from clipdiy.images import ImageLike, to_rgb_uint8
from clipdiy.preprocess import resize_for_model, resize_for_saliency
from clipdiy.result import SegmentationResult
from clipdiy.vocabulary import Vocabulary, vocabulary_hash


class ImageTextEncoder(Protocol):
    """What the segmenter needs of a CLIP model (``clipdiy.models.clip.ClipModel`` is one)."""

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


@dataclass
class PreparedImage:
    """What :meth:`Segmenter.predict` needs of one image, prepared on the CPU.

    ``model_input``: h x w x 3 uint8 (256 x 256 faithful); ``saliency_input``: h' x w' x 3 uint8,
    the saliency model's input (the original itself at full resolution, unless shrunk by
    ``SaliencyConfig.max_side``); ``original_size``: (H, W) after EXIF orientation. The original
    is not kept: a pipeline ships only these to its accelerators.
    """

    model_input: np.ndarray
    saliency_input: np.ndarray
    original_size: tuple[int, int]


@dataclass
class ModelOutput:
    """The segmenter's output for one image at the model resolution (h x w, 256 x 256 faithful).

    label_map: h x w uint16; class_scores, mask_scores: (C,) float32 (see SegmentationResult);
    saliency: h x w float32 in [0, 1]; original_size: (H, W); probabilities: C x h x w or None.
    """

    label_map: np.ndarray
    class_scores: np.ndarray
    mask_scores: np.ndarray
    foreground_fraction: float
    saliency: np.ndarray
    original_size: tuple[int, int]
    probabilities: np.ndarray | None = None


def prepare_image(image: ImageLike, mode: str = "faithful", saliency_max_side: int | None = None) -> PreparedImage:
    """CPU preprocessing of one image; raises :class:`~clipdiy.errors.InvalidImageError`.

    ``saliency_max_side``: see :attr:`clipdiy.config.SaliencyConfig.max_side` (``None``: the
    saliency model sees the full resolution).
    """
    rgb = to_rgb_uint8(image)
    return PreparedImage(
        model_input=resize_for_model(rgb, mode),
        saliency_input=resize_for_saliency(rgb, saliency_max_side),
        original_size=(int(rgb.shape[0]), int(rgb.shape[1])),
    )


def finalize(output: ModelOutput, class_names: Sequence[str]) -> SegmentationResult:
    """Resize the label map to the original H x W (nearest, as the reference demo does)."""
    height, width = output.original_size
    h, w = output.label_map.shape
    rows = _nearest_source_indices(height, h)
    cols = _nearest_source_indices(width, w)
    label_map = output.label_map[rows[:, None], cols[None, :]]
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
    """Source index of each output sample of F.interpolate(mode="nearest"), as the demo resizes.

    Torch computes floorf(dst * (float)in / out) in float32, which differs from the exact integer
    floor(dst * in / out) where dst * in / out is an integer (e.g. 256 -> 230, 388, 428 rows).
    """
    scale = np.float32(in_size) / np.float32(out_size)
    source = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(source, in_size - 1)


def fuse(scores: torch.Tensor, saliency: torch.Tensor | None) -> torch.Tensor:
    """SPEC 3.2: class probabilities from score maps and a saliency map.

    scores: B x C x h x w (class 0 = background); saliency: B x 1 x h x w in [0, 1], or ``None``
    for no saliency (SPEC 3.5: no weighting, background competes with its own score).
    Returns B x C x h x w: softmax over classes of S * [1 - s, s, ..., s] (of S without saliency).
    """
    if saliency is None:
        return torch.softmax(scores, dim=1)
    weights = saliency.expand(-1, scores.shape[1], -1, -1).clone()
    weights[:, 0] = 1.0 - saliency[:, 0]
    return torch.softmax(scores * weights, dim=1)


class Segmenter:
    """Segments batches of images into the classes of a vocabulary (CLIP-DIY).

    ``clip`` and ``saliency`` are models on the same device; ``text_embeddings`` (C x D) may be
    passed when already computed (e.g. once per run by a driver), else they are computed here.
    """

    def __init__(
        self,
        clip: ImageTextEncoder,
        saliency: SaliencyMap,
        vocabulary: Vocabulary,
        config: SegmenterConfig,
        text_embeddings: torch.Tensor | None = None,
    ):
        _check_precision(config.precision, clip=clip, saliency=saliency)
        self.clip = clip
        self.saliency = saliency
        self._weights_scores = getattr(saliency, "weights_scores", True)
        self.vocabulary = vocabulary
        self.config = config
        self.device = _module_device(clip) if config.device is None else torch.device(config.device)
        if text_embeddings is None:
            from clipdiy.text_embeddings import class_text_embeddings

            text_embeddings = class_text_embeddings(clip, vocabulary, config.prompts, config.text_cache_dir)
        if text_embeddings.shape[0] != len(vocabulary):
            raise ValueError(
                f"{text_embeddings.shape[0]} text embeddings for a vocabulary of {len(vocabulary)} classes"
            )
        self.text_embeddings = text_embeddings.to(self.device, torch.float32)
        self.scorer = DenseScorer(
            clip.encode_image,
            self.text_embeddings,
            input_size=clip.image_size,
            mean=clip.mean,
            std=clip.std,
            crop_batch_size=config.crop_batch_size or default_crop_batch_size(self.device),
        )
        self.provenance = Provenance(
            clip_model=clip.model_name,
            clip_weights=clip.weights_id,
            saliency_backend=saliency.name,
            saliency_weights=saliency.weights_id,
            mode=config.mode,
            vocabulary_name=vocabulary.name,
            vocabulary_hash=vocabulary_hash(vocabulary, config.prompts),
            saliency_max_side=config.saliency.max_side,
            precision=config.precision,
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.vocabulary.class_names

    def segment(self, images: Sequence[ImageLike], *, return_probabilities: bool = False) -> list[SegmentationResult]:
        """Label maps at the original resolution, class scores and masks for each image."""
        prepared = []
        for index, image in enumerate(images):
            try:
                prepared.append(prepare_image(image, self.config.mode, self.config.saliency.max_side))
            except ValueError as error:
                # Say which image of the batch is bad; keep the error's type and kind.
                error.args = (f"image {index}: {error.args[0]}",) + error.args[1:]
                raise
        outputs = self.predict(prepared, return_probabilities=return_probabilities)
        return [finalize(output, self.class_names) for output in outputs]

    @torch.inference_mode()
    def predict(self, prepared: Sequence[PreparedImage], *, return_probabilities: bool = False) -> list[ModelOutput]:
        """Model-resolution outputs for a batch of prepared images (SPEC sections 1-3)."""
        if not prepared:
            return []
        outputs: list[ModelOutput | None] = [None] * len(prepared)
        # Images of one model-input size share every forward (faithful mode: the whole batch).
        for indices in _group_by_shape([p.model_input.shape for p in prepared]):
            scores = self.scorer(self._to_device([prepared[i].model_input for i in indices]))
            saliency = self._saliency([prepared[i].saliency_input for i in indices], scores.shape[-2:])
            probabilities = fuse(scores, saliency if self._weights_scores else None)
            for i, output in zip(indices, self._summarise(probabilities, saliency, return_probabilities)):
                output.original_size = prepared[i].original_size
                outputs[i] = output
        return outputs  # type: ignore[return-value]

    def _to_device(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """B arrays of h x w x 3 uint8 -> B x 3 x h x w uint8 on the device, one transfer."""
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return batch.to(self.device, non_blocking=True).contiguous()

    def _saliency(self, rgbs: Sequence[np.ndarray], size: torch.Size) -> torch.Tensor:
        """B x 1 x h x w soft saliency at the model resolution (SPEC 2 on the saliency inputs, then 3.1)."""
        if not getattr(self.saliency, "needs_pixels", True):
            # A backend that never reads pixels (``none``) gets a placeholder: no host-device copy.
            placeholder = torch.zeros(len(rgbs), 3, *size, device=self.device)
            return self.saliency(placeholder).float().clamp_(0.0, 1.0)
        maps: list[torch.Tensor | None] = [None] * len(rgbs)
        for indices in _group_by_shape([rgb.shape for rgb in rgbs]):
            images = self._to_device([rgbs[i] for i in indices]).float().div_(255.0)
            full = self.saliency(images).float()
            resized = F.interpolate(full, size=tuple(size), mode="bilinear", align_corners=False)
            for i, saliency_map in zip(indices, resized):
                maps[i] = saliency_map
        return torch.stack(maps).clamp_(0.0, 1.0)  # type: ignore[arg-type]

    def _summarise(
        self, probabilities: torch.Tensor, saliency: torch.Tensor, return_probabilities: bool
    ) -> list[ModelOutput]:
        """Label maps and scores of a B x C x h x w probability batch, moved to the host once."""
        batch, classes = probabilities.shape[:2]
        labels = probabilities.argmax(dim=1)
        top = probabilities.gather(1, labels[:, None])[:, 0]
        class_scores = probabilities.mean(dim=(2, 3))
        flat_labels = labels.view(batch, -1)
        won = torch.zeros(batch, classes, device=labels.device).scatter_add_(
            1, flat_labels, torch.ones_like(top.view(batch, -1), dtype=torch.float32)
        )
        summed = torch.zeros(batch, classes, device=labels.device).scatter_add_(1, flat_labels, top.view(batch, -1).float())
        mask_scores = summed / won.clamp(min=1.0)
        foreground = saliency.mean(dim=(1, 2, 3))
        host = {
            "labels": labels.to(torch.int32).cpu().numpy().astype(np.uint16),
            "class_scores": class_scores.float().cpu().numpy(),
            "mask_scores": mask_scores.float().cpu().numpy(),
            "foreground": foreground.float().cpu().numpy(),
            "saliency": saliency[:, 0].float().cpu().numpy(),
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


def _group_by_shape(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for index, shape in enumerate(shapes):
        groups[tuple(shape)].append(index)
    return list(groups.values())


def _module_device(module: object) -> torch.device:
    parameters = getattr(module, "parameters", None)
    if parameters is not None:
        for parameter in parameters():
            return parameter.device
    return torch.device("cpu")


def default_crop_batch_size(device: torch.device) -> int:
    """Crops per CLIP forward when the config leaves it open.

    On a GPU large forwards are where the speed is; on a CPU, ViT-B/32 runs fastest at 8-32 crops
    (measured: ~12 crops/s at 8-32 against 10 at 236 on 2 cores), larger ones only cost memory.
    """
    return 256 if device.type == "cuda" else 32


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
    from clipdiy.models.clip import create_clip_model
    from clipdiy.models.saliency import create_saliency_model
    from clipdiy.vocabulary import load_vocabulary

    config = config or SegmenterConfig()
    vocabulary = load_vocabulary(config.vocabulary)
    device = select_device(config.device)
    dtype = select_dtype(config.precision)
    clip = create_clip_model(config.clip, device=device, dtype=dtype)
    saliency = create_saliency_model(config.saliency, device=device, dtype=dtype)
    return Segmenter(clip, saliency, vocabulary, config, text_embeddings=text_embeddings)
