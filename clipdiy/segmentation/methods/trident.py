"""``trident``: Trident (Yu et al., ICCV 2025) as its authors' code runs it (TRIDENT.md).

Per image: the aspect-kept resize (short side 448), a canvas whose sides are multiples of 16,
336-px windows (stride 224); per window, DINO ViT-B/16 features and CLIP ViT-B/16 blocks 1-11,
then CLIP's last block with attention taken from DINO's cosine similarities; the window values
averaged into place on the canvas grid, resized to SAM's token grid, and aggregated there with
the attention of SAM ViT-B's last encoder block, filtered by SAM's value cosines; CLIP's final
norm and projection; cosine logits against one text embedding per query word (80 templates),
bilinearly to the original size; the softmax over queries at logit scale 40, background the max
of its queries, pixels under ``prob_thd`` to background (the decision is NACLIP's, SPEC 8.9).

Batching (the authors' code takes one image, TRIDENT.md 10.1): the windows of all images of a
batch share the CLIP and DINO forwards (up to ``max_forward_windows`` each); the SAM encoder runs
on up to ``sam_batch_size`` images at a time; DINO's similarity mean stays per image (it couples
an image's windows, never two images). The splice, the aggregation and everything after run per
group of images with equal :meth:`TridentMethod.batch_key`.

SAM refinement (TRIDENT.md 7, which the published numbers use; ``refine="sam"``, the default
through ``auto``): the SAM encoder pass also yields the image embeddings, and :meth:`decide`
refines the coarse decision with SAM's mask decoder (:mod:`clipdiy.segmentation.sam_refine`),
all regions of a group's images in one decoder batch. The class probabilities it returns are
then the refined scores R normalised over classes where any class scores, else the coarse ones.

Precision (``SegmenterConfig.precision``): ``fp32`` runs everything in float32; ``fp16`` follows
the authors' casts (TRIDENT.md 1.4): CLIP (its LayerNorms computed in float32), DINO and SAM's
image encoder in fp16, and with them everything up to the upsampled query logits (DINO's
attention, the splice, SAM's filtered attention, the aggregation, the cosine logits); SAM's
input normalised in fp16 with fp16-rounded constants; the decision and the SAM refinement in
float32, the refinement's prompt encoder and mask decoder with fp16-rounded weights. The
preprocessing of both inputs stays float32, as the authors'.

Large photos: a photo of more than ``TridentConfig.tile_side`` squared pixels is not upsampled
in :meth:`TridentMethod.forward_groups`: its SAM-grid logits go to the segmenter, which asks
:meth:`TridentMethod.tile_decisions` for its bands of rows; the upsampling, the decision and the
SAM refinement then run band by band (:func:`~clipdiy.segmentation.sam_refine.refine_in_bands`),
and no map of the photo's U queries or C classes is held whole. In fp16 the bands upsample the
fp16 logits in float32 (the one place a large photo departs from the authors' fp16 casts).
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clipdiy.segmentation.batching import group_by_shape, to_device
from clipdiy.segmentation.config import (
    REFINE_SAM,
    TRIDENT,
    SegmenterConfig,
    TridentConfig,
)
from clipdiy.segmentation.methods import MethodEntry, register_method
from clipdiy.segmentation.methods.base import MethodDecision, MethodLogits
from clipdiy.segmentation.methods.naclip import (
    NACLIP_MEAN,
    NACLIP_STD,
    NaclipMethod,
    init_query_columns,
    query_words,
    window_boxes,
)
from clipdiy.segmentation.prepared import PreparedImage
from clipdiy.segmentation.sam_refine import SamRefineSetting
from clipdiy.segmentation.tiles import ROW_BLOCK, Span, Tile, bilinear_region
from clipdiy.segmentation.vocabulary import Vocabulary

#: CLIP's and ImageNet's normalisation on [0, 1] RGB (TRIDENT.md 2.2): a window goes to DINO as
#: Normalize_ImageNet(UnNormalize_CLIP(window)).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: SAM's normalisation of 0-255 RGB and its square input (TRIDENT.md 1.3.4, 3.4).
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)
SAM_SIZE = 1024
#: CLIP's and SAM's patch (both 16 px).
PATCH = 16


@dataclass(frozen=True)
class TridentSetting:
    """The settings one run uses, resolved from :class:`TridentConfig` and the vocabulary.

    ``threshold`` is the authors' ``prob_thd``; ``logit_scale`` and ``threshold`` are the names
    NACLIP's decision reads.
    """

    short_side: int
    long_side: int
    slide_crop: int
    slide_stride: int
    threshold: float
    cos_fac: float
    refine_neg_cos: bool
    beta: float
    gamma: float
    logit_scale: float
    coarse_thresh: float = 0.2


#: The authors' settings per built-in vocabulary (TRIDENT.md 2.1): (Resize short side,
#: slide_stride, prob_thd, cos_fac, refine_neg_cos, coarse_thresh). Anything else: their base
#: configuration with the VOC21/COCO-Object resize.
PUBLISHED = {
    "trident-voc21": (448, 224, 0.2, 1.2, True, 0.2),
    "trident-coco-object": (448, 224, 0.25, 1.2, True, 0.25),
}
BASE = (448, 224, 0.0, 1.2, True, 0.2)


def resolve_setting(config: TridentConfig, vocabulary_name: str) -> TridentSetting:
    """The published setting of ``vocabulary_name``, with any field ``config`` sets overriding it."""
    short_side, stride, prob_thd, cos_fac, refine_neg_cos, coarse_thresh = PUBLISHED.get(vocabulary_name, BASE)
    pick = lambda value, default: default if value is None else value
    return TridentSetting(
        short_side=pick(config.short_side, short_side),
        long_side=config.long_side,
        slide_crop=config.slide_crop,
        slide_stride=pick(config.slide_stride, stride),
        threshold=pick(config.prob_thd, prob_thd),
        cos_fac=pick(config.cos_fac, cos_fac),
        refine_neg_cos=pick(config.refine_neg_cos, refine_neg_cos),
        beta=config.beta,
        gamma=config.gamma,
        logit_scale=config.logit_scale,
        coarse_thresh=pick(config.coarse_thresh, coarse_thresh),
    )


def resized_size(height: int, width: int, setting: TridentSetting) -> tuple[int, int]:
    """mmcv's keep-ratio Resize to scale (long_side, short_side) (TRIDENT.md 2.1): (h, w), each >= 1."""
    scale = min(setting.long_side / max(height, width), setting.short_side / min(height, width))
    return max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5))


