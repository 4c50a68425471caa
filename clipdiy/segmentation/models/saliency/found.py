"""FOUND saliency (Siméoni et al., CVPR 2023) exactly as CLIP-DIY runs it (SPEC section 2).

DINO ViT-S/8 (timm ``vit_small_patch8_224.dino``, frozen) on the full-resolution image, ImageNet
normalisation, zero-padded right and bottom to a multiple of 8; features are the **keys** of the
last block's attention (its qkv projection, 6 heads concatenated to 384 channels, CLS dropped)
laid out as (H/8) x (W/8); a 1x1 convolution 384 -> 1 gives logits, upsampled x8 (bilinear),
cropped back to H x W, sigmoid.

Any image size: the position embedding is resized the way DINO's own ``interpolate_pos_encoding``
does (bicubic with DINO's ``+0.1`` scale factor), as the reference code runs it. Only the last
block's key projection is evaluated; the rest of the last block is not needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from clipdiy.segmentation.config import SaliencyConfig
from clipdiy.segmentation.models.position_embedding import resize_position_embedding
from clipdiy.segmentation.models.saliency import register_saliency_backend
from clipdiy.segmentation.models.saliency.base import SaliencyModel, check_images
from clipdiy.segmentation.weights import (
    DINO_WEIGHTS,
    FOUND_HEAD_WEIGHTS,
    load_state_dict,
    resolve_file,
    resolve_hub_file,
    weights_id,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class FoundSaliency(SaliencyModel):
    """DINO ViT backbone (timm ``VisionTransformer``) + FOUND's 1x1-conv head.

    ``head``: ``nn.Conv2d(embed_dim, 1, 1)``. ``weights_id``: ``"<backbone id>+<head id>"``.
    """

    name = "found"

    def __init__(self, backbone: nn.Module, head: nn.Conv2d, weights_id: str | None = None):
        super().__init__()
        if getattr(backbone, "num_prefix_tokens", 1) != 1 or backbone.cls_token is None:
            raise ValueError("FOUND needs a ViT with exactly one prefix (CLS) token")
        self.backbone = backbone
        self.head = head
        self.weights_id = weights_id
        self.patch_size = int(backbone.patch_embed.proj.kernel_size[0])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.patch_embed.proj.weight.dtype

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W float RGB in [0, 1] -> B x 1 x H x W float32 soft foreground map in [0, 1]."""
        check_images(images)
        height, width = images.shape[-2:]
        logits = self.head(self.last_keys(images).float())  # B x 1 x H/8 x W/8 (padded size)
        logits = F.interpolate(logits, scale_factor=self.patch_size, mode="bilinear", align_corners=False)
        return torch.sigmoid(logits[..., :height, :width])

    @torch.no_grad()
    def last_keys(self, images: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W in [0, 1] -> B x D x ceil(H/8) x ceil(W/8): keys of the last block, CLS dropped."""
        pixels = (images.to(self.mean.device, torch.float32) - self.mean) / self.std
        pixels = pad_to_multiple(pixels, self.patch_size).to(self.dtype)
        rows, cols = pixels.shape[-2] // self.patch_size, pixels.shape[-1] // self.patch_size
        tokens = self._tokens(pixels)  # B x (1 + rows*cols) x D
        for block in self.backbone.blocks[:-1]:
            tokens = block(tokens)
        qkv = self.backbone.blocks[-1].attn.qkv
        dim = qkv.out_features // 3  # qkv's rows are [queries | keys | values], heads contiguous
        key_bias = qkv.bias[dim : 2 * dim] if qkv.bias is not None else None
        # Only the keys' third of the projection, and only for the patch tokens.
        patch_tokens = self.backbone.blocks[-1].norm1(tokens[:, 1:])
        keys = F.linear(patch_tokens, qkv.weight[dim : 2 * dim], key_bias)  # B x rows*cols x D
        return keys.transpose(1, 2).reshape(keys.shape[0], dim, rows, cols)

    def _tokens(self, pixels: torch.Tensor) -> torch.Tensor:
        """Patch tokens with CLS, position embedding resized to the grid (DINO's prepare_tokens)."""
        backbone = self.backbone
        patches = backbone.patch_embed.proj(pixels)  # B x D x rows x cols
        rows, cols = patches.shape[-2:]
        patches = backbone.patch_embed.norm(patches.flatten(2).transpose(1, 2))
        cls = backbone.cls_token.expand(patches.shape[0], -1, -1)
        tokens = torch.cat([cls, patches], dim=1) + resize_position_embedding(backbone.pos_embed[0], rows, cols)[None]
        return backbone.norm_pre(backbone.pos_drop(tokens))


def pad_to_multiple(pixels: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad B x C x H x W on the right and bottom to multiples of ``multiple``."""
    pad_h = -pixels.shape[-2] % multiple
    pad_w = -pixels.shape[-1] % multiple
    if pad_h == 0 and pad_w == 0:
        return pixels
    return F.pad(pixels, (0, pad_w, 0, pad_h), value=0.0)


def load_found_head(source: str, embed_dim: int, cache_dir: str | None = None) -> tuple[nn.Conv2d, str]:
    """FOUND's 1x1-conv head and its provenance id from ``found_decoder.pt`` (path, URI or URL).

    The file holds ``{"decoder": {"weight": 1 x D x 1 x 1, "bias": 1}}`` (saved on CUDA; mapped to
    the CPU here); a bare ``{"weight", "bias"}`` dict is accepted too.
    """
    path = resolve_file(source, FOUND_HEAD_WEIGHTS, cache_dir)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise FOUND_HEAD_WEIGHTS.missing(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {error})"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("decoder"), dict):
        state = state["decoder"]
    head = nn.Conv2d(embed_dim, 1, kernel_size=1)
    try:
        head.load_state_dict({"weight": state["weight"], "bias": state["bias"]})
    except (KeyError, TypeError, RuntimeError) as error:
        raise ValueError(
            f"FOUND head {path} must hold {{'decoder': {{'weight': 1x{embed_dim}x1x1, 'bias': 1}}}}: {error}"
        ) from error
    return head, weights_id(path)


def load_dino_backbone(config: SaliencyConfig) -> tuple[nn.Module, str]:
    """The timm DINO ViT ``config.backbone`` with weights, and its provenance id.

    From ``config.backbone_checkpoint`` (path or URI; timm or original DINO key names), else from
    the hub (local Hugging Face cache first).
    """
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    backbone = timm.create_model(config.backbone, pretrained=False, num_classes=0)
    if config.backbone_checkpoint:
        path = resolve_file(config.backbone_checkpoint, DINO_WEIGHTS)
        provenance = weights_id(path)
    else:
        hub_id = backbone.pretrained_cfg.get("hf_hub_id")
        if not hub_id:
            raise DINO_WEIGHTS.missing(f"timm has no hub location for {config.backbone}")
        path = resolve_hub_file(
            hub_id, ("model.safetensors", "pytorch_model.bin"), DINO_WEIGHTS, f"{config.backbone} (timm)"
        )
        provenance = config.backbone
    state = checkpoint_filter_fn(load_state_dict(path, DINO_WEIGHTS), backbone)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"DINO checkpoint {path} does not fit {config.backbone}: {error}") from error
    return backbone, provenance


@register_saliency_backend("found")
def create_found(config: SaliencyConfig, device: torch.device, dtype: torch.dtype | None) -> FoundSaliency:
    # The head first: it is small and the likelier one to be missing offline.
    head, head_id = load_found_head(config.head, embed_dim=_embed_dim_of(config.backbone))
    backbone, backbone_id = load_dino_backbone(config)
    model = FoundSaliency(backbone, head, weights_id=f"{backbone_id}+{head_id}")
    model.to(device)
    if dtype is not None:
        model.backbone.to(dtype)
    return model


def _embed_dim_of(backbone_name: str) -> int:
    import timm

    with torch.device("meta"):
        return int(timm.create_model(backbone_name, pretrained=False, num_classes=0).embed_dim)
