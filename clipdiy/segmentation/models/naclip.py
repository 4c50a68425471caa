"""NACLIP's dense image encoder on an open_clip ViT (SPEC 8.3-8.5); pure model code, batch-first.

The CLIP image tower runs unchanged up to its last block, with position embeddings resized to
the input's patch grid by the DINO rule. The last block is *reduced*: only
``out_proj(attention(ln_1(x)))``, no residual and no MLP, where the attention compares keys with
keys and adds a Gaussian neighbourhood bias (sigma in patches) between patch tokens. Every token
then goes through ``ln_post`` and the projection; the class token is dropped.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from clipdiy.segmentation.models.position_embedding import resize_position_embedding


@functools.lru_cache(maxsize=64)
def _neighbourhood_bias_cpu(grid_h: int, grid_w: int, sigma: float) -> torch.Tensor:
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    squared = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    bias = torch.zeros(grid_h * grid_w + 1, grid_h * grid_w + 1, dtype=torch.float64)
    bias[1:, 1:] = torch.exp(-squared / (2.0 * sigma**2))
    return bias.float()


def neighbourhood_bias(grid_h: int, grid_w: int, sigma: float, device: torch.device | str = "cpu") -> torch.Tensor:
    """Omega (SPEC 8.4): (1 + gh*gw) x (1 + gh*gw) float32, tokens class-first, patches row-major.

    exp(-d^2 / (2 sigma^2)) of the grid distance between two patches; zero in the class token's
    row and column. Cached per grid on the CPU.
    """
    return _neighbourhood_bias_cpu(int(grid_h), int(grid_w), float(sigma)).to(device)


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

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x h x w normalised pixels -> B x gh x gw x D float32 patch features, L2-normalised."""
        visual = self.visual
        dtype = visual.conv1.weight.dtype
        batch, _, height, width = pixels.shape
        grid_h, grid_w = self.grid(height, width)
        if grid_h < 1 or grid_w < 1:
            raise ValueError(f"a {height} x {width} input is smaller than one {self.patch_size}-pixel patch")
        x = visual.conv1(pixels.to(dtype))  # B x W x gh x gw (trailing pixels dropped by the stride)
        x = x.reshape(batch, x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1)
        x = x + resize_position_embedding(visual.positional_embedding, grid_h, grid_w).to(x.dtype)
        x = visual.ln_pre(x)
        blocks = visual.transformer.resblocks
        for block in blocks[:-1]:
            x = block(x)
        x = self._reduced_last_block(blocks[-1], x, grid_h, grid_w)
        features = visual.ln_post(x[:, 1:]) @ visual.proj  # per-token ops: the class token is not needed
        features = F.normalize(features.float(), dim=-1)
        return features.view(batch, grid_h, grid_w, -1)

    def _reduced_last_block(self, block: nn.Module, x: torch.Tensor, grid_h: int, grid_w: int) -> torch.Tensor:
        """out_proj(softmax(k k^T / sqrt(d) + Omega) v) of ln_1(x): B x N x W -> B x N x W."""
        attn: nn.MultiheadAttention = block.attn
        batch, tokens, width = x.shape
        heads = attn.num_heads
        head_dim = width // heads
        _, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        k = k.reshape(batch, tokens, heads, head_dim).transpose(1, 2)  # B x H x N x d
        v = v.reshape(batch, tokens, heads, head_dim).transpose(1, 2)
        bias = neighbourhood_bias(grid_h, grid_w, self.sigma, x.device).to(k.dtype)
        weights = torch.matmul(k, k.transpose(-1, -2)).mul_(head_dim**-0.5).add_(bias).softmax(dim=-1)
        out = torch.matmul(weights, v).transpose(1, 2).reshape(batch, tokens, width)
        return attn.out_proj(out)


def check_naclip_tower(visual: nn.Module) -> None:
    """Raise ValueError unless ``visual`` is an open_clip class-token ViT NACLIP can run on."""
    from open_clip.transformer import VisionTransformer

    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    ok = (
        isinstance(visual, VisionTransformer)
        and visual.proj is not None
        and visual.attn_pool is None
        and bool(getattr(visual.transformer, "batch_first", False))
        and blocks is not None
        and len(blocks) > 1
        and isinstance(blocks[-1].attn, nn.MultiheadAttention)
        and visual.positional_embedding.ndim == 2
        and math.isqrt(visual.positional_embedding.shape[0] - 1) ** 2 == visual.positional_embedding.shape[0] - 1
    )
    if not ok:
        raise ValueError("NACLIP needs an open_clip class-token ViT image tower (e.g. ViT-B-16)")
