"""NACLIP's dense image encoder on an open_clip ViT (SPEC 8.3-8.5); pure model code, batch-first.

The CLIP image tower runs unchanged up to its last block, with position embeddings resized to
the input's patch grid by the DINO rule. The last block is *reduced*: only
``out_proj(attention(ln_1(x)))``, no residual and no MLP, where the attention compares keys with
keys and adds a Gaussian neighbourhood bias (sigma in patches) between patch tokens. Every token
then goes through ``ln_post`` and the projection; the class token is dropped.

Images of different sizes share one forward exactly: each image's tokens (class token, then its
own patch grid row-major, with its own resized position embeddings) are padded to the longest
sequence of the batch, and the padding is masked out of every attention as a key (a padded
token's own row is computed and thrown away). The neighbourhood bias is built per image from its
own grid.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clipdiy.segmentation.models.position_embedding import resize_position_embedding


@functools.lru_cache(maxsize=64)
def _gaussian_table(largest: int, sigma: float) -> torch.Tensor:
    """exp(-d / (2 sigma^2)) for every integer squared distance d in 0..largest, float64 -> float32."""
    squared = torch.arange(largest + 1, dtype=torch.float64)
    return torch.exp(-squared / (2.0 * sigma**2)).float()


def neighbourhood_bias_batch(
    grids: Sequence[tuple[int, int]], tokens: int, sigma: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Omega of each image, padded (SPEC 8.4): B x N x N float32, N = ``tokens`` >= 1 + max gh*gw.

    Image b's tokens: the class token, then its gh_b x gw_b patches row-major, then padding.
    Between two of its patches, exp(-d^2 / (2 sigma^2)) of their grid distance; zero in the class
    token's row and column; -inf in the padding's columns (a padded key is never attended to),
    zero in the padding's rows.
    """
    grid_h = torch.tensor([g[0] for g in grids], device=device).view(-1, 1)
    grid_w = torch.tensor([g[1] for g in grids], device=device).view(-1, 1)
    patch = torch.arange(tokens - 1, device=device).view(1, -1)  # B x P: patch p of each image
    valid = patch < grid_h * grid_w
    rows, cols = patch // grid_w, patch % grid_w
    squared = (rows[:, :, None] - rows[:, None, :]).square_() + (cols[:, :, None] - cols[:, None, :]).square_()
    largest = max(h * h + w * w for h, w in grids)
    table = _gaussian_table(largest, float(sigma)).to(device)
    bias = torch.zeros(len(grids), tokens, tokens, device=device)
    bias[:, 1:, 1:] = table[squared.clamp_(max=largest)]
    key_is_padding = torch.cat([valid.new_zeros(len(grids), 1), ~valid], dim=1)  # B x N
    return bias.masked_fill_(key_is_padding[:, None, :], float("-inf"))


