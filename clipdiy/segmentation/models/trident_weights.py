"""Loading Trident's DINO ViT-B/16 and SAM ViT-B image encoder (CLIP loads as for every method).

Weights come from :class:`~clipdiy.segmentation.config.TridentConfig` through
:mod:`clipdiy.segmentation.weights`: a missing file fails within seconds naming the option that
supplies it; checkpoints are read with ``weights_only=True``; nothing falls back to random weights.
"""

from __future__ import annotations

import torch
from torch import nn

from clipdiy.segmentation.config import TridentConfig
from clipdiy.segmentation.weights import (
    TRIDENT_DINO_WEIGHTS,
    TRIDENT_SAM_WEIGHTS,
    load_state_dict,
    resolve_file,
    resolve_hub_file,
    weights_id,
)


def load_trident_dino(config: TridentConfig) -> tuple[nn.Module, str]:
    """timm's ``config.dino`` (``vit_base_patch16_224.dino``) with weights, and its provenance id.

    From ``config.dino_checkpoint`` (path or URI; timm or original DINO key names), else from the
    hub (local Hugging Face cache first).
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    if config.dino_checkpoint:  # resolved first: a missing file fails before any model is built
        path = resolve_file(config.dino_checkpoint, TRIDENT_DINO_WEIGHTS)
        provenance = weights_id(path)
        model = timm.create_model(config.dino, pretrained=False, num_classes=0)
    else:
        model = timm.create_model(config.dino, pretrained=False, num_classes=0)
        hub_id = model.pretrained_cfg.get("hf_hub_id")
        if not hub_id:
            raise TRIDENT_DINO_WEIGHTS.missing(f"timm has no hub location for {config.dino}")
        path = resolve_hub_file(hub_id, ("model.safetensors", "pytorch_model.bin"), TRIDENT_DINO_WEIGHTS, f"{config.dino} (timm)")
        provenance = config.dino
    state = checkpoint_filter_fn(load_state_dict(path, TRIDENT_DINO_WEIGHTS), model)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"DINO checkpoint {path} does not fit {config.dino}: {error}") from error
    return model.eval().requires_grad_(False), provenance


def load_sam(config: TridentConfig) -> tuple[nn.Module, str]:
    """segment-anything's SAM ViT-B with the weights of ``config.sam_checkpoint``, and its id."""
    try:
        from segment_anything import sam_model_registry
    except ImportError as error:  # an optional dependency: say how to get it
        raise ImportError("Trident needs the segment-anything package: pip install segment-anything") from error

    path = resolve_file(config.sam_checkpoint, TRIDENT_SAM_WEIGHTS)
    state = load_state_dict(path, TRIDENT_SAM_WEIGHTS)
    sam = sam_model_registry["vit_b"](checkpoint=None)
    try:
        sam.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"SAM checkpoint {path} does not fit SAM ViT-B: {error}") from error
    return sam.eval().requires_grad_(False), weights_id(path)


def place_trident_models(dino: nn.Module, sam: nn.Module, device, dtype: torch.dtype, refine: bool) -> None:
    """Move DINO and SAM to ``device`` in the precision the authors run them (TRIDENT.md 1.2-1.4).

    float32: everything float32. float16 (the authors' ``.half()`` calls): DINO whole, LayerNorms
    and position table included, and SAM's image encoder in fp16; SAM's prompt encoder and mask
    decoder (used only when ``refine``) rounded to fp16 and back, so that they run in float32
    with fp16-rounded weights and Fourier matrix (``.half()`` then ``.float()``, 1.3.5).
    """
    if dtype not in (torch.float32, torch.float16):
        raise ValueError(f"Trident runs in float32 or float16 (the authors' casts), not {dtype}")
    dino.to(device=device, dtype=dtype)
    sam.image_encoder.to(device=device, dtype=dtype)
    if refine:
        for part in (sam.prompt_encoder, sam.mask_decoder):
            part.to(device=device, dtype=dtype).float()
