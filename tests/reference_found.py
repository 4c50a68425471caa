"""A plain transcription of FOUND's saliency as CLIP-DIY runs it (SPEC 2). Not a test module.

Written the way FOUND's and DINO's own code do it, sharing no code with
``clipdiy.segmentation.models.saliency.found``: the backbone is loaded straight from its checkpoint with timm,
the head straight from ``found_decoder.pt``; DINO's ``prepare_tokens`` and
``interpolate_pos_encoding`` are transcribed; the whole last block runs with a hook on its qkv
projection (as FOUND's ``get_last_selfattention`` hook does), the keys are cut out of the hooked
output by hand; the 1x1 head is a dot product; then x8 bilinear upsampling, crop and sigmoid.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
PATCH = 8
HEADS = 6


class ReferenceFound:
    """``__call__``: B x 3 x H x W float RGB in [0, 1] -> B x 1 x H x W soft foreground map."""

    def __init__(self, backbone_name: str, backbone_checkpoint: str, head_checkpoint: str):
        import timm

        self.backbone = timm.create_model(backbone_name, pretrained=False, num_classes=0).eval()
        self.backbone.load_state_dict(torch.load(backbone_checkpoint, map_location="cpu", weights_only=True))
        decoder = torch.load(head_checkpoint, map_location="cpu", weights_only=True)["decoder"]
        self.head_weight = decoder["weight"].float().reshape(-1)  # 384 (from 1 x 384 x 1 x 1)
        self.head_bias = decoder["bias"].float().reshape(())

    def interpolate_pos_encoding(self, rows: int, cols: int) -> torch.Tensor:
        """DINO's ``interpolate_pos_encoding`` for a rows x cols patch grid -> 1 x (1 + rows*cols) x D."""
        pos_embed = self.backbone.pos_embed
        n = pos_embed.shape[1] - 1
        if rows * cols == n and rows == cols:
            return pos_embed
        class_pos_embed = pos_embed[:, 0]
        patch_pos_embed = pos_embed[:, 1:]
        dim = pos_embed.shape[-1]
        w0, h0 = rows + 0.1, cols + 0.1  # DINO's "+ 0.1" avoids floating point error in the interpolation
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos_embed.shape[-2] and int(h0) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        x = (images.float() - IMAGENET_MEAN) / IMAGENET_STD
        # FOUND's make_input_divisible: zero padding right and bottom, after normalisation.
        pad_h = (PATCH - height % PATCH) % PATCH
        pad_w = (PATCH - width % PATCH) % PATCH
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0)
        rows, cols = x.shape[-2] // PATCH, x.shape[-1] // PATCH

        # DINO's prepare_tokens.
        tokens = self.backbone.patch_embed.proj(x).flatten(2).transpose(1, 2)  # B x N x D
        tokens = torch.cat((self.backbone.cls_token.expand(batch, -1, -1), tokens), dim=1)
        tokens = tokens + self.interpolate_pos_encoding(rows, cols)

        captured: list[torch.Tensor] = []
        hook = self.backbone.blocks[-1].attn.qkv.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            for block in self.backbone.blocks:
                tokens = block(tokens)
        finally:
            hook.remove()
        qkv = captured[0]  # B x (1 + N) x 3D
        n_tokens = qkv.shape[1]
        qkv = qkv.reshape(batch, n_tokens, 3, HEADS, -1).permute(2, 0, 3, 1, 4)  # 3 x B x heads x T x d
        keys = qkv[1].transpose(1, 2).reshape(batch, n_tokens, -1)  # heads concatenated
        keys = keys[:, 1:]  # CLS dropped: B x N x 384

        logits = keys @ self.head_weight + self.head_bias  # the 1x1 convolution: B x N
        logits = logits.reshape(batch, 1, rows, cols)
        logits = F.interpolate(logits, scale_factor=PATCH, mode="bilinear")
        return torch.sigmoid(logits[:, :, :height, :width])
