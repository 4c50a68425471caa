"""CLIP loading through the user's code path, text embeddings and their caches, and the test
stand-in's discriminativeness (SPEC 6)."""

from __future__ import annotations

import dataclasses
import json

import fsspec
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from model_factories import CLIP_MEAN, CLIP_STD, TINY_CLIP_CONFIG, make_clip_config

from clipdiy.errors import WeightsNotFoundError
from clipdiy.segmentation.config import ClipConfig, PromptConfig
from clipdiy.segmentation.models.clip import create_clip_model, supports_class_token_forward
from clipdiy.segmentation.text_embeddings import (
    class_text_embeddings,
    clear_memory_cache,
    compute_class_embeddings,
)
from clipdiy.segmentation.vocabulary import Vocabulary, load_vocabulary
from clipdiy.segmentation.weights import sha256_file


@pytest.fixture(scope="module")
def tiny_clip(tiny_clip_config):
    return create_clip_model(tiny_clip_config)


def pixels(batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 224, 224, generator=generator)


def test_tiny_clip_loads_through_the_checkpoint_path(tiny_clip, tiny_clip_config):
    assert tiny_clip.model_name == tiny_clip_config.model
    assert tiny_clip.weights_id == "sha256:" + sha256_file(tiny_clip_config.checkpoint)[:16]
    assert tiny_clip.image_size == 224
    assert tiny_clip.mean == pytest.approx(CLIP_MEAN) and tiny_clip.std == pytest.approx(CLIP_STD)
    images = tiny_clip.encode_image(pixels())
    texts = tiny_clip.encode_text(["a photo of a cat", "a photo of a dog", "a photo of a car"])
    embed_dim = TINY_CLIP_CONFIG["embed_dim"]
    assert images.shape == (2, embed_dim) and texts.shape == (3, embed_dim)
    assert images.dtype == texts.dtype == torch.float32
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert not any(p.requires_grad for p in tiny_clip.parameters())
    # the checkpoint's weights are the ones in use (not a fresh random init)
    state = torch.load(tiny_clip_config.checkpoint, weights_only=True)
    assert torch.equal(tiny_clip.model.visual.proj, state["visual.proj"])


def test_checkpoint_wrappers_and_fsspec_uri_load_the_same_model(tiny_clip, tiny_clip_config, tmp_path):
    state = torch.load(tiny_clip_config.checkpoint, weights_only=True)
    torch.save({"state_dict": state, "epoch": 32}, tmp_path / "wrapped.pt")
    with fsspec.open("memory://models/tiny.pt", "wb") as handle:
        torch.save(state, handle)
    expected = tiny_clip.encode_image(pixels())
    for source in (str(tmp_path / "wrapped.pt"), "memory://models/tiny.pt"):
        config = dataclasses.replace(tiny_clip_config, checkpoint=source, cache_dir=str(tmp_path / "cache"))
        other = create_clip_model(config)
        assert torch.equal(other.encode_image(pixels()), expected), source


def test_model_config_from_a_uri(tiny_clip_config, tmp_path):
    with fsspec.open("memory://configs/clipdiy-uri-tiny.json", "w") as handle:
        handle.write(json.dumps(TINY_CLIP_CONFIG))
    config = ClipConfig(
        model="clipdiy-uri-tiny",
        pretrained=None,
        checkpoint=tiny_clip_config.checkpoint,
        model_config="memory://configs/clipdiy-uri-tiny.json",
        cache_dir=str(tmp_path),
    )
    assert create_clip_model(config).encode_text(["x"]).shape == (1, TINY_CLIP_CONFIG["embed_dim"])


