"""Offline stand-ins for the real weights, shared by every test (this is not a test module).

No CLIP or DINO weights are reachable from the tests, so they build randomly initialised models of
the real architectures, save them as checkpoints and hand back the config that points at them: the
model then loads through exactly the code path a user's checkpoint takes.

A random CLIP is nearly degenerate (text embeddings ~0.94 cosine-similar, one or two classes win
every pixel), which would let a wrong method pass. ``make_clip_config`` therefore makes the random
model discriminative as SPEC section 6 suggests, deterministically from a seed:

- most of the DC (mean) component of the patch-embedding filters is removed, so image features
  follow texture and edges instead of overall brightness;
- the visual attention is sharpened (queries scaled up), so tokens stop averaging everything;
- the final layer-norm biases of both towers are centred on seeded inputs (smooth random images,
  random-word prompts), which removes the component every embedding shares.

With it, on the sample COCO photos, several VOC classes win pixels (see tests/test_clip_model.py).

Creation is cached on disk: pass a per-session directory (``tmp_path_factory.mktemp(...)``) and a
second call with the same directory and arguments returns at once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from clipdiy.segmentation.config import ClipConfig, SaliencyConfig

from data_paths import FOUND_HEAD, REPO_ROOT, SAMPLE_IMAGES  # noqa: F401  (the suite's own data)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: A tiny CLIP for fast pipeline tests (registered with open_clip under the file stem).
TINY_CLIP_NAME = "clipdiy-test-tiny"
TINY_CLIP_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

#: The real ViT-B/16 image tower with the tiny text tower (registered with open_clip under the file
#: stem; ``arch="vitb16-small-text"``): for checks of what happens after the image forward at the
#: real patch grid and feature width (large photos), where a ViT-B/16 text tower would only add its
#: text side (NACLIP's COCO-Object words x 80 templates: about 90 TFLOP, half an hour of 2 CPUs).
VITB16_SMALL_TEXT_NAME = "clipdiy-test-vitb16-small-text"
VITB16_SMALL_TEXT_CONFIG = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": TINY_CLIP_CONFIG["text_cfg"],
}
#: The tiny CLIP with 16-px patches (``arch="tiny16"``): its window grid matches DINO ViT-B/16's,
#: as Trident needs, for checks of Trident's plumbing that need no real-width tower.
TINY16_CLIP_NAME = "clipdiy-test-tiny-patch16"
TINY16_CLIP_CONFIG = {**TINY_CLIP_CONFIG, "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "patch_size": 16}}
#: ``arch`` aliases of the test-only architectures: (open_clip name, config).
CUSTOM_ARCHS = {
    "tiny": (TINY_CLIP_NAME, TINY_CLIP_CONFIG),
    "tiny16": (TINY16_CLIP_NAME, TINY16_CLIP_CONFIG),
    "vitb16-small-text": (VITB16_SMALL_TEXT_NAME, VITB16_SMALL_TEXT_CONFIG),
}

DINO_BACKBONE = "vit_small_patch8_224.dino"


def make_clip_config(tmp_path: str | os.PathLike, arch: str = "ViT-B-32", seed: int = 0) -> ClipConfig:
    """A ``ClipConfig`` for a random-init, discriminative CLIP saved as a checkpoint in ``tmp_path``.

    ``arch`` is an open_clip architecture name (``"ViT-B-32"``, the paper's), ``"tiny"`` (two
    64-wide layers per tower, for fast pipeline tests) or ``"vitb16-small-text"`` (ViT-B/16's image
    tower, the tiny text tower). Deterministic for a given ``seed``.
    """
    import open_clip

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    model_config = None
    if arch in CUSTOM_ARCHS:
        model_name, config = CUSTOM_ARCHS[arch]
        model_config = tmp_path / f"{model_name}.json"
        if not model_config.exists():
            _atomic_write_text(model_config, json.dumps(config, indent=2))
        open_clip.add_model_config(str(model_config))
    else:
        model_name = arch
    checkpoint = tmp_path / f"clip-{model_name}-random-seed{seed}.pt"
    if not checkpoint.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = open_clip.create_model(model_name, pretrained=None).eval()
        make_discriminative(model, open_clip.get_tokenizer(model_name), seed=seed)
        _atomic_save(model.state_dict(), checkpoint)
    return ClipConfig(
        model=model_name,
        pretrained=None,
        checkpoint=str(checkpoint),
        model_config=str(model_config) if model_config else None,
    )


def make_saliency_config(tmp_path: str | os.PathLike, seed: int = 0) -> SaliencyConfig:
    """A ``SaliencyConfig`` for FOUND: a random-init DINO ViT-S/8 checkpoint saved in ``tmp_path``
    plus the real FOUND head from ``tests/data/weights/found_decoder.pt``."""
    import timm

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    checkpoint = tmp_path / f"dino-vits8-random-seed{seed}.pt"
    if not checkpoint.exists():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            backbone = timm.create_model(DINO_BACKBONE, pretrained=False, num_classes=0)
        _atomic_save(backbone.state_dict(), checkpoint)
    if not FOUND_HEAD.is_file():
        raise FileNotFoundError(f"the real FOUND head is expected at {FOUND_HEAD}")
    return SaliencyConfig(
        backend="found",
        backbone=DINO_BACKBONE,
        backbone_checkpoint=str(checkpoint),
        head=str(FOUND_HEAD),
    )


@torch.no_grad()
def make_discriminative(
    model: torch.nn.Module,
    tokenizer,
    seed: int = 0,
    dc_keep: float = 0.1,
    query_scale: float = 4.0,
    n_images: int = 16,
    n_texts: int = 64,
) -> torch.nn.Module:
    """Turn a random open_clip ``CLIP`` into one whose embeddings differ between inputs (in place).

    ``dc_keep``: fraction of the patch filters' mean kept. ``query_scale``: factor on the visual
    attention's query projection. ``n_images`` / ``n_texts``: seeded inputs the final layer-norm
    biases are centred on.
    """
    gen = torch.Generator().manual_seed(seed)
    visual = model.visual

    filters = visual.conv1.weight  # width x 3 x patch x patch
    filters.sub_((1.0 - dc_keep) * filters.mean(dim=(1, 2, 3), keepdim=True))

    for block in visual.transformer.resblocks:
        width = block.attn.embed_dim
        block.attn.in_proj_weight[:width].mul_(query_scale)
        if block.attn.in_proj_bias is not None:
            block.attn.in_proj_bias[:width].mul_(query_scale)

    # Centre the pooled image token after ln_post (what visual.proj sees) on seeded images.
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    images = _seeded_images(n_images, size, gen)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pooled = _capture(visual.ln_post, lambda: model.encode_image((images - mean) / std))
    pooled = pooled[:, 0] if pooled.dim() == 3 else pooled
    visual.ln_post.bias.sub_(pooled.mean(0))

    # Centre the end-of-text token after ln_final (what text_projection sees) on seeded prompts.
    tokens = _seeded_prompt_tokens(tokenizer, n_texts, gen)
    final = _capture(model.ln_final, lambda: model.encode_text(tokens))
    eot = final[torch.arange(len(tokens)), tokens.argmax(dim=-1)]
    model.ln_final.bias.sub_(eot.mean(0))
    return model


def _capture(module: torch.nn.Module, run) -> torch.Tensor:
    caught: list[torch.Tensor] = []
    handle = module.register_forward_hook(lambda _m, _i, out: caught.append(out))
    try:
        run()
    finally:
        handle.remove()
    return caught[0]


def _seeded_images(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """n x 3 x size x size in [0, 1]: smooth multi-octave colour noise, photo-like spectra."""
    images = torch.zeros(n, 3, size, size)
    for cells, weight in ((2, 1.0), (4, 0.7), (8, 0.5), (16, 0.35), (32, 0.25), (64, 0.15)):
        noise = torch.randn(n, 3, cells, cells, generator=gen)
        images += weight * F.interpolate(noise, size=size, mode="bilinear", align_corners=False)
    images = images / images.flatten(1).std(dim=1).view(-1, 1, 1, 1) * 0.25
    images += torch.rand(n, 3, 1, 1, generator=gen) * 0.6 + 0.2
    return images.clamp(0, 1)


def _seeded_prompt_tokens(tokenizer, n: int, gen: torch.Generator) -> torch.Tensor:
    """n x context tokens: "a photo of a" followed by 1-3 random BPE tokens."""
    base = tokenizer(["a photo of a"])[0]
    eot_pos = int(base.argmax())
    eot = int(base[eot_pos])
    rows = []
    for _ in range(n):
        k = int(torch.randint(1, 4, (1,), generator=gen))
        row = base.clone()
        row[eot_pos : eot_pos + k] = torch.randint(400, 49000, (k,), generator=gen)
        row[eot_pos + k] = eot
        rows.append(row)
    return torch.stack(rows)


def _atomic_save(state_dict: dict, path: Path) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    torch.save(state_dict, partial)
    os.replace(partial, path)


def _atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def make_trident_config(tmp_path: str | os.PathLike, seed: int = 0, **settings):
    """A ``TridentConfig`` for random-init DINO ViT-B/16 (timm ``vit_base_patch16_224.dino``) and
    SAM ViT-B (segment-anything) checkpoints saved in ``tmp_path``; ``settings`` go to the config.

    SAM initialises its absolute and relative position tables to zero; they are randomised here so
    that the tests exercise those paths (TRIDENT.md 10.7).
    """
    import timm
    from segment_anything import sam_model_registry

    from clipdiy.segmentation.config import TridentConfig

    tmp_path = Path(tmp_path)
    tmp_path.mkdir(parents=True, exist_ok=True)
    dino = tmp_path / f"dino-vitb16-random-seed{seed}.pt"
    sam = tmp_path / f"sam-vitb-random-seed{seed}.pth"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not dino.exists():
            _atomic_save(timm.create_model("vit_base_patch16_224.dino", pretrained=False, num_classes=0).state_dict(), dino)
        if not sam.exists():
            model = sam_model_registry["vit_b"](checkpoint=None)
            encoder = model.image_encoder
            with torch.no_grad():
                encoder.pos_embed.normal_(0.0, 0.02)
                for block in encoder.blocks:
                    block.attn.rel_pos_h.normal_(0.0, 0.02)
                    block.attn.rel_pos_w.normal_(0.0, 0.02)
            _atomic_save(model.state_dict(), sam)
    return TridentConfig(dino_checkpoint=str(dino), sam_checkpoint=str(sam), **settings)


def stretch_sam_iou_head(sam) -> None:
    """Random SAM decoders predict IoUs in a narrow band, all under the 0.8 cut-off: stretch the
    IoU head's last layer and centre it on the cut-off (probed on random embeddings and prompts)
    so that the refinement keeps some masks and drops others."""
    from clipdiy.segmentation.models.sam_decoder import decode_masks, mask_prompt_embeddings

    generator = torch.Generator().manual_seed(5)
    last = sam.mask_decoder.iou_prediction_head.layers[-1]
    with torch.no_grad():
        last.weight.mul_(8.0)
        points = torch.rand(6, 2, generator=generator) * 900
        boxes = torch.cat([points - 60, points + 60], dim=1).clamp(0, 1023)
        dense = mask_prompt_embeddings(sam.prompt_encoder, torch.rand(1, 256, 256, generator=generator) * 0.005)
        index = torch.zeros(6, dtype=torch.long)
        _, ious = decode_masks(sam, torch.randn(1, 256, 64, 64, generator=generator), index, points, boxes, dense, index)
        last.bias.add_(0.8 - float(ious.median()))


def make_small_sam(seed: int = 0, width: int = 32, depth: int = 1):
    """A small SAM of segment-anything's real module classes, deterministic for ``seed``: a
    ``depth``-block 16-wide image encoder (the last block global, the others windowed; relative
    positions) at SAM's 1024-px input, a
    ``width``-wide prompt encoder and two-way decoder, its IoU head's last layer scaled by 8 (random
    decoders predict IoUs in a narrow band)."""
    from functools import partial

    from segment_anything.modeling import (
        ImageEncoderViT,
        MaskDecoder,
        PromptEncoder,
        Sam,
        TwoWayTransformer,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ImageEncoderViT(depth=depth, embed_dim=16, img_size=1024, mlp_ratio=1, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                                  num_heads=1, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(depth - 1,),
                                  window_size=14, out_chans=width)
        sam = Sam(
            image_encoder=encoder,
            prompt_encoder=PromptEncoder(embed_dim=width, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16),
            mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(depth=2, embedding_dim=width, mlp_dim=64, num_heads=2),
                                     transformer_dim=width, iou_head_depth=3, iou_head_hidden_dim=width),
            pixel_mean=[123.675, 116.28, 103.53],
            pixel_std=[58.395, 57.12, 57.375],
        ).eval()
        with torch.no_grad():
            # SAM zero-initialises nothing here that matters; the prompt encoder's random Fourier
            # matrix and the decoder are random. Stretch the IoU head around the cut-off.
            sam.mask_decoder.iou_prediction_head.layers[-1].weight.mul_(8.0)
    return sam
