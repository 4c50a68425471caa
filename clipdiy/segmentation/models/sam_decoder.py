"""SAM's prompt encoder and mask decoder on many prompts of many images at once (TRIDENT.md 7.4).

segment-anything's ``SamPredictor.predict_torch`` takes the prompts of one image and one mask
prompt; the SAM refinement prompts every coarse region of every class of every image of a batch,
each class with its own mask prompt. These functions run them all in one batch: the same modules,
the same arithmetic per prompt, with the image embedding and the mask prompt of each prompt
picked by index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mask_prompt_embeddings(prompt_encoder: nn.Module, masks: torch.Tensor) -> torch.Tensor:
    """K x 256 x 256 mask prompts -> K x E x 64 x 64 dense embeddings, each as SAM embeds an
    *unbatched* (1 x 256 x 256) mask prompt, the way the authors pass it (TRIDENT.md 7.4.4).

    Unbatched, ``mask_downscaling``'s ``LayerNorm2d`` sees (channels, height, width) and takes
    its statistics over dimension 1: the height axis, not the channels. Here the same
    normalisation runs over the height axis (dim 2) of the batched K x channels x h x w maps,
    with the per-channel affine weights, so each prompt gets what its own unbatched call gives.
    """
    conv1, norm1, act1, conv2, norm2, act2, conv3 = prompt_encoder.mask_downscaling

    def norm_over_height(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(2, keepdim=True)
        variance = (x - mean).pow(2).mean(2, keepdim=True)
        x = (x - mean) / torch.sqrt(variance + norm.eps)
        return norm.weight[None, :, None, None] * x + norm.bias[None, :, None, None]

    x = act1(norm_over_height(norm1, conv1(masks[:, None])))
    x = act2(norm_over_height(norm2, conv2(x)))
    return conv3(x)


@torch.no_grad()
def decode_masks(
    sam: nn.Module,
    image_embeddings: torch.Tensor,
    image_index: torch.Tensor,
    points: torch.Tensor,
    boxes: torch.Tensor,
    dense: torch.Tensor,
    dense_index: torch.Tensor,
    chunk: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's single-mask output for n prompts of one positive point and one box each.

    image_embeddings: B x E x 64 x 64 (the encoder's neck); image_index: (n,) the image of each
    prompt; points: n x 2 (x, y) and boxes: n x 4 (x1, y1, x2, y2), in SAM's 1024-px input frame;
    dense: K x E x 64 x 64 mask-prompt embeddings (:func:`mask_prompt_embeddings`), dense_index:
    (n,) the one of each prompt. Runs in decoder batches of at most ``chunk`` prompts (each holds
    its own copy of the 64 x 64 image embedding). Returns low-resolution mask logits n x 256 x 256
    and predicted IoUs (n,) (``multimask_output=False``: mask token 0).
    """
    encoder, decoder = sam.prompt_encoder, sam.mask_decoder
    dtype = decoder.iou_token.weight.dtype
    image_pe = encoder.get_dense_pe().to(dtype)
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    masks, ious = [], []
    for start in range(0, points.shape[0], chunk):
        end = min(start + chunk, points.shape[0])
        labels = torch.ones(end - start, 1, device=points.device, dtype=points.dtype)
        sparse, _ = encoder(points=(points[start:end, None], labels), boxes=boxes[start:end], masks=None)
        tokens = torch.cat([output_tokens[None].expand(end - start, -1, -1), sparse.to(dtype)], dim=1)
        src = image_embeddings[image_index[start:end]].to(dtype) + dense[dense_index[start:end]].to(dtype)
        pos = image_pe.expand(end - start, -1, -1, -1)
        b, c, h, w = src.shape
        hs, src = decoder.transformer(src, pos, tokens)
        upscaled = decoder.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
        hyper = decoder.output_hypernetworks_mlps[0](hs[:, 1, :])  # mask token 0 only
        masks.append((hyper[:, None] @ upscaled.flatten(2)).view(b, *upscaled.shape[-2:]))
        ious.append(decoder.iou_prediction_head(hs[:, 0, :])[:, 0])
    return torch.cat(masks), torch.cat(ious)


def upsample_mask_logits(
    logits: torch.Tensor, input_size: tuple[int, int], stretched_size: tuple[int, int], original_size: tuple[int, int], encoder_size: int = 1024
) -> torch.Tensor:
    """n x 256 x 256 low-resolution mask logits -> n x H0 x W0 (TRIDENT.md 7.6.1).

    SAM's ``postprocess_masks`` (bilinear to the encoder's square input, crop to ``input_size``,
    bilinear to the image SAM was given, ``stretched_size``), then bilinear to the photo's
    ``original_size`` where that differs.
    """
    x = F.interpolate(logits[:, None], (encoder_size, encoder_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    x = F.interpolate(x, stretched_size, mode="bilinear", align_corners=False)
    if tuple(stretched_size) != tuple(original_size):
        x = F.interpolate(x, original_size, mode="bilinear", align_corners=False)
    return x[:, 0]


def upsample_mask_rows(
    logits: torch.Tensor,
    input_size: tuple[int, int],
    stretched_size: tuple[int, int],
    original_size: tuple[int, int],
    rows: tuple[int, int],
    encoder_size: int = 1024,
) -> torch.Tensor:
    """Rows [r0, r1) of :func:`upsample_mask_logits` (n x (r1 - r0) x W0), without the photo-sized maps.

    The 1024-px square and its crop are SAM-sized; the resize to ``stretched_size`` is computed
    only for the rows that the resize to ``original_size`` reads for these rows
    (:func:`~clipdiy.segmentation.tiles.bilinear_region`, the same arithmetic to float32 rounding).
    """
    from clipdiy.segmentation.tiles import bilinear_region, source_span

    if tuple(rows) == (0, original_size[0]):
        return upsample_mask_logits(logits, input_size, stretched_size, original_size, encoder_size)
    x = F.interpolate(logits[:, None], (encoder_size, encoder_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    if tuple(stretched_size) == tuple(original_size):
        return bilinear_region(x, stretched_size, rows, (0, original_size[1]))[:, 0]
    first, last = source_span(original_size[0], stretched_size[0], *rows)
    band = bilinear_region(x, stretched_size, (first, last), (0, stretched_size[1]))
    return bilinear_region(band, original_size, rows, (0, original_size[1]), source_size=stretched_size, source_origin=(first, 0))[:, 0]
