"""Trident's precision (``--precision``): where each dtype runs, against the authors' precision map.

Under ``fp16`` the authors run CLIP (LayerNorms computed in float32), DINO and SAM's image
encoder in fp16, and with them everything up to the upsampled query logits; SAM's input is
normalised in fp16 with fp16-rounded constants; the decision and the SAM refinement run in
float32, the refinement's prompt encoder and mask decoder with fp16-rounded weights. Under
``fp32`` everything is float32. Hooks on the real modules and wrappers on the method's pieces
record the dtypes one labelled photo goes through, so that a cast moved earlier or later fails.
Small models of the real module classes (a 2-block CLIP with 16-px patches, a 2-block timm DINO, a
two-block SAM), so this runs in seconds on a CPU; the label agreement of fp16 with float32 on
the ViT-B models is in tests/test_trident.py.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from clipdiy.segmentation.config import SegmenterConfig, TridentConfig
from clipdiy.segmentation.methods.naclip import query_words
from clipdiy.segmentation.vocabulary import load_vocabulary

VOCABULARY = "trident-voc21"
H, S = torch.float16, torch.float32
#: SAM's normalisation constants (segment-anything's ``Sam`` defaults).
SAM_MEAN = (123.675, 116.28, 103.53)
SAM_STD = (58.395, 57.12, 57.375)


@pytest.fixture(scope="module")
def clip_config(tmp_path_factory):
    from model_factories import make_clip_config

    return make_clip_config(tmp_path_factory.mktemp("tiny16"), arch="tiny16")


@pytest.fixture(scope="module")
def photo(coco_images):
    with Image.open(coco_images[5]) as image:
        return np.asarray(image.convert("RGB").resize((96, 64), Image.BILINEAR))


def small_dino():
    from timm.models.vision_transformer import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return VisionTransformer(img_size=224, patch_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=0).eval()


class Recorder:
    """Dtypes seen at named points: ``seen[name]`` is a list of dtypes (one per call)."""

    def __init__(self):
        self.seen: dict[str, list[torch.dtype]] = defaultdict(list)
        self.tensors: dict[str, torch.Tensor] = {}
        self.handles = []

    def output(self, name: str, module: torch.nn.Module) -> None:
        self.handles.append(module.register_forward_hook(lambda _m, _i, out: self.seen[name].append(out.dtype)))

    def input(self, name: str, module: torch.nn.Module, keep: bool = False) -> None:
        def hook(_module, args):
            self.seen[name].append(args[0].dtype)
            if keep:
                self.tensors[name] = args[0].detach().clone()

        self.handles.append(module.register_forward_pre_hook(hook))

    def wrap(self, name: str, function):
        """``function`` recording its tensor arguments' and its result's dtypes."""

        def wrapped(*args, **kwargs):
            out = function(*args, **kwargs)
            self.seen[f"{name} in"].extend(a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point())
            first = out[0] if isinstance(out, tuple) else out
            self.seen[f"{name} out"].append(first.dtype)
            return out

        return wrapped

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def label_one_photo(precision: str, clip_config, photo, monkeypatch):
    """Build Trident in ``precision`` on the small models, label ``photo`` with the SAM
    refinement, and return what was recorded, the models, the prepared photo and the decision."""
    from model_factories import make_small_sam

    from clipdiy.segmentation.methods import trident as trident_method
    from clipdiy.segmentation.methods.trident import TridentMethod
    from clipdiy.segmentation.models import trident as trident_models
    from clipdiy.segmentation.models.clip import create_clip_model
    from clipdiy.segmentation.models.trident_weights import place_trident_models
    from clipdiy.segmentation.segmenter import prepare_input, select_dtype

    dtype = select_dtype(precision)
    clip = create_clip_model(clip_config, dtype=dtype)
    dino, sam = small_dino(), make_small_sam(0, 32, depth=2)
    place_trident_models(dino, sam, "cpu", dtype, refine=True)
    vocabulary = load_vocabulary(VOCABULARY)
    words, _ = query_words(vocabulary)
    text = F.normalize(torch.randn(len(words), 64, generator=torch.Generator().manual_seed(0)), dim=-1)
    # Every region prompts SAM (coarse_thresh 0, area 1): the decoder runs whatever the labels.
    trident = TridentConfig(short_side=336, coarse_thresh=0.0, minimal_area=1)
    config = SegmenterConfig(method="trident", vocabulary=VOCABULARY, clip=clip_config, trident=trident, precision=precision, refine="sam")
    method = TridentMethod(clip, dino, sam, vocabulary, config, text, torch.device("cpu"))

    record = Recorder()
    visual = clip.model.visual
    record.input("dino input", dino.patch_embed.proj)
    for block in dino.blocks:
        record.output("dino blocks", block)
    record.output("dino output", dino.norm)
    record.input("clip input", visual.conv1)
    for block in visual.transformer.resblocks[:-1]:
        record.output("clip blocks", block)
        record.output("clip ln_1 out", block.ln_1)
    last = visual.transformer.resblocks[-1]
    record.output("clip ln_1 out", last.ln_1)
    record.input("block-12 attention (A v)", last.attn.out_proj)
    record.output("block-12 values", last.attn.out_proj)
    record.input("aggregated (W G)", visual.ln_post)
    record.output("clip ln_post out", visual.ln_post)
    encoder = sam.image_encoder
    record.input("sam input", encoder.patch_embed, keep=True)
    for block in encoder.blocks[:-1]:
        record.output("sam blocks", block)
    record.output("sam last block qkv", encoder.blocks[-1].attn.qkv)
    record.output("sam neck", encoder.neck)
    record.input("decoder embeddings", sam.mask_decoder.transformer)
    record.input("mask prompt", sam.prompt_encoder.mask_downscaling[0])

    monkeypatch.setattr(trident_models, "dino_similarity_means", record.wrap("dino mean", trident_models.dino_similarity_means))
    monkeypatch.setattr(trident_models, "splice", record.wrap("splice", trident_models.splice))
    monkeypatch.setattr(trident_models, "sam_guided_weights", record.wrap("sam weights", trident_models.sam_guided_weights))
    monkeypatch.setattr(method.encoder, "aggregate", record.wrap("aggregate", method.encoder.aggregate))
    # The method's interpolations: the last one brings the query logits to the original size.
    resizes: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def interpolate(x, *args, **kwargs):
        resizes.append((x.dtype, tuple(kwargs.get("size") or ())))
        return F.interpolate(x, *args, **kwargs)

    monkeypatch.setattr(trident_method, "F", SimpleNamespace(interpolate=interpolate, pad=F.pad))

    prepared = [prepare_input(photo, config)]
    try:
        with torch.inference_mode():
            ((_, forward),) = list(method.forward_groups(prepared))
            decision = method.decide(forward.logits, forward)
    finally:
        record.remove()
    return SimpleNamespace(record=record, resizes=resizes, sam=sam, dino=dino, clip=clip, prepared=prepared[0], forward=forward, decision=decision)


#: TRIDENT.md 1.4, point by point: (recorded name, dtype under fp16). Under fp32 all are float32.
PRECISION_MAP = (
    ("dino input", H),  # imgs_norm.half(): the ImageNet normalisation in float32, cast at DINO's input
    ("dino blocks", H),  # DINO .half(): blocks, LayerNorms included
    ("dino output", H),
    ("dino mean in", H),  # DINO cosine and its mean over the photo's windows
    ("dino mean out", H),
    ("clip input", H),  # img_batch.half()
    ("clip ln_1 out", H),  # LayerNormFp32: float32 arithmetic, back to the input's fp16
    ("clip blocks", H),
    ("block-12 attention (A v)", H),  # DINO-guided softmax and A v
    ("block-12 values", H),
    ("splice in", H),
    ("splice out", H),  # fp16 accumulation and count division
    ("sam input", H),  # SAM .half(): normalised in fp16
    ("sam blocks", H),
    ("sam last block qkv", H),
    ("sam neck", H),
    ("sam weights in", H),  # get_sam_sim in fp16
    ("sam weights out", H),
    ("aggregate in", H),  # G and W
    ("aggregated (W G)", H),
    ("clip ln_post out", H),
    ("aggregate out", H),  # normalised features
    ("decoder embeddings", S),  # predictor.features.float()
    ("mask prompt", S),
)


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_dtypes_follow_the_authors_precision_map(precision, clip_config, photo, monkeypatch):
    got = label_one_photo(precision, clip_config, photo, monkeypatch)
    seen = got.record.seen
    reduced = precision == "fp16"
    for name, dtype in PRECISION_MAP:
        expected = dtype if reduced else S
        assert seen[name], f"{name}: never reached"
        assert set(seen[name]) == {expected}, (name, seen[name])

    # Only CLIP's LayerNorms keep float32 parameters (open_clip's LayerNormFp32); DINO's are fp16.
    visual = got.clip.model.visual
    assert visual.transformer.resblocks[0].ln_1.weight.dtype == S and visual.ln_post.weight.dtype == S
    assert got.dino.norm.weight.dtype == (H if reduced else S)

    # The query logits: formed and upsampled to the original size in the encoders' dtype, then float32.
    dtype, size = got.resizes[-1]
    assert size == got.prepared.original_size and dtype == (H if reduced else S)
    assert got.forward.logits.dtype == S and got.decision.probabilities.dtype == S

    # SAM's input: (uint8 - mean) / std in SAM's dtype with its constants in that dtype (the
    # authors' half() buffers: mean 123.6875, 116.25, 103.5), zero-padded after.
    image = torch.from_numpy(got.prepared.saliency_input).permute(2, 0, 1).to(H if reduced else S)

    def column(values):
        return torch.tensor(values).view(3, 1, 1).to(image.dtype)

    normalised = (image - column(SAM_MEAN)) / column(SAM_STD)
    expected = F.pad(normalised, (0, 1024 - image.shape[2], 0, 1024 - image.shape[1]))
    assert torch.equal(got.record.tensors["sam input"][0], expected)
    if reduced:  # the check tells the authors' fp16 arithmetic from float32 rounded afterwards
        exact = (image.float() - torch.tensor(SAM_MEAN).view(3, 1, 1)) / torch.tensor(SAM_STD).view(3, 1, 1)
        assert not torch.equal(normalised, exact.half())

    # The refinement's prompt encoder and mask decoder run in float32 with fp16-rounded weights
    # (half() then float()), the random Fourier matrix included.
    for part in (got.sam.prompt_encoder, got.sam.mask_decoder):
        for tensor in [*part.parameters(), *part.buffers()]:
            assert tensor.dtype == S
            if reduced:
                assert torch.equal(tensor, tensor.half().float())
    gaussian = got.sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
    assert reduced == torch.equal(gaussian, gaussian.half().float())  # random float32 values are not fp16 values


def test_trident_takes_fp32_and_fp16_only():
    assert SegmenterConfig(method="trident", precision="fp16").precision == "fp16"
    with pytest.raises(ValueError, match=r"precision='bf16'.*not available for Trident.*fp32 or fp16"):
        SegmenterConfig(method="trident", precision="bf16")
    from clipdiy.segmentation.models.trident_weights import place_trident_models

    with pytest.raises(ValueError, match="float32 or float16"):
        place_trident_models(torch.nn.Linear(1, 1), SimpleNamespace(), "cpu", torch.bfloat16, refine=False)
