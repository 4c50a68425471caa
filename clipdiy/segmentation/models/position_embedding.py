"""Resizing a ViT's learned position embeddings to another patch grid: DINO's rule.

DINO's ``interpolate_pos_encoding``, which FOUND's backbone runs (SPEC 2) and NACLIP's authors
use for CLIP (SPEC 8.3): the trained n x n patch table is resized bicubically
(align_corners=False) by the scale factors ((rows + 0.1) / n, (cols + 0.1) / n); the class
token's entry is kept. One function for both, so the two methods cannot drift apart.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resize_position_embedding(table: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(1 + n*n) x D position embeddings, class token first -> (1 + rows*cols) x D.

    The trained grid (rows == cols == n) returns ``table`` itself. The resize runs in float32
    and the result has ``table``'s dtype. Raises ValueError when the table is not square.
    """
    count = table.shape[0] - 1
    side = math.isqrt(count)
    if side * side != count:
        raise ValueError(f"position embedding of {count} patches is not a square grid")
    if (rows, cols) == (side, side):
        return table
    dim = table.shape[-1]
    grid = table[1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    resized = F.interpolate(
        grid.float(), scale_factor=((rows + 0.1) / side, (cols + 0.1) / side), mode="bicubic", align_corners=False
    )
    if resized.shape[-2:] != (rows, cols):
        raise ValueError(f"position embedding resized to {tuple(resized.shape[-2:])}, expected {(rows, cols)}")
    patches = resized.permute(0, 2, 3, 1).reshape(rows * cols, dim).to(table.dtype)
    return torch.cat([table[:1], patches])
