"""Trident's three encoders (TRIDENT.md sections 3-4), pure model code, batch-first.

- :func:`dino_patch_features`: DINO ViT-B/16 (timm ``vit_base_patch16_224.dino``) run as the
  DINO hub model runs it: position embeddings resized by DINO's rule, the final norm applied,
  the class token dropped (TRIDENT.md 1.2).
- :class:`TridentClipEncoder`: the CLIP ViT-B/16 image tower, blocks 1-11 unchanged, then block
  12 reduced to ``out_proj(A v)`` with the DINO-guided attention ``A`` (4.1-4.2); the splice of
  window values onto the image grid (4.3); the SAM-guided aggregation and projection (4.4-4.5).
- :func:`sam_last_attention`: SAM ViT-B's image encoder up to its last (global) block, of which
  only the softmax attention rows of the valid tokens and the values are computed (1.3.6, 3.4);
  or, for the SAM refinement, the whole encoder, whose neck output it returns as well.

Every function takes a batch; images of different sizes are grouped by their callers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipdiy.segmentation.models.naclip import check_naclip_tower
from clipdiy.segmentation.models.position_embedding import resize_position_embedding


def dino_patch_features(dino: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W ImageNet-normalised pixels -> B x D x H/16 x W/16 final-norm patch features.

    ``dino``: a timm ``VisionTransformer`` with a class token (``vit_base_patch16_224.dino``). The
    position table is resized by DINO's rule (scale (grid + 0.1) / 14, bicubic), not timm's.
    """
    batch = pixels.shape[0]
    x = dino.patch_embed.proj(pixels.to(dino.patch_embed.proj.weight.dtype))  # B x D x gh x gw
    grid_h, grid_w = x.shape[-2:]
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([dino.cls_token.expand(batch, -1, -1).to(x.dtype), x], dim=1)
    x = x + resize_position_embedding(dino.pos_embed[0], grid_h, grid_w).to(x.dtype)
    x = dino.norm_pre(x)
    for block in dino.blocks:
        x = block(x)
    x = dino.norm(x)
    return x[:, 1:].transpose(1, 2).reshape(batch, -1, grid_h, grid_w)


def dino_similarity_means(features: torch.Tensor, owners: torch.Tensor, images: int) -> torch.Tensor:
    """The mean DINO cosine similarity of each image over all its windows' token pairs (4.2.4).

    features: B x D x gh x gw of B windows; owners: (B,) image index of each window. An image's
    mean is the average of its windows' n x n cosine means (all windows have the same n), the
    authors' one mean over the whole window batch of one image. The cosines are in the features'
    dtype; their mean is accumulated in float32 and rounded once to that dtype, as the authors'
    fp16 ``torch.mean`` (TRIDENT.md 4.2.4). Returns (images,) in the features' dtype.
    """
    unit = F.normalize(features.flatten(2), dim=1)  # B x D x n
    window_means = (unit.transpose(1, 2) @ unit).mean(dim=(1, 2), dtype=torch.float32)
    sums = window_means.new_zeros(images).index_add_(0, owners, window_means)
    counts = window_means.new_zeros(images).index_add_(0, owners, torch.ones_like(window_means))
    return (sums / counts).to(features.dtype)