def neighbourhood_bias(grid_h: int, grid_w: int, sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Omega (SPEC 8.4) of one grid: (1 + gh*gw) x (1 + gh*gw) float32, tokens class-first, patches row-major.

    exp(-d^2 / (2 sigma^2)) of the grid distance between two patches; zero in the class token's
    row and column.
    """
    return neighbourhood_bias_batch([(int(grid_h), int(grid_w))], 1 + grid_h * grid_w, sigma, device)[0]


class NaclipEncoder(nn.Module):
    """Dense, L2-normalised patch features of an open_clip ``VisionTransformer`` (NACLIP).

    ``visual``: the CLIP image tower (class-token ViT, batch-first transformer; ViT-B/16 for the
    authors' setting). ``sigma``: the neighbourhood bias's standard deviation in patches.
    """

    def __init__(self, visual: nn.Module, sigma: float = 5.0):
        super().__init__()
        check_naclip_tower(visual)
        self.visual = visual
        self.sigma = float(sigma)
        patch = visual.conv1.kernel_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """Patch grid of an input: floor(h / patch) x floor(w / patch) (SPEC 8.2, no padding)."""
        return height // self.patch_size, width // self.patch_size

    def tokens(self, height: int, width: int) -> int:
        """Sequence length of an input: its class token and its patches."""
        grid_h, grid_w = self.grid(height, width)
        return 1 + grid_h * grid_w

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Patch features, float32, L2-normalised.

        pixels: B x 3 x H x W normalised. ``sizes`` ``None``: every image fills the tensor; returns
        B x gh x gw x D. Else (h_b, w_b) of each image, which fills the top-left h_b x w_b of its
        slice (the rest is padding, any values); returns B x P x D, image b's gh_b*gw_b patch
        features first (row-major in its own grid), padding rows after them (any values).
        """
        visual = self.visual
        dtype = visual.conv1.weight.dtype
        batch, _, height, width = pixels.shape
        grids = [self.grid(height, width)] * batch if sizes is None else [self.grid(h, w) for h, w in sizes]
        if len(grids) != batch:
            raise ValueError(f"{len(grids)} sizes for {batch} images")
        if min(min(g) for g in grids) < 1:
            raise ValueError(f"an input is smaller than one {self.patch_size}-pixel patch: {list(sizes or [(height, width)])}")
        x = visual.conv1(pixels.to(dtype))  # B x W x GH x GW (trailing pixels dropped by the stride)
        full_w = x.shape[-1]
        x = x.flatten(2).transpose(1, 2)  # B x GH*GW x W
        uniform = all(g == grids[0] for g in grids) and grids[0] == self.grid(height, width)
        patches = max(h * w for h, w in grids)
        if not uniform:  # each image's own grid, row-major, first in its sequence
            grid_w = torch.tensor([g[1] for g in grids], device=x.device).view(-1, 1)
            patch = torch.arange(patches, device=x.device).view(1, -1)
            source = (patch // grid_w) * full_w + patch % grid_w
            counts = torch.tensor([h * w for h, w in grids], device=x.device).view(-1, 1)
            source = torch.where(patch < counts, source, 0)
            x = x.gather(1, source[:, :, None].expand(-1, -1, x.shape[-1]))
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1) + self._position_embeddings(grids, 1 + patches).to(x.dtype)
        x = visual.ln_pre(x)
        bias = neighbourhood_bias_batch(grids if not uniform else grids[:1], 1 + patches, self.sigma, x.device)
        key_mask = None if uniform else bias[:, :1, :].unsqueeze(1).to(x.dtype)  # B x 1 x 1 x N: 0, or -inf on padding
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = _block(block, x, key_mask)
        x = self._reduced_last_block(blocks[-1], x, bias.unsqueeze(1).to(x.dtype))
        features = visual.ln_post(x[:, 1:]) @ visual.proj  # per-token ops: the class token is not needed
        features = F.normalize(features.float(), dim=-1)
        if sizes is None:
            return features.view(batch, grids[0][0], grids[0][1], -1)
        return features

    def _position_embeddings(self, grids: Sequence[tuple[int, int]], tokens: int) -> torch.Tensor:
        """B x N position embeddings: each image's table resized to its grid (SPEC 8.3), padded."""
        table = self.visual.positional_embedding
        distinct = list(dict.fromkeys(grids))
        if len(distinct) == 1 and 1 + grids[0][0] * grids[0][1] == tokens:
            return resize_position_embedding(table, *distinct[0])[None]
        tables = [resize_position_embedding(table, h, w) for h, w in distinct]
        starts = torch.tensor([0] + [t.shape[0] for t in tables[:-1]], device=table.device).cumsum(0)
        lengths = torch.tensor([t.shape[0] for t in tables], device=table.device)
        which = torch.tensor([distinct.index(g) for g in grids], device=table.device).view(-1, 1)
        token = torch.arange(tokens, device=table.device).view(1, -1)
        index = starts[which] + torch.minimum(token, lengths[which] - 1)  # padding repeats a real row
        return torch.cat(tables)[index]

    def _reduced_last_block(self, block: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """out_proj(softmax(k k^T / sqrt(d) + Omega) v) of ln_1(x): B x N x W -> B x N x W (bias: B x 1 x N x N)."""
        attn: nn.MultiheadAttention = block.attn
        batch, tokens, width = x.shape
        heads = attn.num_heads
        _, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(batch, tokens, 3, heads, -1).unbind(2)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # B x H x N x d
        out = F.scaled_dot_product_attention(k, k, v, attn_mask=bias)  # scale 1 / sqrt(d)
        return attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, width))


def _block(block: nn.Module, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """open_clip's ResidualAttentionBlock, its attention with padded keys masked (key_mask: B x 1 x 1 x N)."""
    if key_mask is None:
        return block(x)
    attn: nn.MultiheadAttention = block.attn
    batch, tokens, width = x.shape
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).view(batch, tokens, 3, attn.num_heads, -1).unbind(2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
    x = x + block.ls_1(attn.out_proj(out.transpose(1, 2).reshape(batch, tokens, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


def check_naclip_tower(visual: nn.Module) -> None:
    """Raise ValueError unless ``visual`` is an open_clip class-token ViT NACLIP can run on."""
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    ok = (
        isinstance(visual, VisionTransformer)
        and visual.proj is not None
        and visual.attn_pool is None
        and bool(getattr(visual.transformer, "batch_first", False))
        and blocks is not None
        and len(blocks) > 1
        and all(type(b) is ResidualAttentionBlock and isinstance(b.attn, nn.MultiheadAttention) for b in blocks)
        and not any(hasattr(b, "ln_1_kv") for b in blocks)
        and visual.positional_embedding.ndim == 2
        and math.isqrt(visual.positional_embedding.shape[0] - 1) ** 2 == visual.positional_embedding.shape[0] - 1
    )
    if not ok:
        raise ValueError("NACLIP needs an open_clip class-token ViT image tower (e.g. ViT-B-16)")
