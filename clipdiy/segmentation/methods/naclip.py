"""``naclip``: NACLIP (Hajimiri et al., WACV 2025) as its authors' code runs it (SPEC 8).

One CLIP ViT forward per image (or per 224-px window), made dense and local by the reduced last
block (:class:`~clipdiy.segmentation.models.naclip.NaclipEncoder`); cosine logits against one text embedding
per query word (80 templates each), upsampled to the original size; PAMR refines them (by
default); probabilities are the softmax over queries at logit scale 40, a class's the max over
its queries, and pixels whose best probability is under the threshold go to background.

Batching: images of every size share the image tower's forwards, up to
``NaclipConfig.max_forward_tokens`` tokens each (whole images padded to the longest token
sequence of their forward and masked, :class:`~clipdiy.segmentation.models.naclip.NaclipEncoder`; or, sliding,
the 224-px windows of all the batch's images together). The logits, their upsampling, PAMR and
the decision run per group of images with the same model input size *and* original size.

Large photos: the upsampling to the original size, PAMR and the decision run over tiles of at
most ``NaclipConfig.tile_side`` pixels a side (halo included, :mod:`clipdiy.segmentation.tiles`):
:meth:`NaclipMethod.forward_groups` then hands the segmenter the input-size logits and guide, and
the segmenter resizes, refines and decides them tile by tile, exactly as the whole image.

Layout: the query logits and everything after them are pixel-major in memory (B x Q x H x W
tensors with channels-last strides: the Q values of a pixel are contiguous), so the upsampling,
PAMR's products and the softmax over queries each read a pixel's queries in one run.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Sequence
from functools import lru_cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from clipdiy.segmentation.batching import group_by_shape, to_device
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
from clipdiy.segmentation.refine import pamr_reach
from clipdiy.segmentation.tiles import ROW_BLOCK, Tile, axis_spans, plan_tiles
from clipdiy.segmentation.vocabulary import Vocabulary

#: The authors' normalisation of 0-255 RGB pixels (CLIP's mean and std x 255, rounded; SPEC 8.2).
NACLIP_MEAN = (122.771, 116.746, 104.094)
NACLIP_STD = (68.501, 66.632, 70.323)

#: The authors' inference setting per built-in vocabulary (SPEC 8.7); anything else slides, as
#: their configurations for every other data set do.
WINDOW_BY_VOCABULARY = {"naclip-voc21": WINDOW_WHOLE, "voc": WINDOW_WHOLE, "naclip-coco-object": WINDOW_SLIDE, "naclip-coco-object-bed": WINDOW_SLIDE, "coco": WINDOW_SLIDE}


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


#: Scaled logits per block of the decision (float32 elements: 16 MiB, two buffers; a block of
#: pixels' queries stays in a CPU's cache between the steps).
DECISION_BLOCK_ELEMENTS = 1 << 22


def default_forward_tokens(device: torch.device) -> int:
    """Tokens per image-tower forward when the config leaves it open (see ``NaclipConfig``)."""
    return 32768 if device.type == "cuda" else 8192


def token_chunks(tokens: Sequence[int], budget: int, *, sort: bool) -> list[list[int]]:
    """Indices cut into runs whose length x longest sequence stays <= ``budget`` (one index at least).

    ``sort``: ascending token count first (whole images: similar lengths share a forward, little
    padding); else in order (windows: an image's windows stay together).
    """
    order = sorted(range(len(tokens)), key=tokens.__getitem__) if sort else list(range(len(tokens)))
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        candidate = max(longest, tokens[index])
        if current and (len(current) + 1) * candidate > budget:
            chunks.append(current)
            current, candidate = [], tokens[index]
        current.append(index)
        longest = candidate
    if current:
        chunks.append(current)
    return chunks


def class_runs(class_queries: Sequence[Sequence[int]]) -> list[tuple[int, int, int, int, bool]]:
    """How to gather each class's best query from the query columns, in few slice operations.

    class_queries: the (sorted) query columns of each class. Returns (first class, end class,
    first query, end query, is_max) runs: a copy of query columns [first, end) into classes
    [first, end) (consecutive one-query classes), or the max over query columns [first, end) into
    one class (a class with several queries). A class's several queries must be contiguous (they
    are unless some of them also belong to an earlier class: vocabulary files forbid that).
    """
    runs: list[tuple[int, int, int, int, bool]] = []
    for c, columns in enumerate(class_queries):
        if len(columns) == 1:
            last = runs[-1] if runs else None
            if last and not last[4] and last[1] == c and last[3] == columns[0]:
                runs[-1] = (last[0], c + 1, last[2], columns[0] + 1, False)
            else:
                runs.append((c, c + 1, columns[0], columns[0] + 1, False))
        elif list(columns) == list(range(columns[0], columns[-1] + 1)):
            runs.append((c, c + 1, columns[0], columns[-1] + 1, True))
        else:
            raise ValueError(f"class {c}'s query columns {list(columns)} are not contiguous")
    return runs


def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """n tensors 3 x h_i x w_i -> (n x 3 x max h x max w, each top-left, zeros elsewhere; the sizes)."""
    sizes = [(int(image.shape[-2]), int(image.shape[-1])) for image in images]
    if len(set(sizes)) == 1:
        return torch.stack(list(images)), sizes
    padded = images[0].new_zeros(len(images), 3, max(h for h, _ in sizes), max(w for _, w in sizes))
    for target, image, (height, width) in zip(padded, images, sizes):
        target[:, :height, :width] = image
    return padded, sizes


def init_query_columns(method, words: list[str], owners: list[int]) -> None:
    """Set the query columns a method's decision (:meth:`NaclipMethod.decide`) reads, from its
    query ``words`` and their classes (``owners``), and ``method.text_embeddings`` (one row a
    word): ``query_embeddings`` (one row a distinct word), ``multiplicity`` (None when no word is
    listed twice), ``repeated_columns``, ``class_queries`` and ``class_runs``.

    A word queried by two classes (the authors' COCO-Object list: "bed" in background and
    as the class bed) is one logit map, so the two classes tie exactly wherever it wins
    (argmax then picks the lower class, as the authors' code does with identical maps). The
    softmax over queries still counts it once per listing: its map is weighted by its
    multiplicity (an added log m before the softmax, a division by m after it).
    """
    unique = list(dict.fromkeys(words))
    method.query_embeddings = method.text_embeddings[[words.index(word) for word in unique]]
    multiplicity = torch.tensor([words.count(word) for word in unique], device=method.text_embeddings.device,
                                dtype=torch.float32)
    method.multiplicity = multiplicity if bool((multiplicity > 1).any()) else None
    #: Only the columns listed more than once need the log m and the division by m (over every
    #: column, those two passes were a quarter of the decision's time; m = 1 leaves a value as it
    #: is, so the result is the same to the bit).
    method.repeated_columns = [column for column, count in enumerate(multiplicity.tolist()) if count > 1]
    method.class_queries = [sorted({unique.index(w) for w, o in zip(words, owners) if o == c})
                            for c in range(method.num_classes)]
    method.class_runs = class_runs(method.class_queries)


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
        init_query_columns(self, words, owners)
        self.mode = resolve_window(self.config, vocabulary.name)
        self.pamr_max_elements = config.pamr.max_elements if config.refinement else 0
        #: Tiles of the original image (see ``NaclipConfig.tile_side``): PAMR's exact reach as the
        #: halo of the logits, and its affinity's as the guide's further margin.
        self.tile_side = self.config.tile_side
        self.halo, self.guide_margin = pamr_reach(config.pamr.iterations, config.pamr.dilations) if config.refinement else (0, 0)
        if self.tile_side <= 2 * self.halo:
            raise ValueError(f"NaclipConfig.tile_side {self.tile_side} must exceed twice PAMR's reach ({self.halo} px)")
        self.forward_tokens = self.config.max_forward_tokens or default_forward_tokens(torch.device(device))
        self.mean = torch.tensor(NACLIP_MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(NACLIP_STD, device=device).view(1, 3, 1, 1)

    def batch_key(self, prepared) -> Hashable:
        """Images with equal keys share the upsampling, PAMR and the decision (not only the forwards)."""
        return tuple(prepared.model_input.shape), tuple(prepared.original_size)

    def tiled(self, size: tuple[int, int]) -> bool:
        """Whether a photo of this (H, W) takes more than one tile after the forward."""
        return max(size) > self.tile_side

    def plan_tiles(self, size: tuple[int, int]) -> list[Tile]:
        """Tiles of an H x W original: regions at most ``tile_side`` a side, halo PAMR's reach."""
        return plan_tiles(size[0], size[1], self.tile_side, self.halo)

    def forward_groups(self, prepared: Sequence) -> Iterator[tuple[list[int], MethodLogits]]:
        """(indices, logits and guide) per group of equal :meth:`batch_key`, all images' forwards shared.

        Logits: B x Q x H x W at the original size, pixel-major (channels-last) float32; guide:
        the normalised input resized to it, B x 3 x H x W (for photos larger than one tile, the
        input-size maps and the size instead: :class:`MethodLogits`). A group is yielded as soon as its
        images' forwards are done (sliding: as its last window is), so only the groups in flight
        hold input-size logits.
        """
        groups = group_by_shape([self.batch_key(p) for p in prepared])
        inputs = [self._normalise(to_device([prepared[i].model_input for i in group], self.device)) for group in groups]
        sizes = [tuple(prepared[group[0]].original_size) for group in groups]
        logits = self._whole(inputs) if self.mode == WINDOW_WHOLE else self._slide(inputs)
        for g, input_logits in logits:
            yield groups[g], self._at_original_size(input_logits, inputs[g], sizes[g])
            inputs[g] = None  # type: ignore[call-overload]  # done with: free it before the next group

    def forward(self, pixels: torch.Tensor, prepared: Sequence) -> MethodLogits:
        """Query logits of one batch of equal :meth:`batch_key` (pixels: B x 3 x h x w uint8 on the device)."""
        normalised = self._normalise(pixels)
        ((_, logits),) = (self._whole if self.mode == WINDOW_WHOLE else self._slide)([normalised])
        return self._at_original_size(logits, normalised, tuple(prepared[0].original_size))

    def _normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().sub_(self.mean).div_(self.std)

    def _at_original_size(self, logits: torch.Tensor, normalised: torch.Tensor, size: tuple[int, int]) -> MethodLogits:
        """Input-size logits (B x Q x h x w) and the normalised input, bilinearly to the original H x W
        (deferred, for the segmenter's tiles, when the photo is larger than one tile)."""
        if self.tiled(size):
            return MethodLogits(logits=None, guide=None, source=logits, source_guide=normalised, size=size)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        guide = F.interpolate(normalised, size=size, mode="bilinear", align_corners=False)
        return MethodLogits(logits=logits, guide=guide)

    def _grid_logits(self, features: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """Cosine logits of n images' patch features (n x >= gh*gw x D) on their gh x gw grid, bilinearly
        to the input size h x w: n x Q x h x w, pixel-major."""
        count = grid[0] * grid[1]
        logits = (features[:, :count] @ self.query_embeddings.T).view(-1, grid[0], grid[1], self.query_embeddings.shape[0])
        return F.interpolate(logits.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=False)

    def _whole(self, inputs: Sequence[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """(group, B x Q x h x w input-size logits) of each group: every image in one forward (SPEC 8.2-8.7)."""
        images = [(g, b) for g, batch in enumerate(inputs) for b in range(batch.shape[0])]
        tokens = [self.encoder.tokens(*inputs[g].shape[-2:]) for g, _ in images]
        features: dict[tuple[int, int], torch.Tensor] = {}
        for chunk in token_chunks(tokens, self.forward_tokens, sort=True):
            pixels, sizes = pad_images([inputs[images[i][0]][images[i][1]] for i in chunk])
            out = self.encoder(pixels, sizes)  # n x P x D
            for row, i in enumerate(chunk):
                features[images[i]] = out[row]
        for g, batch in enumerate(inputs):
            size = tuple(batch.shape[-2:])
            stacked = torch.stack([features.pop((g, b)) for b in range(batch.shape[0])])
            yield g, self._grid_logits(stacked, self.encoder.grid(*size), size)

    def _slide(self, inputs: Sequence[torch.Tensor]) -> Iterator[tuple[int, torch.Tensor]]:
        """(group, B x Q x h x w input-size logits) of each group: window logits summed into place and
        divided by the windows covering each pixel (SPEC 8.7); the windows of all images share forwards."""
        size, stride = self.config.window_size, self.config.window_stride
        boxes = [window_boxes(*batch.shape[-2:], size, stride) for batch in inputs]
        windows = [(g, b, box) for g, batch in enumerate(inputs) for b in range(batch.shape[0]) for box in boxes[g]]
        left = [batch.shape[0] * len(boxes[g]) for g, batch in enumerate(inputs)]
        tokens = [self.encoder.tokens(y2 - y1, x2 - x1) for _, _, (y1, y2, x1, x2) in windows]
        totals: dict[int, torch.Tensor] = {}
        queries = self.query_embeddings.shape[0]
        for chunk in token_chunks(tokens, self.forward_tokens, sort=False):
            crops = [inputs[windows[i][0]][windows[i][1], :, y1:y2, x1:x2] for i in chunk for y1, y2, x1, x2 in [windows[i][2]]]
            pixels, sizes = pad_images(crops)
            out = self.encoder(pixels, sizes)  # n x P x D
            for row, i in enumerate(chunk):
                g, b, (y1, y2, x1, x2) = windows[i]
                if g not in totals:
                    batch, _, height, width = inputs[g].shape
                    totals[g] = inputs[g].new_zeros(batch, height, width, queries).permute(0, 3, 1, 2)  # pixel-major
                window = self._grid_logits(out[row : row + 1], self.encoder.grid(y2 - y1, x2 - x1), (y2 - y1, x2 - x1))
                totals[g][b : b + 1, :, y1:y2, x1:x2] += window
                left[g] -= 1
                if left[g] == 0:
                    count = inputs[g].new_zeros(1, 1, *inputs[g].shape[-2:])
                    for wy1, wy2, wx1, wx2 in boxes[g]:
                        count[:, :, wy1:wy2, wx1:wx2] += 1
                    yield g, totals.pop(g).div_(count)

    def working_bytes(self, prepared) -> int:
        """Float32 buffers at the original H x W, which grow with the photo while the forward does
        not: the U query logits and PAMR's refined copy (2U), the guide (3), the class
        probabilities of the decision (C) and its labels and top scores (4, as int64 + float32),
        plus PAMR's own working set, bounded by ``PamrConfig.max_elements`` (section 8.8).

        A photo larger than one tile holds those buffers for one tile only: 2U + 3 planes over
        its region (at most ``tile_side`` squared), C + 4 over its interior, the resize's row
        blocks (2 x 64 rows of the region's width, U planes), PAMR's bound; plus what grows with
        the photo: its label map (uint16) and the float64 preview sums (none larger than the
        model input)."""
        height, width = prepared.original_size
        queries = int(self.query_embeddings.shape[0])
        pamr = 4 * self.pamr_max_elements if self.pamr_max_elements else 0
        if not self.tiled((height, width)):
            planes = 2 * queries + 3 + self.num_classes + 4
            return 4 * height * width * planes + pamr
        rows = axis_spans(height, self.tile_side, self.halo)
        cols = axis_spans(width, self.tile_side, self.halo)
        region_h = max(span.region_end - span.region_start for span in rows)
        region_w = max(span.region_end - span.region_start for span in cols)
        interior = max(span.end - span.start for span in rows) * max(span.end - span.start for span in cols)
        guide = (region_h + 2 * self.guide_margin) * (region_w + 2 * self.guide_margin)
        tile = 2 * queries * region_h * region_w + 3 * guide + (self.num_classes + 4) * interior
        tile += 2 * ROW_BLOCK * region_w * queries
        model_input = 8 * int(np.prod(prepared.model_input.shape[:2]))
        return 4 * tile + pamr + 2 * height * width + model_input

    def decide(self, logits: torch.Tensor, forward: MethodLogits, normalise: bool = True) -> MethodDecision:
        """SPEC 8.9: softmax over queries of 40 x logits, max per class, threshold to background.

        logits: B x U x H x W, one map per distinct query word (any strides: pixel-major is the
        fast one; a tile's interior, a view into its region, is read in blocks of whole rows in
        place, :func:`_pixel_blocks`). Runs pixel-major, in blocks of
        pixels whose scaled logits and query probabilities stay in two reused buffers (bounded
        memory, no fresh pages per step): per block one scaled copy, one softmax, then each
        class's best query by slice copies (runs of one-query classes) and slice maxima (classes
        with several queries). Returns B x C x H x W probabilities (pixel-major), B x H x W
        labels, B x 1 x H x W foreground. ``normalise=False`` leaves the class probabilities as
        the authors' (a class's best query probability, not summing to 1 where a class has
        several queries; Trident's SAM refinement works on those).
        """
        batch, queries, height, width = logits.shape
        pixels = batch * height * width
        best = logits.new_empty(pixels, self.num_classes, dtype=torch.float32)
        rows = max(1, min(pixels, DECISION_BLOCK_ELEMENTS // queries))
        scaled, probabilities = best.new_empty(rows, queries), best.new_empty(rows, queries)
        log_multiplicity = None if self.multiplicity is None else self.multiplicity.log()
        for start, part in _pixel_blocks(logits, rows):
            count = part.numel() // queries
            block = torch.mul(part, self.config.logit_scale, out=scaled[:count].view(part.shape)).view(count, queries)
            for column in self.repeated_columns:
                block[:, column].add_(log_multiplicity[column])
            query_probabilities = torch.softmax(block, dim=-1, out=probabilities[:count])
            for column in self.repeated_columns:
                query_probabilities[:, column].div_(self.multiplicity[column])
            target = best[start : start + count]
            for first_class, end_class, first_query, end_query, is_max in self.class_runs:
                columns = query_probabilities[:, first_query:end_query]
                if is_max:
                    target[:, first_class] = columns.amax(dim=-1)  # (a strided out= is slow)
                else:
                    target[:, first_class:end_class] = columns
        del scaled, probabilities
        top, labels = best.max(dim=-1)
        labels.masked_fill_(top < self.config.threshold, 0)
        if normalise:
            best.div_(best.sum(dim=-1, keepdim=True))  # the authors' class probabilities, normalised
        class_probabilities = best.view(batch, height, width, -1).permute(0, 3, 1, 2)
        foreground = 1.0 - class_probabilities[:, :1]
        return MethodDecision(class_probabilities, labels.view(batch, height, width), foreground)


def _pixel_blocks(logits: torch.Tensor, rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first pixel, ... x U view) blocks of at most ``rows`` pixels of B x U x H x W logits, in
    pixel order (image, row, column).

    Pixel-major logits are one (B·H·W) x U view, cut into runs of ``rows``; others (a tile's
    interior, a crop of a larger map) are cut into runs of whole image rows, each read in place
    (the block's scaled copy is the only copy).
    """
    batch, queries, height, width = logits.shape
    pixel_major = logits.permute(0, 2, 3, 1)
    try:
        flat = pixel_major.view(-1, queries)
    except RuntimeError:
        flat = None
    if flat is not None:
        for start in range(0, flat.shape[0], rows):
            yield start, flat[start : start + rows]
        return
    lines = max(1, rows // width)
    for b in range(batch):
        for y in range(0, height, lines):
            yield (b * height + y) * width, pixel_major[b, y : y + lines]


register_method(
    MethodEntry(
        name=NACLIP,
        prepare=prepare_naclip,
        build=lambda clip, saliency, vocabulary, config, text, device: NaclipMethod(clip, vocabulary, config, text, device),
        needs_saliency=False,
    )
)
