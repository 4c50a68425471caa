"""CLIP through open_clip: build the architecture, load the weights a :class:`ClipConfig` names.

Weights come from ``ClipConfig.checkpoint`` (local path or fsspec URI; a plain state dict or
``{"state_dict": ...}``, read with ``torch.load(weights_only=True)`` or safetensors) or, failing
that, the open_clip pretrained tag (``ViT-B-32`` / ``laion2b_s34b_b79k`` by default, as the paper),
looked up in the local Hugging Face cache and then on the hub (:mod:`clipdiy.segmentation.weights`). Missing
weights raise :class:`~clipdiy.errors.WeightsNotFoundError`; a random model is never returned.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from clipdiy.segmentation.config import ClipConfig
from clipdiy.segmentation.weights import (
    CLIP_WEIGHTS,
    WeightsOption,
    load_state_dict,
    resolve_file,
    resolve_hub_file,
    weights_id,
)

CLIP_MODEL_CONFIG = WeightsOption("CLIP model config", "ClipConfig.model_config", "--clip-model-config")

#: Prompts per text forward: bounds memory for large prompt ensembles (classes x templates).
TEXT_BATCH_SIZE = 256


class ClipModel(nn.Module):
    """A frozen open_clip model with L2-normalised float32 embeddings.

    ``model_name``: the open_clip architecture. ``weights_id``: the pretrained tag, or
    ``sha256:<hex16>`` of the checkpoint file. ``image_size``: the square input side (224 for
    ViT-B/32). ``mean`` / ``std``: the image normalisation the weights were trained with.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        model_name: str,
        weights_id: str,
        mean: Sequence[float],
        std: Sequence[float],
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.weights_id = weights_id
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.class_token_forward = supports_class_token_forward(self.model.visual)

    @property
    def device(self) -> torch.device:
        return self.model.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.visual.conv1.weight.dtype

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """B x 3 x S x S normalised pixels (S = ``image_size``) -> B x D float32, L2-normalised.

        The same embedding as open_clip's ``encode_image``; for class-token ViTs the last block
        runs for the class token only (:func:`class_token_image_features`).
        """
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        if self.class_token_forward:
            features = class_token_image_features(self.model.visual, pixels)
        else:
            features = self.model.encode_image(pixels)
        return F.normalize(features.float(), dim=-1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """N texts -> N x D float32, L2-normalised (forwards of at most ``TEXT_BATCH_SIZE`` prompts)."""
        texts = list(texts)
        if not texts:
            raise ValueError("encode_text needs at least one text")
        chunks = []
        for start in range(0, len(texts), TEXT_BATCH_SIZE):
            tokens = self.tokenizer(texts[start : start + TEXT_BATCH_SIZE]).to(self.device)
            chunks.append(self.model.encode_text(tokens).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_image(pixels)


def supports_class_token_forward(visual: nn.Module) -> bool:
    """Whether :func:`class_token_image_features` equals ``visual(pixels)`` for this image tower.

    True for open_clip's plain ViTs that pool the class token (ViT-B/32 and kin); False for
    attention pooling, average pooling, token outputs, key/value norms, or any other tower.
    """
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    if type(visual) is not VisionTransformer or not callable(getattr(visual, "_embeds", None)):
        return False  # other towers, or an open_clip whose ViT has no separate embedding step
    blocks = getattr(visual.transformer, "resblocks", None)
    return (
        visual.pool_type == "tok"
        and visual.attn_pool is None
        and not visual.output_tokens
        and isinstance(visual.patch_dropout, nn.Identity)
        and bool(getattr(visual.transformer, "batch_first", False))
        and blocks is not None
        and len(blocks) > 0
        and type(blocks[-1]) is ResidualAttentionBlock
        and not hasattr(blocks[-1], "ln_1_kv")
        and isinstance(blocks[-1].attn, nn.MultiheadAttention)
    )


def class_token_image_features(visual: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip ``VisionTransformer.forward`` with the last block computed for the class token only.

    pixels: B x 3 x S x S -> B x D projected (not normalised) image features. Only the class
    token's output is pooled, and every op after the last attention is per token, so the last
    block's query projection, attention output, out-projection and MLP are needed for one token
    instead of 1 + (S/patch)^2: about 7% of ViT-B/32's forward. Keys and values still come from
    every token. Needs :func:`supports_class_token_forward`.
    """
    tokens = visual._embeds(pixels)  # B x N x W, class token first
    blocks = visual.transformer.resblocks
    for block in blocks[:-1]:
        tokens = block(tokens)
    last = blocks[-1]
    normed = last.ln_1(tokens)
    attended = last.attn(normed[:, :1], normed, normed, need_weights=False)[0]  # B x 1 x W
    cls = tokens[:, :1] + last.ls_1(attended)
    cls = cls + last.ls_2(last.mlp(last.ln_2(cls)))
    pooled = visual.ln_post(cls[:, 0])  # per-token norm: the same before or after pooling
    return pooled @ visual.proj if visual.proj is not None else pooled


def create_clip_model(
    config: ClipConfig,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> ClipModel:
    """Build the CLIP a config names, weights loaded, on ``device`` (default CPU).

    ``dtype`` float16/bfloat16 runs the model in that precision the way open_clip does (layer
    norms stay float32); ``None`` or float32 keeps float32.
    """
    import open_clip

    device = torch.device(device or "cpu")
    if config.model_config:
        register_model_config(config.model_config, config.model, config.cache_dir)
    if open_clip.get_model_config(config.model) is None:
        raise ValueError(
            f"unknown CLIP architecture {config.model!r}: pass an open_clip model name "
            "(e.g. ViT-B-32) or an open_clip model-config JSON with ClipConfig.model_config"
        )

    tag_cfg: dict = {}
    if config.checkpoint:
        path = resolve_file(config.checkpoint, CLIP_WEIGHTS, config.cache_dir)
        provenance = weights_id(path)
    elif config.pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(config.model, config.pretrained)
        if not tag_cfg:
            known = open_clip.list_pretrained_tags_by_model(config.model)
            raise ValueError(
                f"unknown pretrained tag {config.pretrained!r} for {config.model} (open_clip knows {known}); "
                "or pass a checkpoint with ClipConfig.checkpoint (--clip-checkpoint)"
            )
        path = _resolve_pretrained(config, tag_cfg)
        provenance = config.pretrained
    else:
        raise CLIP_WEIGHTS.missing(f"no checkpoint and no pretrained tag configured for {config.model}")

    precision = {None: "fp32", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype)
    if precision is None:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    preprocess = {k: tag_cfg[k] for k in ("mean", "std") if k in tag_cfg}
    root_logger = logging.getLogger()
    root_logger.addFilter(_drop_random_init_warning)  # we load the weights right after
    try:
        model = open_clip.create_model(
            config.model,
            pretrained=None,
            precision=precision,
            device=device,
            force_quick_gelu=bool(tag_cfg.get("quick_gelu", False)),
            force_preprocess_cfg=preprocess or None,
        )
    finally:
        root_logger.removeFilter(_drop_random_init_warning)
    _load_weights(model, load_state_dict(path, CLIP_WEIGHTS), path, config.model)
    preprocess_cfg = model.visual.preprocess_cfg
    return ClipModel(
        model,
        open_clip.get_tokenizer(config.model),
        model_name=config.model,
        weights_id=provenance,
        mean=preprocess_cfg["mean"],
        std=preprocess_cfg["std"],
    )


def _drop_random_init_warning(record: logging.LogRecord) -> bool:
    return "No pretrained weights loaded" not in record.getMessage()


def register_model_config(source: str, model_name: str, cache_dir: str | None = None) -> None:
    """Register an open_clip model-config JSON (path or URI) under ``model_name``.

    open_clip names a registered config after its file stem, which must be ``model_name``.
    """
    import open_clip

    path = resolve_file(source, CLIP_MODEL_CONFIG, cache_dir)
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"CLIP model config {source} is not valid JSON: {error}") from error
    if not isinstance(config, dict) or not all(k in config for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise ValueError(f"CLIP model config {source} needs embed_dim, vision_cfg and text_cfg")
    stem = os.path.splitext(source.rstrip("/").rsplit("/", 1)[-1])[0]
    if stem != model_name:
        raise ValueError(
            f"CLIP model config {source} registers architecture {stem!r}, but ClipConfig.model is "
            f"{model_name!r}; set the model name to the file's stem"
        )
    if Path(path).stem != stem:  # a cached copy of a URI: give open_clip a file with the right stem
        named = Path(path).parent / f"{Path(path).stem}.d" / f"{stem}.json"
        named.parent.mkdir(parents=True, exist_ok=True)
        named.write_text(json.dumps(config))
        path = named
    open_clip.add_model_config(str(path))


def _resolve_pretrained(config: ClipConfig, tag_cfg: dict) -> Path:
    description = f"{config.model} / pretrained {config.pretrained!r}"
    hub = tag_cfg.get("hf_hub", "")
    if hub:
        # open_clip's convention: "org/repo/" means the default file name, "org/repo/file" a given one.
        if hub.endswith("/"):
            repo_id, filename = hub[:-1], "open_clip_pytorch_model.bin"
        else:
            repo_id, filename = os.path.split(hub)
        filenames = (_safetensors_name(filename), filename)
        return resolve_hub_file(repo_id, filenames, CLIP_WEIGHTS, description, config.cache_dir)
    if tag_cfg.get("url"):
        return resolve_file(tag_cfg["url"], CLIP_WEIGHTS, config.cache_dir)
    raise CLIP_WEIGHTS.missing(f"{description} has no download location in open_clip")


def _safetensors_name(filename: str) -> str:
    if filename == "open_clip_pytorch_model.bin":
        return "open_clip_model.safetensors"
    return os.path.splitext(filename)[0] + ".safetensors"


def _load_weights(model: nn.Module, state_dict: dict, path: Path, model_name: str) -> None:
    """Load a state dict strictly, after open_clip's own format conversions and pos-embed resizing."""
    from open_clip.convert import convert_state_dict
    from open_clip.model import (
        convert_to_custom_text_state_dict,
        resize_pos_embed,
        resize_text_pos_embed,
    )

    state_dict = convert_state_dict(model, state_dict)
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    if "logit_scale" in state_dict and model.logit_scale.ndim != state_dict["logit_scale"].ndim:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(model.logit_scale.shape)
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise ValueError(f"checkpoint {path} does not fit the {model_name} architecture: {error}") from error