def test_bad_clip_configs_give_clear_errors(tiny_clip_config, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="--clip-checkpoint"):
        create_clip_model(dataclasses.replace(tiny_clip_config, checkpoint=None, pretrained=None))
    with pytest.raises(WeightsNotFoundError, match="--clip-checkpoint"):
        create_clip_model(dataclasses.replace(tiny_clip_config, checkpoint=str(tmp_path / "none.pt")))
    with pytest.raises(ValueError, match="unknown pretrained tag"):
        create_clip_model(ClipConfig(model="ViT-B-32", pretrained="no_such_tag"))
    with pytest.raises(ValueError, match="unknown CLIP architecture"):
        create_clip_model(ClipConfig(model="ViT-Z-99", checkpoint=tiny_clip_config.checkpoint))
    with pytest.raises(ValueError, match="file's stem"):
        create_clip_model(dataclasses.replace(tiny_clip_config, model="another-name"))
    # a checkpoint of another architecture is refused, not half-loaded
    torch.save({"visual.proj": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit"):
        create_clip_model(dataclasses.replace(tiny_clip_config, checkpoint=str(tmp_path / "other.pt")))


def plain_open_clip_features(clip, images: torch.Tensor) -> torch.Tensor:
    """open_clip's own full forward, normalised: what ``ClipModel.encode_image`` must equal."""
    with torch.no_grad():
        return F.normalize(clip.model.encode_image(images.to(clip.dtype)).float(), dim=-1)


def test_class_token_forward_equals_open_clip_forward(tiny_clip):
    assert tiny_clip.class_token_forward
    images = pixels(batch=5, seed=3)
    fast = tiny_clip.encode_image(images)
    expected = plain_open_clip_features(tiny_clip, images)
    assert (fast - expected).abs().max().item() <= 1e-6
    # one image alone gives the same embedding as inside a batch
    assert (tiny_clip.encode_image(images[2:3]) - expected[2:3]).abs().max().item() <= 1e-6


@pytest.mark.slow
def test_class_token_forward_equals_open_clip_forward_on_vitb32(vitb32_clip_config, coco_images):
    clip = create_clip_model(vitb32_clip_config)
    assert clip.class_token_forward
    photo = np.asarray(Image.open(coco_images[0]).convert("RGB").resize((224, 224)), dtype=np.float32) / 255.0
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    images = torch.cat([(torch.from_numpy(photo).permute(2, 0, 1)[None] - mean) / std, pixels(batch=3)])
    fast = clip.encode_image(images)
    expected = plain_open_clip_features(clip, images)
    assert (fast - expected).abs().max().item() <= 1e-5
    # distinct inputs give distinct embeddings (the comparison is not between constants)
    assert (expected[0] - expected[1]).abs().max().item() > 1e-2


def test_towers_that_pool_otherwise_take_open_clips_forward(tiny_clip_config):
    clip = create_clip_model(tiny_clip_config)
    clip.model.visual.pool_type = "avg"  # mean of patch tokens: the last block is needed for all
    assert not supports_class_token_forward(clip.model.visual)
    clip.class_token_forward = supports_class_token_forward(clip.model.visual)
    images = pixels(batch=2, seed=4)
    assert torch.equal(clip.encode_image(images), plain_open_clip_features(clip, images))
    assert not supports_class_token_forward(torch.nn.Linear(2, 2))


def test_low_precision_keeps_float32_outputs(tiny_clip, tiny_clip_config):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.bfloat16
    low = create_clip_model(tiny_clip_config, device=device, dtype=dtype)
    assert low.dtype == dtype and low.device.type == device
    images = low.encode_image(pixels().to(device))
    assert images.dtype == torch.float32
    cosine = (images.cpu() * tiny_clip.encode_image(pixels())).sum(-1)
    assert cosine.min() > 0.98
    with pytest.raises(ValueError, match="dtype"):
        create_clip_model(tiny_clip_config, dtype=torch.int8)


def test_class_embeddings_are_the_faithful_prompt_embeddings(tiny_clip):
    voc = load_vocabulary("voc")
    embeddings = class_text_embeddings(tiny_clip, voc, PromptConfig())
    expected = tiny_clip.encode_text([f"a photo of a {name}" for name in voc.class_names])
    assert embeddings.shape == (21, TINY_CLIP_CONFIG["embed_dim"]) and embeddings.dtype == torch.float32
    torch.testing.assert_close(embeddings, expected, atol=1e-6, rtol=0)


def test_synonyms_and_templates_are_averaged(tiny_clip):
    vocabulary = Vocabulary.from_names("v", [("tv monitor", "television"), "cat"])
    prompts = PromptConfig(templates=("a photo of a {}", "a drawing of a {}"))
    embeddings = compute_class_embeddings(tiny_clip.encode_text, vocabulary, prompts)
    tv = tiny_clip.encode_text(
        ["a photo of a tv monitor", "a drawing of a tv monitor", "a photo of a television", "a drawing of a television"]
    )
    torch.testing.assert_close(embeddings[1], F.normalize(tv.mean(0), dim=0), atol=1e-6, rtol=0)
    cat = tiny_clip.encode_text(["a photo of a cat", "a drawing of a cat"])
    torch.testing.assert_close(embeddings[2], F.normalize(cat.mean(0), dim=0), atol=1e-6, rtol=0)


class CountingEncoder:
    """Wraps a ClipModel and counts the texts it encodes."""

    def __init__(self, clip):
        self.clip = clip
        self.model_name = clip.model_name
        self.weights_id = clip.weights_id
        self.dtype = clip.dtype
        self.texts = 0

    def encode_text(self, texts):
        self.texts += len(texts)
        return self.clip.encode_text(texts)


def test_text_embeddings_are_computed_once_then_cached(tiny_clip, tmp_path):
    clear_memory_cache()
    voc = load_vocabulary("voc")
    encoder = CountingEncoder(tiny_clip)
    first = class_text_embeddings(encoder, voc, PromptConfig(), cache_dir=str(tmp_path))
    assert encoder.texts == 21
    first.zero_()  # callers get copies: the cache cannot be corrupted from outside
    second = class_text_embeddings(encoder, voc, PromptConfig(), cache_dir=str(tmp_path))
    assert encoder.texts == 21 and second.abs().sum() > 0
    (cached,) = tmp_path.glob("text-embeddings-*.safetensors")
    clear_memory_cache()  # as a new worker process would start
    third = class_text_embeddings(encoder, voc, PromptConfig(), cache_dir=str(tmp_path))
    assert encoder.texts == 21
    assert torch.equal(third, second)
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(cached))["embeddings"], second)
    # other prompts or other weights are other entries
    class_text_embeddings(encoder, voc, PromptConfig(article=True), cache_dir=str(tmp_path))
    assert encoder.texts == 42
    encoder.weights_id = "sha256:0000000000000000"
    class_text_embeddings(encoder, voc, PromptConfig(), cache_dir=str(tmp_path))
    assert encoder.texts == 63
    assert len(list(tmp_path.glob("text-embeddings-*.safetensors"))) == 3
    assert not list(tmp_path.glob("*.partial"))