def _ceil16(side: int) -> int:
    return -(-side // PATCH) * PATCH


def canvas_size(height: int, width: int, crop: int) -> tuple[int, int]:
    """CLIP's canvas (``preprocess_image``, TRIDENT.md 3.1): sides multiples of 16, each >= ``crop``.

    Sides already multiples of 16 are kept, except (unlike the authors' code, which then crashes,
    10.6) a side under ``crop``, which goes through the resize branch.
    """
    if height % PATCH == 0 and width % PATCH == 0 and min(height, width) >= crop:
        return height, width
    longer = max(height, width)
    target = _ceil16(longer)
    return max(_ceil16(int(height * target / longer)), crop), max(_ceil16(int(width * target / longer)), crop)


def sam_input_size(height: int, width: int) -> tuple[int, int]:
    """SAM's resized input for an H0 x W0 photo: ceil16 each side, then the longest side to 1024
    (``get_preprocess_shape``: int(side * scale + 0.5)) (TRIDENT.md 3.4)."""
    tmp_h, tmp_w = _ceil16(height), _ceil16(width)
    scale = SAM_SIZE / max(tmp_h, tmp_w)
    return int(tmp_h * scale + 0.5), int(tmp_w * scale + 0.5)


def prepare_trident(rgb: np.ndarray, config: SegmenterConfig) -> PreparedImage:
    """CPU preprocessing: path A (CLIP/DINO: mmcv's resize with OpenCV's bilinear) as the model
    input, path B (SAM: OpenCV's bilinear to sides rounded up to 16, then PIL's bilinear to a
    longest side of 1024) as the second input (TRIDENT.md 2.1, 3.4)."""
    height, width = rgb.shape[:2]
    setting = resolve_setting(config.trident, config.vocabulary)
    size = resized_size(height, width, setting)
    resized = cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    stretched = cv2.resize(rgb, (_ceil16(width), _ceil16(height)), interpolation=cv2.INTER_LINEAR)
    sam_h, sam_w = sam_input_size(height, width)
    sam = np.asarray(Image.fromarray(stretched).resize((sam_w, sam_h), Image.BILINEAR))
    return PreparedImage(
        model_input=np.ascontiguousarray(resized),
        saliency_input=np.ascontiguousarray(sam),
        original_size=(int(height), int(width)),
    )


def default_forward_windows(device: torch.device) -> int:
    return 64 if device.type == "cuda" else 8


def default_sam_batch(device: torch.device) -> int:
    return 8 if device.type == "cuda" else 1


class TridentMethod:
    """Trident on loaded CLIP, DINO and SAM (see :class:`~clipdiy.segmentation.methods.base.SegmentationMethod`).

    ``dino``: timm ``vit_base_patch16_224.dino``; ``sam``: segment-anything's SAM ViT-B (only its
    image encoder is used without refinement; its prompt encoder and mask decoder refine).
    """

    name = TRIDENT
    saliency_backend = "none"
    saliency_weights = None

    def __init__(self, clip, dino, sam, vocabulary: Vocabulary, config: SegmenterConfig, text_embeddings, device, weights: str | None = None):
        from clipdiy.segmentation.models.trident import TridentClipEncoder

        self.device = torch.device(device)
        #: The encoders' dtype (CLIP's weights): what runs from the forwards to the query logits.
        self.dtype = clip.dtype
        self.config = resolve_setting(config.trident, vocabulary.name)
        self.encoder = TridentClipEncoder(clip.model.visual)
        self.dino = dino
        self.sam = sam
        self.sam_encoder = sam.image_encoder
        self.refine = config.refinement == REFINE_SAM
        trident = config.trident
        self.refine_setting = SamRefineSetting(
            coarse_thresh=self.config.coarse_thresh,
            minimal_area=trident.minimal_area,
            iou_thresh=trident.sam_iou_thresh,
            mask_coefficient=trident.sam_mask_coefficient,
        )
        #: The refinement's provenance (the rows' ``refine``), None without it.
        self.refine_id = (
            f"sam:vit_b:coarse={self.refine_setting.coarse_thresh:g}:area={self.refine_setting.minimal_area}"
            f":iou={self.refine_setting.iou_thresh:g}:mask={self.refine_setting.mask_coefficient:g}"
            if self.refine
            else None
        )
        #: Provenance of the DINO and SAM weights (the rows' ``saliency_weights`` field).
        self.saliency_weights = weights
        self.mode = f"slide:{self.config.slide_crop}/{self.config.slide_stride}"
        words, owners = query_words(vocabulary)
        if text_embeddings is None:
            from clipdiy.segmentation.config import PromptConfig
            from clipdiy.segmentation.text_embeddings import query_text_embeddings
            from clipdiy.segmentation.vocabulary import prompt_templates

            text_embeddings = query_text_embeddings(clip, words, prompt_templates(PromptConfig(ensemble="imagenet")), config.text_cache_dir)
        if text_embeddings.shape[0] != len(words):
            raise ValueError(f"{text_embeddings.shape[0]} text embeddings for {len(words)} Trident query words")
        self.text_embeddings = text_embeddings.to(self.device, torch.float32)
        self.num_classes = len(vocabulary)
        # The authors' softmax runs over every listed query; a word listed twice ("bed" in
        # COCO-Object) is one map weighted by its multiplicity, as NACLIP's decision does.
        init_query_columns(self, words, owners)
        #: The query embeddings the cosine logits are formed with, in the encoders' dtype (the
        #: authors' fp16 text features; float32 under fp32).
        self.query_features = self.query_embeddings.to(self.dtype)
        trident = config.trident
        self.forward_windows = trident.max_forward_windows or default_forward_windows(self.device)
        self.sam_batch = trident.sam_batch_size or default_sam_batch(self.device)
        #: Pixels of a band of rows after the forward (see ``TridentConfig.tile_side``).
        self.band_pixels = trident.tile_side**2
        as_column = lambda values: torch.tensor(values, device=self.device).view(1, 3, 1, 1)
        self.mean, self.std = as_column(NACLIP_MEAN), as_column(NACLIP_STD)
        self.clip_mean, self.clip_std = as_column(CLIP_MEAN), as_column(CLIP_STD)
        self.imagenet_mean, self.imagenet_std = as_column(IMAGENET_MEAN), as_column(IMAGENET_STD)
        # SAM normalises in its own dtype: under fp16 its constants are the fp16-rounded buffers
        # of the authors' half() SAM (TRIDENT.md 1.3.4) and the arithmetic is fp16.
        self.sam_mean, self.sam_std = as_column(SAM_MEAN).to(self.dtype), as_column(SAM_STD).to(self.dtype)

    def batch_key(self, prepared) -> Hashable:
        """Equal keys: equal canvas, windows, SAM grid and original size."""
        return tuple(prepared.model_input.shape), tuple(prepared.saliency_input.shape), tuple(prepared.original_size)

    def forward(self, pixels: torch.Tensor, prepared: Sequence) -> MethodLogits:
        """Query logits of one batch of equal :meth:`batch_key` (``pixels`` unused: Trident has two inputs)."""
        ((_, logits),) = self.forward_groups(prepared)
        return logits

    def forward_groups(self, prepared: Sequence) -> Iterator[tuple[list[int], MethodLogits]]:
        """(indices, logits) per group of equal :meth:`batch_key`: B x U x H0 x W0 float32 query
        logits at the original size, pixel-major (formed and upsampled in the encoders' dtype, then
        float32: TRIDENT.md 6.2); the guide is the resized input (unused: no PAMR). A photo larger
        than one band (:meth:`tiled`) gets its SAM-grid logits (B x U x hs x ws, the encoders'
        dtype) as ``source`` instead, for :meth:`tile_decisions`."""
        groups = group_by_shape([self.batch_key(p) for p in prepared])
        canvases, boxes = [], []
        for group in groups:
            normalised = to_device([prepared[i].model_input for i in group], self.device).float().sub_(self.mean).div_(self.std)
            size = canvas_size(*normalised.shape[-2:], self.config.slide_crop)
            if size != tuple(normalised.shape[-2:]):
                normalised = F.interpolate(normalised, size=size, mode="bilinear", align_corners=False)
            canvases.append(normalised)
            boxes.append(window_boxes(*size, self.config.slide_crop, self.config.slide_stride))
        values = self._window_values(canvases, boxes)
        sam = self._sam_stream([[prepared[i].saliency_input for i in group] for group in groups])
        for g, group in enumerate(groups):
            spliced = self._splice(values[g], boxes[g], tuple(canvases[g].shape[-2:]))
            values[g] = None  # type: ignore[call-overload]  # done with: free it before the next group
            sam_pixels = [prepared[i].saliency_input for i in group]
            grid = (sam_pixels[0].shape[0] // PATCH, sam_pixels[0].shape[1] // PATCH)
            weights, embeddings = next(sam)
            features = self.encoder.aggregate(spliced, weights, grid)  # b x N x E
            del spliced, weights
            logits = (features @ self.query_features.T).view(len(group), *grid, -1).permute(0, 3, 1, 2)
            size = tuple(prepared[group[0]].original_size)
            context = SamContext(embeddings, tuple(sam_pixels[0].shape[:2])) if self.refine else None
            if self.tiled(size):  # upsampled band by band (tile_decisions)
                yield group, MethodLogits(logits=None, guide=None, source=logits, size=size, context=context)
            else:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False).float()
                yield group, MethodLogits(logits=logits, guide=canvases[g], context=context)
            canvases[g] = None  # type: ignore[call-overload]

    def _window_values(self, canvases: Sequence[torch.Tensor], boxes: Sequence[Sequence[tuple[int, int, int, int]]]) -> list[torch.Tensor]:
        """Block-12 values of every window of every image (per group: (b * K) x W x g x g, image-major).

        DINO runs first over all windows (its per-image similarity mean couples an image's
        windows); then CLIP, both in forwards of at most ``forward_windows`` windows.
        """
        from clipdiy.segmentation.models.trident import (
            dino_patch_features,
            dino_similarity_means,
        )

        windows = [(g, b, box) for g, canvas in enumerate(canvases) for b in range(canvas.shape[0]) for box in boxes[g]]
        image_ids: dict[tuple[int, int], int] = {}
        owners = torch.tensor([image_ids.setdefault((g, b), len(image_ids)) for g, b, _ in windows], device=self.device)
        chunks = [range(start, min(start + self.forward_windows, len(windows))) for start in range(0, len(windows), self.forward_windows)]

        def crops(chunk: range) -> torch.Tensor:
            return torch.stack([canvases[windows[i][0]][windows[i][1], :, y1:y2, x1:x2] for i in chunk for y1, y2, x1, x2 in [windows[i][2]]])

        dino_features = []
        for chunk in chunks:
            pixels = crops(chunk).mul_(self.clip_std).add_(self.clip_mean).sub_(self.imagenet_mean).div_(self.imagenet_std)
            dino_features.append(dino_patch_features(self.dino, pixels))
        dino = torch.cat(dino_features)
        means = dino_similarity_means(dino, owners, len(image_ids))[owners]
        outputs = []
        for chunk in chunks:
            outputs.append(self.encoder.window_values(crops(chunk), dino[chunk.start : chunk.stop], means[chunk.start : chunk.stop], self.config.beta, self.config.gamma))
        values = torch.cat(outputs)
        per_group, start = [], 0
        for g, canvas in enumerate(canvases):
            count = canvas.shape[0] * len(boxes[g])
            per_group.append(values[start : start + count])
            start += count
        return per_group

    def _splice(self, values: torch.Tensor, boxes, size: tuple[int, int]) -> torch.Tensor:
        from clipdiy.segmentation.models.trident import splice

        return splice(values, boxes, (size[0] // PATCH, size[1] // PATCH), PATCH)

    def _sam_stream(self, groups: Sequence[Sequence[np.ndarray]]) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per group, in order: b x N x N SAM-guided weights of its b SAM inputs (h x w x 3
        uint8, one size per group) and, when refining, SAM's b x 256 x 64 x 64 image embeddings
        (else None).

        SAM's encoder runs on up to ``sam_batch`` images at a time *across* groups: every input
        is zero-padded to the same 1024 x 1024, so photos of any size share its forwards (the
        authors' code encodes one photo at a time, TRIDENT.md 10.1). Each forward computes the
        attention rows and columns of the largest valid grid among its images, cropped per image;
        a group is handed on as soon as its last image is encoded, so at most one forward's
        results wait beyond the group in hand.
        """
        from clipdiy.segmentation.models.trident import (
            sam_guided_weights,
            sam_last_attention,
        )

        images = [(g, image) for g, group in enumerate(groups) for image in group]
        pending: dict[int, list[tuple[torch.Tensor, torch.Tensor | None]]] = {g: [] for g in range(len(groups))}
        next_group = 0
        for start in range(0, len(images), self.sam_batch):
            chunk = images[start : start + self.sam_batch]
            pixels = torch.stack([
                F.pad(to_device([image], self.device)[0].to(self.sam_mean.dtype).sub_(self.sam_mean[0]).div_(self.sam_std[0]),
                      (0, SAM_SIZE - image.shape[1], 0, SAM_SIZE - image.shape[0]))  # zeros after normalising
                for _, image in chunk
            ])
            grids = [(image.shape[0] // PATCH, image.shape[1] // PATCH) for _, image in chunk]
            union = (max(h for h, _ in grids), max(w for _, w in grids))
            attention, values, neck = sam_last_attention(self.sam_encoder, pixels, union, embeddings=self.refine)
            del pixels
            heads, depth = values.shape[1], values.shape[-1]
            first = 0
            while first < len(chunk):  # runs of images of one group (one grid): one weights call each
                g = chunk[first][0]
                last = first
                while last < len(chunk) and chunk[last][0] == g:
                    last += 1
                hs, ws = grids[first]
                grid_attention = attention[first:last].view(last - first, heads, *union, *union)[:, :, :hs, :ws, :hs, :ws]
                grid_values = values[first:last].view(last - first, heads, *union, depth)[:, :, :hs, :ws]
                weights = sam_guided_weights(
                    grid_attention.reshape(last - first, heads, hs * ws, hs * ws), grid_values.reshape(last - first, heads, hs * ws, depth),
                    self.config.cos_fac, self.config.refine_neg_cos,
                )
                pending[g].append((weights, None if neck is None else neck[first:last]))
                first = last
            del attention, values, neck
            end = start + len(chunk)
            complete = images[end][0] if end < len(images) else len(groups)  # the groups before it are whole
            while next_group < complete:
                parts = pending.pop(next_group)
                yield torch.cat([w for w, _ in parts]), (torch.cat([e for _, e in parts]) if self.refine else None)
                next_group += 1

    def tiled(self, size: tuple[int, int]) -> bool:
        """Whether a photo of this (H, W) runs after the forward in more than one band of rows."""
        return size[0] * size[1] > self.band_pixels

    def band_rows(self, size: tuple[int, int]) -> int:
        """Rows of a band: at most ``tile_side`` squared pixels, one row at least."""
        return max(1, self.band_pixels // size[1])

    def tile_decisions(self, forward: MethodLogits) -> Iterator[tuple[Tile, MethodDecision]]:
        """(band, decision of its rows) for consecutive bands of whole rows of a photo larger
        than one band: as :meth:`decide` on the whole photo, to float32 rounding.

        Each band's logits are the rows of the whole upsampling (``bilinear_region`` of the
        B x U x hs x ws SAM-grid logits, ``forward.source``), decided as :meth:`decide` does;
        with SAM refinement, :func:`~clipdiy.segmentation.sam_refine.refine_in_bands` asks for
        every band twice (the half-resolution maps, then the scores), and the refined scores are
        normalised as :meth:`decide` normalises them.
        """
        size = tuple(forward.size)
        height, width = size
        band = self.band_rows(size)

        def band_of(r0: int, r1: int) -> Tile:
            return Tile(Span(r0, r1, r0, r1), Span(0, width, 0, width))

        def rows(r0: int, r1: int, normalise: bool = True) -> MethodDecision:
            logits = bilinear_region(forward.source, size, (r0, r1), (0, width))  # B x U x rows x W, pixel-major
            return NaclipMethod.decide(self, logits, forward, normalise=normalise)  # type: ignore[arg-type]

        if not self.refine:
            for r0 in range(0, height, band):
                r1 = min(height, r0 + band)
                yield band_of(r0, r1), rows(r0, r1)
            return
        from clipdiy.segmentation.sam_refine import refine_in_bands

        def coarse(r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
            decision = rows(r0, r1, normalise=False)
            return decision.probabilities, decision.labels

        context: SamContext = forward.context  # type: ignore[assignment]
        batch = forward.source.shape[0]
        for r0, r1, probabilities, labels, scores in refine_in_bands(
            self.sam, context.embeddings, coarse, batch, self.num_classes, size, context.input_size, self.refine_setting, band
        ):
            yield band_of(r0, r1), self._normalised(probabilities, labels, scores)

    def working_bytes(self, prepared) -> int:
        """Buffers that grow with the photo, beyond the weights: SAM's N x N weights, cosine and
        attention rows (N <= 4096) and one global block's 12 x 4096^2 attention (x2: softmax);
        then, for a photo of one band, float32 maps at its size: the U query logits, the
        decision's C class probabilities and its labels and scores (4), and with refinement R,
        the mask maxima and P (3C).

        A photo larger than one band holds those maps for one band only (at most ``tile_side``
        squared pixels): U logits and the resize's two 64-row blocks, C + 4 decision planes,
        with refinement about 10 C planes (R, the mask maxima, the coarse P and its copies, the
        normalised probabilities) and 16 SAM masks upsampled at a time (the 1024-px square, and
        their rows at the band); plus what grows with the photo at a few bytes a pixel: its
        uint16 label map (2), and with refinement the half-resolution maps the regions are found
        on (labels, own probabilities, region ids and the component labelling's temporaries:
        about 12 bytes a half-resolution pixel, 3 an original pixel).
        """
        height, width = prepared.original_size
        queries = int(self.query_embeddings.shape[0])
        classes = self.num_classes
        tokens = (prepared.saliency_input.shape[0] // PATCH) * (prepared.saliency_input.shape[1] // PATCH)
        full = (SAM_SIZE // PATCH) ** 2
        sam = 4 * (3 * tokens * tokens + 12 * tokens * full + 2 * 12 * full * full)
        if not self.tiled((height, width)):
            refine = 4 * height * width * 3 * classes if self.refine else 0  # R, the mask maxima, P
            return 4 * height * width * (queries + classes + 4) + sam + refine
        rows = self.band_rows((height, width))
        band = rows * width
        planes = queries + classes + 4 + (10 * classes if self.refine else 0)
        resize = 2 * min(ROW_BLOCK, rows) * width * queries
        masks = 16 * (2 * SAM_SIZE * SAM_SIZE + 3 * band) if self.refine else 0
        per_pixel = 2 + (3 if self.refine else 0)
        return 4 * (band * planes + resize + masks) + per_pixel * height * width + sam

    def _normalised(self, probabilities: torch.Tensor, labels: torch.Tensor, scores: torch.Tensor) -> MethodDecision:
        """The refined decision: scores R normalised over classes where any class scores, the
        coarse probabilities (normalised) elsewhere."""
        total = scores.sum(dim=1, keepdim=True)
        normalised = torch.where(total > 0, scores / torch.where(total > 0, total, 1.0), probabilities / probabilities.sum(dim=1, keepdim=True))
        return MethodDecision(normalised, labels, 1.0 - normalised[:, :1])

    def decide(self, logits: torch.Tensor, forward: MethodLogits) -> MethodDecision:
        """The authors' ``postprocess_result`` (TRIDENT.md 6.4-6.6) is NACLIP's decision (SPEC 8.9):
        softmax over queries at ``logit_scale``, a class's best query (only background has
        several), ``prob_thd`` to background. Runs NACLIP's implementation on this method's
        queries and setting; then, when refining, the SAM refinement (7) on the authors'
        unnormalised probabilities. Refined probabilities: the scores R normalised over classes
        where any class scores, the coarse probabilities (normalised) elsewhere."""
        if not self.refine:
            return NaclipMethod.decide(self, logits, forward)  # type: ignore[arg-type]
        from clipdiy.segmentation.sam_refine import sam_refine

        coarse = NaclipMethod.decide(self, logits, forward, normalise=False)  # type: ignore[arg-type]
        context: SamContext = forward.context  # type: ignore[assignment]
        probabilities = coarse.probabilities.contiguous()
        labels, scores, _ = sam_refine(self.sam, context.embeddings, probabilities, coarse.labels, context.input_size, self.refine_setting)
        return self._normalised(probabilities, labels, scores)


@dataclass
class SamContext:
    """What the SAM refinement needs of a group's forward: SAM's b x 256 x 64 x 64 image
    embeddings and the (h, w) of its resized input."""

    embeddings: torch.Tensor
    input_size: tuple[int, int]


def build_trident(clip, saliency, vocabulary: Vocabulary, config: SegmenterConfig, text_embeddings, device) -> TridentMethod:
    """Load DINO and SAM as ``config.trident`` names them, on ``clip``'s device, in the precision
    the authors run them at ``clip``'s dtype (:func:`place_trident_models`)."""
    from clipdiy.segmentation.models.trident_weights import load_sam, load_trident_dino, place_trident_models

    dino, dino_id = load_trident_dino(config.trident)
    sam, sam_id = load_sam(config.trident)
    place_trident_models(dino, sam, device, clip.dtype, refine=config.refinement == REFINE_SAM)
    return TridentMethod(clip, dino, sam, vocabulary, config, text_embeddings, device, weights=f"dino={dino_id};sam={sam_id}")


register_method(MethodEntry(name=TRIDENT, prepare=prepare_trident, build=build_trident, needs_saliency=False))

__all__ = ["TridentMethod", "TridentSetting", "canvas_size", "prepare_trident", "resolve_setting", "sam_input_size"]
