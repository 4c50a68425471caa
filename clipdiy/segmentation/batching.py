"""How the library batches work on its device: one host-to-device transfer per batch, images
grouped by equal shape or key, and the crops per CLIP forward."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np
import torch


def to_device(arrays: Sequence[np.ndarray], device: torch.device) -> torch.Tensor:
    """B arrays of h x w x 3 uint8 -> B x 3 x h x w uint8 on ``device``, one transfer."""
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch.to(device, non_blocking=True).contiguous()


def group_by_key(keys: Sequence) -> list[list[int]]:
    """Indices grouped by equal key, in first-seen order."""
    groups: dict = defaultdict(list)
    for index, key in enumerate(keys):
        groups[key].append(index)
    return list(groups.values())


def group_by_shape(shapes: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Indices grouped by equal shape, in first-seen order."""
    return group_by_key([tuple(shape) for shape in shapes])


def default_crop_batch_size(device: torch.device) -> int:
    """Crops per CLIP forward when the config leaves it open.

    On a GPU large forwards are where the speed is; on a CPU, ViT-B/32 runs fastest at 8-32 crops
    (measured: ~12 crops/s at 8-32 against 10 at 236 on 2 cores), larger ones only cost memory.
    """
    return 256 if device.type == "cuda" else 32