def test_text_embedding_disk_cache_on_fsspec(tiny_clip):
    clear_memory_cache()
    voc = load_vocabulary("voc")
    encoder = CountingEncoder(tiny_clip)
    first = class_text_embeddings(encoder, voc, PromptConfig(), cache_dir="memory://text-cache")
    clear_memory_cache()
    second = class_text_embeddings(encoder, voc, PromptConfig(), cache_dir="memory://text-cache")
    assert encoder.texts == 21 and torch.equal(first, second)


# --- the ViT-B-32 stand-in is discriminative (SPEC 6) --------------------------------------------


def dense_label_maps(clip, text, images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """SPEC 1 score maps of the sample photos with the library's DenseScorer: labels and top-2 gap."""
    from clipdiy.segmentation.dense import DenseScorer
    from clipdiy.segmentation.preprocess import resize_for_model

    scorer = DenseScorer(clip.encode_image, text, input_size=clip.image_size, mean=clip.mean, std=clip.std)
    batch = torch.from_numpy(np.stack([resize_for_model(image, "faithful") for image in images]))
    scores = scorer(batch.permute(0, 3, 1, 2).contiguous())  # B x C x 256 x 256
    top2 = scores.topk(2, dim=1).values
    return scores.argmax(dim=1), top2[:, 0] - top2[:, 1]


@pytest.mark.slow
def test_vitb32_stand_in_is_discriminative(vitb32_clip_config, coco_images):
    from PIL import Image

    clip = create_clip_model(vitb32_clip_config)
    assert clip.model_name == "ViT-B-32" and clip.weights_id.startswith("sha256:")
    voc = load_vocabulary("voc")
    text = class_text_embeddings(clip, voc, PromptConfig())
    similarity = text @ text.T
    off_diagonal = similarity[~torch.eye(len(voc), dtype=torch.bool)]
    assert off_diagonal.mean() < 0.4, "text embeddings nearly collinear: the stand-in is degenerate"

    images = [np.asarray(Image.open(path).convert("RGB")) for path in coco_images[:4]]
    labels, gap = dense_label_maps(clip, text, images)
    share = torch.bincount(labels.flatten(), minlength=len(voc)).float() / labels.numel()
    assert int((share > 0.01).sum()) >= 5, f"too few classes win pixels: {share}"
    assert share.max() < 0.6, f"one class wins almost everything: {share}"
    per_image = [len(torch.unique(label)) for label in labels]
    assert sum(n >= 3 for n in per_image) >= 3, per_image  # most photos get several classes
    assert float(gap.median()) > 1e-3  # top-1 vs top-2 gaps large enough to compare label maps on


def test_make_clip_config_is_deterministic_and_cached(tmp_path):
    first = make_clip_config(tmp_path / "a", arch="tiny", seed=3)
    again = make_clip_config(tmp_path / "a", arch="tiny", seed=3)
    other_dir = make_clip_config(tmp_path / "b", arch="tiny", seed=3)
    assert again == first
    assert _same_state(first.checkpoint, other_dir.checkpoint)  # same seed, same weights
    different = make_clip_config(tmp_path / "c", arch="tiny", seed=4)
    assert not _same_state(first.checkpoint, different.checkpoint)


def _same_state(a: str, b: str) -> bool:
    left, right = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
