"""Saliency backends: FOUND (SPEC 2) on a random-init ViT-S/8 with the real head, ``none``, registry."""

from __future__ import annotations

import dataclasses
import math

import fsspec
import pytest
import torch
import torch.nn.functional as F
from model_factories import FOUND_HEAD

from clipdiy.segmentation.config import SaliencyConfig
from clipdiy.segmentation.models.position_embedding import resize_position_embedding
from clipdiy.segmentation.models.saliency import (
    SaliencyModel,
    available_saliency_backends,
    create_saliency_model,
    register_saliency_backend,
)
from clipdiy.segmentation.models.saliency.found import FoundSaliency
from clipdiy.segmentation.weights import sha256_file


@pytest.fixture(scope="module")
def found(found_saliency_config) -> FoundSaliency:
    return create_saliency_model(found_saliency_config)


def smooth_images(batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """B x 3 x H x W in [0, 1]: a bright blob on a darker textured background."""
    generator = torch.Generator().manual_seed(seed)
    noise = F.interpolate(torch.rand(batch, 3, 6, 6, generator=generator), size=(height, width), mode="bilinear")
    ys = torch.linspace(-1, 1, height).view(1, 1, height, 1)
    xs = torch.linspace(-1, 1, width).view(1, 1, 1, width)
    blob = (ys**2 + xs**2 < 0.3).float()
    return (0.3 * noise + 0.6 * blob).clamp(0, 1)


@pytest.mark.parametrize("height,width", [(37, 53), (101, 67), (5, 7), (224, 224), (120, 400)])
def test_found_maps_have_the_image_size_and_lie_in_unit_range(found, height, width):
    images = smooth_images(2, height, width)
    maps = found(images)
    assert maps.shape == (2, 1, height, width)
    assert maps.dtype == torch.float32
    assert torch.isfinite(maps).all() and maps.min() >= 0.0 and maps.max() <= 1.0
    if height * width > 64 * 64:
        assert maps.std() > 1e-3  # a real spatial map, not a constant


@pytest.mark.parametrize("height,width", [(37, 53), (101, 67), (224, 224), (120, 400)])
def test_found_matches_an_independent_transcription(found, found_saliency_config, height, width):
    """SPEC 2 as FOUND's own code runs it (tests/reference_found.py), on the same checkpoints."""
    from reference_found import ReferenceFound

    reference = ReferenceFound(
        found_saliency_config.backbone, found_saliency_config.backbone_checkpoint, found_saliency_config.head
    )
    images = smooth_images(2, height, width, seed=height)
    expected = reference(images)
    assert expected.std() > 1e-3  # a spatial map, so that the comparison means something
    torch.testing.assert_close(found(images), expected, atol=1e-5, rtol=0)


def test_found_provenance(found, found_saliency_config):
    assert found.name == "found"
    backbone_id, head_id = found.weights_id.split("+")
    assert backbone_id == "sha256:" + sha256_file(found_saliency_config.backbone_checkpoint)[:16]
    assert head_id == "sha256:" + sha256_file(FOUND_HEAD)[:16]
    assert not any(p.requires_grad for p in found.parameters())


def test_keys_come_from_the_last_block(found):
    """At the native 224 x 224 the features equal the key slice of blocks[-1].attn.qkv in timm's
    own forward pass, and not those of any other block."""
    images = smooth_images(1, 224, 224, seed=1)
    captured = {}
    hooks = [
        block.attn.qkv.register_forward_hook(lambda _m, _i, out, n=n: captured.__setitem__(n, out))
        for n, block in enumerate(found.backbone.blocks)
    ]
    try:
        normalised = (images - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor(
            [0.229, 0.224, 0.225]
        ).view(1, 3, 1, 1)
        with torch.no_grad():
            found.backbone.forward_features(normalised)
    finally:
        for hook in hooks:
            hook.remove()

    def keys_of(block: int) -> torch.Tensor:  # 6 heads x 64 concatenated = channels 384..767 of qkv
        qkv = captured[block].reshape(1, 785, 3, 6, 64)
        keys = qkv[:, :, 1].reshape(1, 785, 384)[:, 1:]
        return keys.transpose(1, 2).reshape(1, 384, 28, 28)

    features = found.last_keys(images)
    assert features.shape == (1, 384, 28, 28)
    last = len(found.backbone.blocks) - 1
    torch.testing.assert_close(features, keys_of(last), atol=1e-5, rtol=1e-5)
    for block in range(last):
        assert (features - keys_of(block)).abs().max() > 1e-2, f"features also match block {block}"


def test_found_map_is_the_real_head_on_the_keys(found):
    """SPEC 2.3-2.4 by hand: 1x1 conv from found_decoder.pt, x8 bilinear, crop, sigmoid."""
    decoder = torch.load(FOUND_HEAD, map_location="cpu", weights_only=True)["decoder"]
    images = smooth_images(1, 45, 61, seed=2)
    keys = found.last_keys(images)
    assert keys.shape == (1, 384, 6, 8)  # padded to 48 x 64
    logits = F.conv2d(keys, decoder["weight"], decoder["bias"])
    expected = torch.sigmoid(F.interpolate(logits, scale_factor=8, mode="bilinear", align_corners=False)[..., :45, :61])
    torch.testing.assert_close(found(images), expected, atol=1e-6, rtol=1e-5)


def test_zero_padding_is_in_normalised_space(found):
    """Padding happens after ImageNet normalisation (FOUND pads the normalised tensor with 0)."""
    images = smooth_images(1, 21, 19, seed=3)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    padded_pixels = F.pad((images - mean) / std, (0, 5, 0, 3)) * std + mean  # 24 x 24, zeros once normalised
    torch.testing.assert_close(found.last_keys(images), found.last_keys(padded_pixels), atol=1e-4, rtol=1e-4)


def test_batch_equals_single_images(found):
    images = smooth_images(3, 50, 70, seed=4)
    batched = found(images)
    single = torch.cat([found(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def dino_interpolate_pos_encoding(pos_embed: torch.Tensor, x: torch.Tensor, patch: int = 8) -> torch.Tensor:
    """facebookresearch/dino vision_transformer.py, transcribed (x: B x 3 x H x W, padded)."""
    npatch = (x.shape[-2] // patch) * (x.shape[-1] // patch)
    N = pos_embed.shape[1] - 1
    if npatch == N and x.shape[-2] == x.shape[-1]:
        return pos_embed
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = x.shape[-2] // patch  # DINO's "w" is the image's dim -2
    h0 = x.shape[-1] // patch
    w0, h0 = w0 + 0.1, h0 + 0.1
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, int(math.sqrt(N)), int(math.sqrt(N)), dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(N), h0 / math.sqrt(N)),
        mode="bicubic",
    )
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


@pytest.mark.parametrize("rows,cols", [(28, 28), (13, 7), (40, 30), (1, 1)])
def test_position_embedding_is_dinos(rows, cols):
    generator = torch.Generator().manual_seed(0)
    pos_embed = torch.randn(1, 785, 384, generator=generator)
    ours = resize_position_embedding(pos_embed[0], rows, cols)[None]
    reference = dino_interpolate_pos_encoding(pos_embed, torch.zeros(1, 3, rows * 8, cols * 8))
    assert ours.shape == (1, 1 + rows * cols, 384)
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=1e-6)


def test_head_from_a_uri_and_bad_heads(found_saliency_config, tmp_path):
    with fsspec.open("memory://weights/found_decoder.pt", "wb") as handle:
        handle.write(FOUND_HEAD.read_bytes())
    config = dataclasses.replace(found_saliency_config, head="memory://weights/found_decoder.pt")
    from_uri = create_saliency_model(config)
    assert from_uri.weights_id.split("+")[1] == "sha256:" + sha256_file(FOUND_HEAD)[:16]
    torch.save({"decoder": {"weight": torch.zeros(1, 10, 1, 1), "bias": torch.zeros(1)}}, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="must hold"):
        create_saliency_model(dataclasses.replace(found_saliency_config, head=str(tmp_path / "wrong.pt")))


def test_low_precision_backbone(found, found_saliency_config):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    low = create_saliency_model(found_saliency_config, device=device, dtype=dtype)
    images = smooth_images(1, 64, 96, seed=5)
    maps = low(images.to(device))
    assert maps.dtype == torch.float32 and maps.shape == (1, 1, 64, 96)
    assert (maps.cpu() - found(images)).abs().max() < 0.1


def test_none_backend_and_registry():
    assert {"found", "none"} <= set(available_saliency_backends())
    none = create_saliency_model(SaliencyConfig(backend="none"))
    images = smooth_images(2, 13, 17)
    maps = none(images)
    assert none.name == "none" and none.weights_id is None
    assert maps.shape == (2, 1, 13, 17) and torch.equal(maps, torch.ones_like(maps))
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        none(images[:, :1])
    with pytest.raises(ValueError, match="unknown saliency backend 'dinov2'.*found.*none"):
        create_saliency_model(SaliencyConfig(backend="dinov2"))


def test_a_new_backend_plugs_in_through_the_registry(monkeypatch):
    import clipdiy.segmentation.models.saliency as registry

    monkeypatch.setattr(registry, "_BACKENDS", dict(registry._BACKENDS))  # undone after the test

    class CentreSaliency(SaliencyModel):
        name = "centre-test"

        def forward(self, images):
            height, width = images.shape[-2:]
            ys = torch.linspace(-1, 1, height, device=images.device).view(1, 1, -1, 1)
            xs = torch.linspace(-1, 1, width, device=images.device).view(1, 1, 1, -1)
            return (1 - (ys**2 + xs**2) / 2).expand(images.shape[0], 1, height, width)

    @register_saliency_backend("centre-test")
    def make_centre(config, device, dtype):
        return CentreSaliency().to(device)

    model = create_saliency_model(SaliencyConfig(backend="centre-test"))
    assert "centre-test" in available_saliency_backends()
    assert model(smooth_images(1, 9, 9)).shape == (1, 1, 9, 9)
    with pytest.raises(ValueError, match="already registered"):
        register_saliency_backend("centre-test")(lambda config, device, dtype: CentreSaliency())