def sam_last_attention(
    encoder: nn.Module, pixels: torch.Tensor, grid: tuple[int, int], embeddings: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """SAM's last-block attention and values on the valid token grid (TRIDENT.md 1.3.6, 3.4), and
    optionally the encoder's output (the image embeddings the SAM refinement prompts, 7).

    encoder: segment-anything's ``ImageEncoderViT`` (its last block global); pixels: B x 3 x S x S
    normalised and zero-padded (S = 1024); grid: (hs, ws), the valid tokens of every image of the
    batch. Returns attention B x heads x N x N (N = hs * ws: the softmax over all S/16 x S/16 keys,
    padding included, then its rows and columns cropped to the valid tokens, not renormalised),
    values B x heads x N x d, and, with ``embeddings``, the neck's B x 256 x S/16 x S/16 (else
    None). Without ``embeddings`` only the valid query rows are computed; with them every row
    (the rest of the last block needs them), as SAM's own forward does.
    """
    from segment_anything.modeling.image_encoder import get_rel_pos

    x = encoder.patch_embed(pixels.to(encoder.patch_embed.proj.weight.dtype))  # B x 64 x 64 x C
    if encoder.pos_embed is not None:
        x = x + encoder.pos_embed
    for block in encoder.blocks[:-1]:
        x = block(x)
    last = encoder.blocks[-1]
    if last.window_size != 0:
        raise ValueError("SAM's last encoder block must be global")
    attention = last.attn
    y = last.norm1(x)
    batch, height, width, _ = y.shape
    heads = attention.num_heads
    hs, ws = grid
    rows = (height, width) if embeddings else (hs, ws)
    q, k, v = attention.qkv(y).reshape(batch, height, width, 3, heads, -1).permute(3, 0, 4, 1, 2, 5).unbind(0)
    q = q[:, :, : rows[0], : rows[1]]  # B x heads x rows x d: the query rows needed
    keys = k.flatten(2, 3)  # B x heads x T x d
    logits = (q.flatten(2, 3) * attention.scale) @ keys.transpose(-2, -1)  # B x heads x R x T
    if attention.use_rel_pos:
        rel_h = get_rel_pos(height, height, attention.rel_pos_h)[: rows[0]]  # rows x H x d
        rel_w = get_rel_pos(width, width, attention.rel_pos_w)[: rows[1]]  # rows x W x d
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", q, rel_h)  # unscaled q, as SAM
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", q, rel_w)
        logits = logits.view(batch, heads, rows[0], rows[1], height, width)
        logits = logits + bias_h[..., :, None] + bias_w[..., None, :]
        logits = logits.view(batch, heads, rows[0] * rows[1], height * width)
    probabilities = logits.softmax(dim=-1)
    del logits
    neck = None
    if embeddings:  # the rest of the last block, then the neck (SAM's Block and Attention forwards)
        out = (probabilities @ v.flatten(2, 3)).view(batch, heads, height, width, -1).permute(0, 2, 3, 1, 4).reshape(batch, height, width, -1)
        x = x + attention.proj(out)
        x = x + last.mlp(last.norm2(x))
        neck = encoder.neck(x.permute(0, 3, 1, 2))
        probabilities = probabilities.view(batch, heads, height, width, height * width)[:, :, :hs, :ws].flatten(2, 3)
    attention_valid = probabilities.view(batch, heads, hs * ws, height, width)[..., :hs, :ws].flatten(-2)  # B x heads x N x N
    values = v[:, :, :hs, :ws].flatten(2, 3)  # B x heads x N x d
    return attention_valid, values, neck


def sam_guided_weights(attention: torch.Tensor, values: torch.Tensor, cos_fac: float, refine_neg_cos: bool) -> torch.Tensor:
    """W of TRIDENT.md 4.4.2-4.4.5: B x heads x N x N attention, B x heads x N x d values -> B x N x N.

    Per head j, the attention of pairs whose value cosine C_j exceeds the query's threshold
    tau_i = cos_fac * mean over heads and keys of C (clamped as the authors'), averaged over heads,
    rows renormalised. Heads are accumulated one at a time (one N x N cosine in memory).

    Runs in the values' dtype (the SAM encoder's: the authors' ``get_sam_sim`` is fp16 under
    fp16): cosines, threshold, comparison and renormalisation in it; the two means over heads
    are accumulated in float32 and rounded once to it, as a reduction in fp16 is. Returns W in
    that dtype.
    """
    dtype = values.dtype
    unit = F.normalize(values, dim=-1)
    batch, heads, tokens, _ = unit.shape
    # Two passes over the heads, one N x N cosine in memory at a time: tau, then the filter.
    summed = torch.zeros(batch, tokens, tokens, device=unit.device)
    for head in range(heads):
        summed += unit[:, head] @ unit[:, head].transpose(-2, -1)
    tau = cos_fac * (summed / heads).to(dtype).mean(dim=-1, keepdim=True)  # B x N x 1: mean over heads, then keys
    if not refine_neg_cos:
        tau = torch.where(tau < 0.0, torch.full_like(tau, 0.6), tau)
    tau = tau.clamp(max=0.9)
    weights = summed.zero_()
    for head in range(heads):
        cosine = unit[:, head] @ unit[:, head].transpose(-2, -1)
        weights += torch.where(cosine > tau, attention[:, head].to(dtype), 0.0)
    weights = (weights / heads).to(dtype)
    return weights / weights.sum(dim=-1, keepdim=True)


class TridentClipEncoder(nn.Module):
    """Trident's CLIP image tower (open_clip class-token ViT, e.g. ViT-B-16-quickgelu)."""

    def __init__(self, visual: nn.Module):
        super().__init__()
        check_naclip_tower(visual)
        self.visual = visual
        patch = visual.conv1.kernel_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)

    @torch.no_grad()
    def window_values(
        self, pixels: torch.Tensor, dino: torch.Tensor, means: torch.Tensor, beta: float, gamma: float
    ) -> torch.Tensor:
        """Block 12 with DINO-guided attention (4.1-4.2): out_proj(A v), no residual, no MLP.

        pixels: B x 3 x S x S CLIP-normalised windows; dino: B x D' x g x g their DINO features
        (the same grid as CLIP's); means: (B,) the mean DINO similarity of each window's image.
        Returns B x W x g x g (W: the tower's width).
        """
        visual = self.visual
        dtype = visual.conv1.weight.dtype
        batch = pixels.shape[0]
        x = visual.conv1(pixels.to(dtype))
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([visual.class_embedding.to(x.dtype).expand(batch, 1, -1), x], dim=1)
        x = x + resize_position_embedding(visual.positional_embedding, grid_h, grid_w).to(x.dtype)
        x = visual.ln_pre(x)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        last = blocks[-1]
        attn: nn.MultiheadAttention = last.attn
        width = x.shape[-1]
        normed = last.ln_1(x[:, 1:])  # the class token is dropped before block 12
        v = F.linear(normed, attn.in_proj_weight[2 * width :], attn.in_proj_bias[2 * width :])  # B x n x W
        unit = F.normalize(dino.flatten(2).to(v.dtype), dim=1)  # B x D' x n
        similarity = unit.transpose(1, 2) @ unit  # B x n x n
        logits = (similarity - beta * means.to(v.dtype).view(-1, 1, 1)) * gamma
        logits = logits.masked_fill(logits < 0, float("-inf"))
        # One attention for all heads: concat_h(A v_h) = A v.
        out = attn.out_proj(logits.softmax(dim=-1) @ v)
        return out.transpose(1, 2).reshape(batch, width, grid_h, grid_w)

    @torch.no_grad()
    def aggregate(self, spliced: torch.Tensor, weights: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """4.4.1, 4.4.6, 4.5: B x W x Hc x Wc spliced values, B x N x N SAM weights -> B x N x E
        L2-normalised features on the SAM grid (hs, ws), row-major, in the spliced values' dtype
        (the tower's: fp16 under the authors' casts, ``ln_post`` computed in float32 by open_clip)."""
        visual = self.visual
        resized = F.interpolate(spliced, size=grid, mode="bilinear", align_corners=False)
        flat = resized.flatten(2).transpose(1, 2)  # B x N x W
        aggregated = weights.to(flat.dtype) @ flat
        features = visual.ln_post(aggregated) @ visual.proj
        return F.normalize(features, dim=-1)


def splice(values: torch.Tensor, boxes: Sequence[tuple[int, int, int, int]], grid: tuple[int, int], patch: int) -> torch.Tensor:
    """Windows' values averaged into place on the image grid (4.3).

    values: (B * K) x W x g x g, the K windows of each of B images (image-major, windows in
    ``boxes`` order); boxes: (y1, y2, x1, x2) in pixels. Returns B x W x Hc x Wc.
    """
    windows = len(boxes)
    batch = values.shape[0] // windows
    per_image = values.view(batch, windows, *values.shape[1:])
    total = values.new_zeros(batch, values.shape[1], *grid)
    count = values.new_zeros(1, 1, *grid)
    for k, (y1, y2, x1, x2) in enumerate(boxes):
        total[:, :, y1 // patch : y2 // patch, x1 // patch : x2 // patch] += per_image[:, k]
        count[:, :, y1 // patch : y2 // patch, x1 // patch : x2 // patch] += 1
    return total / count
