"""NACLIP + PAMR (SPEC 8): the batched implementation against the per-image transcription in
tests/reference_naclip.py, on real photos of odd sizes with a random, discriminative ViT-B/16
(SPEC 6), in both of the authors' settings, with and without PAMR; plus the pieces' known answers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from reference_naclip import (
    reference_bias,
    reference_decide,
    reference_logits,
    reference_pamr,
)

from clipdiy.segmentation.config import NaclipConfig, SegmenterConfig
from clipdiy.segmentation.methods.naclip import query_words, token_chunks, window_boxes
from clipdiy.segmentation.models.naclip import neighbourhood_bias
from clipdiy.segmentation.models.position_embedding import resize_position_embedding
from clipdiy.segmentation.refine import pamr
from clipdiy.segmentation.segmenter import Segmenter, prepare_input
from clipdiy.segmentation.vocabulary import load_vocabulary

#: Logits (cosines) of the batched path against the per-image transcription.
TOLERANCE = 1e-5
#: PAMR's refined logits (float32 products against the transcription's float64 loops).
REFINED_TOLERANCE = 1e-4
#: Labels are compared where the reference's best class logit (a class's best query) beats the
#: second by more than this, and its probability is off the threshold by more than
#: THRESHOLD_MARGIN (the logits' tolerance times the logit scale 40, with room).
LABEL_MARGIN = 2e-4
THRESHOLD_MARGIN = 1e-2
#: (width, height) of the photos: not multiples of 16, landscape, portrait and long;
#: the first two share a size.
SIZES = ((229, 171), (229, 171), (157, 233), (260, 150))
#: Tokens per image-tower forward in the test: whole, all photos in one forward; sliding, 12
#: windows of 197 tokens, so forwards hold windows of several photos and groups.
FORWARD_TOKENS = {"whole": 8192, "slide": 12 * 197}

#: The NACLIP authors' configs/cls_coco_object.txt (github.com/sinahmr/NACLIP), verbatim.
COCO_OBJECT_CLASS_FILE = """
sky, wall, tree, wood, grass, road, sea, river, mountain, sands, desk, bed, building, cloud, lamp, door, window, wardrobe, ceiling, shelf, curtain, stair, floor, hill, rail, fence
person, person in shirt, person in jeans, person in dress, person in sweater, person in skirt, person in jacket, body
bicycle
car
motorcycle
airplane
bus
train
truck
boat
traffic light
fire hydrant
stop sign
parking meter
bench
bird
cat
dog
horse
sheep
cow
elephant
bear
zebra
giraffe
backpack
umbrella
handbag
tie
suitcase
frisbee
skis
snowboard
sports ball
kite
baseball bat
baseball glove
skateboard
surfboard
tennis racket
bottle
wine glass
cup
fork
knife
spoon
bowl
banana
apple
sandwich
orange
broccoli
carrot
hot dog
pizza
donut
cake
chair
couch
potted plant
bed
dining table
toilet
tv
laptop
mouse
remote
keyboard
cell phone
microwave
oven
toaster
sink
refrigerator
book
clock
vase
scissors
teddy bear
hair drier
toothbrush
"""


@pytest.fixture(scope="module")
def vitb16_config(tmp_path_factory):
    from model_factories import make_clip_config

    return make_clip_config(tmp_path_factory.mktemp("clip-vitb16"), arch="ViT-B-16")


@pytest.fixture(scope="module")
def vitb16(vitb16_config):
    from clipdiy.segmentation.models.clip import create_clip_model

    return create_clip_model(vitb16_config)


@pytest.fixture(scope="module")
def photos(coco_images):
    out = []
    for path, size in zip(coco_images[3 : 3 + len(SIZES)], SIZES):
        with Image.open(path) as image:
            out.append(np.asarray(image.convert("RGB").resize(size, Image.BILINEAR)))
    return out


@pytest.fixture(scope="module")
def text(vitb16, coco_images):
    """56 query embeddings (naclip-voc21's count) that compete over real image content.

    The ViT-B/16 text tower over 56 x 80 prompts takes minutes on a CPU, and the text side is
    checked on its own (test_query_embeddings_average_the_80_templates), so the queries here are
    patch features of another photo at seeded positions (through the reference encoder).
    """
    from reference_naclip import (
        reference_features,
        reference_normalise,
        reference_resize,
    )

    with Image.open(coco_images[10]) as image:
        rgb = np.asarray(image.convert("RGB"))
    with torch.no_grad():
        features = reference_features(vitb16.model.visual, reference_normalise(reference_resize(rgb)))
    flat = features.reshape(-1, features.shape[-1])
    picks = torch.randperm(flat.shape[0], generator=torch.Generator().manual_seed(0))[:56]
    return flat[picks].clone()


def naclip_segmenter(clip, text, window: str, refine: str) -> Segmenter:
    naclip = NaclipConfig(window=window, max_forward_tokens=FORWARD_TOKENS[window])
    config = SegmenterConfig(method="naclip", vocabulary="naclip-voc21", naclip=naclip, refine=refine)
    return Segmenter(clip, None, load_vocabulary("naclip-voc21"), config, text_embeddings=text)


def expected_forwards(photos, window: str) -> list[int]:
    """Rows of each image-tower forward: every photo in one, or every window in 12s (SPEC 8.7's
    window count, (side - 224 + 111) // 112 + 1 per axis of the 336-short-side input)."""
    if window == "whole":
        return [len(photos)]
    windows = 0
    for photo in photos:
        height, width = photo.shape[:2]
        scale = 336 / min(height, width)
        h, w = int(height * scale + 0.5), int(width * scale + 0.5)
        windows += ((h - 224 + 111) // 112 + 1) * ((w - 224 + 111) // 112 + 1)
    return [12] * (windows // 12) + ([windows % 12] if windows % 12 else [])


@pytest.mark.slow
@pytest.mark.parametrize("window", ["whole", "slide"])
def test_batched_naclip_matches_the_transcription(vitb16, text, photos, window):
    vocabulary = load_vocabulary("naclip-voc21")
    _, owners = query_words(vocabulary)
    segmenter = naclip_segmenter(vitb16, text, window, refine="pamr")
    method = segmenter.method
    assert segmenter.provenance.method == "naclip" and segmenter.provenance.mode == window

    # The batched forwards: photos of every size share them; the rest runs per group of one size.
    prepared = [prepare_input(photo, segmenter.config) for photo in photos]
    assert len({p.model_input.shape for p in prepared}) == len(photos) - 1
    rows_per_forward = []
    encoder_forward = method.encoder.forward

    def counted(pixels, *args, **kwargs):
        rows_per_forward.append(pixels.shape[0])
        return encoder_forward(pixels, *args, **kwargs)

    method.encoder.forward = counted
    batched: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.inference_mode():
        for indices, forward in method.forward_groups(prepared):
            refined = pamr(forward.guide, forward.logits)
            plain = method.decide(forward.logits, forward)
            for offset, i in enumerate(indices):
                batched[i] = (forward.logits[offset], refined[offset], plain.labels[offset])
        assert rows_per_forward == expected_forwards(photos, window)
        outputs = segmenter.predict(prepared, return_probabilities=True)  # the whole path, PAMR on
    assert sorted(batched) == list(range(len(photos)))

    decided_total = 0
    pixels_total = 0
    winners = torch.zeros(len(vocabulary), dtype=torch.long)
    for i, photo in enumerate(photos):
        with torch.no_grad():
            logits, guide = reference_logits(vitb16.model.visual, photo, text, window)
        logits_b, refined_b, labels_b = batched[i]
        assert (logits_b - logits).abs().max().item() <= TOLERANCE
        refined = torch.from_numpy(reference_pamr(guide[0].numpy(), logits.numpy()))
        assert (refined_b.double() - refined).abs().max().item() <= REFINED_TOLERANCE

        for expected_logits, labels in ((logits, labels_b), (refined, torch.from_numpy(outputs[i].label_map.astype(np.int64)))):
            classes, expected = reference_decide(expected_logits, list(owners), len(vocabulary))
            class_logits = torch.stack(
                [expected_logits[[q for q, o in enumerate(owners) if o == c]].amax(dim=0) for c in range(len(vocabulary))]
            )
            top2 = class_logits.topk(2, dim=0).values
            top = classes.amax(dim=0)
            decided = (top2[0] - top2[1] > LABEL_MARGIN) & ((top - 0.1).abs() > THRESHOLD_MARGIN)
            assert torch.equal(labels[decided], expected[decided])
            decided_total += int(decided.sum())
            pixels_total += decided.numel()
            winners += torch.bincount(expected.flatten(), minlength=len(vocabulary))
        # Probabilities: the authors' class probabilities, normalised over classes.
        expected_probabilities = (classes / classes.sum(dim=0, keepdim=True)).float()
        assert np.abs(outputs[i].probabilities - expected_probabilities.numpy()).max() <= 1e-3
        assert outputs[i].label_map.shape == photo.shape[:2]
    # Not degenerate (SPEC 6): most pixels decided, background and several classes win.
    assert decided_total / pixels_total > 0.8, decided_total / pixels_total
    assert winners[0] > 0 and int((winners[1:] > 0).sum()) >= 2, winners.tolist()
    assert winners.max() < 0.95 * winners.sum()


def test_neighbourhood_bias_is_the_gaussian_of_grid_distance():
    for gh, gw in ((3, 4), (7, 5), (21, 28)):
        bias = neighbourhood_bias(gh, gw, 5.0)
        assert bias.shape == (gh * gw + 1, gh * gw + 1)
        assert torch.count_nonzero(bias[0]) == 0 and torch.count_nonzero(bias[:, 0]) == 0
        if gh * gw <= 35:
            assert torch.allclose(bias, reference_bias(gh, gw, 5.0), atol=1e-7)
    bias = neighbourhood_bias(21, 28, 5.0)
    # Patch (2, 3) and patch (5, 7): distance^2 = 9 + 16 = 25, exp(-25 / 50).
    p, q = 1 + 2 * 28 + 3, 1 + 5 * 28 + 7
    assert bias[p, q].item() == pytest.approx(math.exp(-0.5), abs=1e-7)
    assert bias[p, p].item() == 1.0
    assert torch.equal(bias, bias.T)


def _cubic(t: float, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution weights (torch's bicubic, A = -0.75) of the 4 taps around t in [0, 1)."""

    def k(x: float) -> float:
        x = abs(x)
        if x <= 1:
            return (a + 2) * x**3 - (a + 3) * x**2 + 1
        if x < 2:
            return a * x**3 - 5 * a * x**2 + 8 * a * x - 4 * a
        return 0.0

    return np.array([k(t + 1), k(t), k(1 - t), k(2 - t)])


def _dino_resize_axis(table: np.ndarray, out: int, scale: float, axis: int) -> np.ndarray:
    """Bicubic along one axis with source coordinate (o + 0.5) / scale - 0.5, clamped taps."""
    n = table.shape[axis]
    slices = []
    for o in range(out):
        src = (o + 0.5) / scale - 0.5
        base = math.floor(src)
        weights = _cubic(src - base)
        taps = [min(max(base + d, 0), n - 1) for d in (-1, 0, 1, 2)]
        slices.append(sum(w * np.take(table, t, axis=axis) for w, t in zip(weights, taps)))
    return np.stack(slices, axis=axis)


def test_position_embedding_interpolation_follows_the_dino_rule():
    generator = torch.Generator().manual_seed(0)
    table = torch.randn(1 + 14 * 14, 8, generator=generator, dtype=torch.float64).float()
    assert resize_position_embedding(table, 14, 14) is table  # the trained grid keeps its table
    for gh, gw in ((21, 28), (21, 31), (9, 14), (14, 20)):
        resized = resize_position_embedding(table, gh, gw)
        assert resized.shape == (1 + gh * gw, 8)
        assert torch.equal(resized[0], table[0])
        grid = table[1:].double().numpy().reshape(14, 14, 8)
        expected = _dino_resize_axis(grid, gh, (gh + 0.1) / 14, axis=0)
        expected = _dino_resize_axis(expected, gw, (gw + 0.1) / 14, axis=1)
        assert np.abs(resized[1:].numpy().reshape(gh, gw, 8) - expected).max() < 1e-5


def test_pamr_moves_a_blurred_boundary_onto_the_colour_edge():
    height, width, edge = 32, 80, 40
    image = torch.zeros(1, 3, height, width)
    image[:, 0, :, :edge] = 1.0  # red | blue, a sharp edge at column 40
    image[:, 2, :, edge:] = 1.0
    columns = torch.arange(width, dtype=torch.float32)
    left = torch.sigmoid(-(columns - 34.0) / 4.0)  # blurred, and its boundary 6 px off the edge
    logits = torch.stack([left, 1.0 - left]).view(1, 2, 1, width).expand(1, 2, height, width).contiguous()
    expected = (columns >= edge).long().view(1, 1, width).expand(1, height, width)
    assert not torch.equal(logits.argmax(dim=1), expected)
    refined = pamr(image, logits, iterations=10, dilations=(8, 16))
    assert torch.equal(refined.argmax(dim=1), expected)


def test_pamr_is_batched_and_chunked_without_changing_the_answer():
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, 37, 45, generator=generator)
    logits = torch.randn(2, 7, 37, 45, generator=generator)
    whole = pamr(images, logits, iterations=3, dilations=(2, 4))
    chunked = pamr(images, logits, iterations=3, dilations=(2, 4), max_elements=1)
    assert torch.allclose(whole, chunked, atol=1e-6)
    for b in range(2):
        alone = pamr(images[b : b + 1], logits[b : b + 1], iterations=3, dilations=(2, 4))
        assert torch.allclose(whole[b : b + 1], alone, atol=1e-6)
    expected = reference_pamr(images[1].numpy(), logits[1].numpy(), iterations=3, dilations=(2, 4))
    assert np.abs(whole[1].double().numpy() - expected).max() < 1e-5


def test_forwards_are_bounded_by_tokens_not_images():
    # Sequence lengths: 336 x 500 inputs (652), 224 windows (197), a long photo (1300).
    tokens = [652, 197, 652, 1300, 589, 197]
    assert token_chunks(tokens, 1400, sort=True) == [[1, 5], [4, 0], [2], [3]]  # shortest first
    assert token_chunks(tokens, 1200, sort=False) == [[0], [1], [2], [3], [4, 5]]  # in order; 1300 alone
    assert token_chunks([197] * 7, 3 * 197, sort=False) == [[0, 1, 2], [3, 4, 5], [6]]


def test_windows_cover_the_image_as_the_reference_clamps_them():
    boxes = window_boxes(336, 450, 224, 112)
    assert len(boxes) == 2 * 4  # rows: (336 - 224 + 111) // 112 + 1; columns: (450 - 224 + 111) // 112 + 1
    assert boxes[2] == (0, 224, 224, 448)
    assert boxes[-1] == (112, 336, 226, 450)
    coverage = np.zeros((336, 450), dtype=int)
    for y1, y2, x1, x2 in boxes:
        assert (y2 - y1, x2 - x1) == (224, 224)
        coverage[y1:y2, x1:x2] += 1
    assert coverage.min() >= 1
    assert window_boxes(150, 500, 224, 112)[0] == (0, 150, 0, 224)  # smaller than a window: no padding


def test_naclip_vocabularies_query_the_authors_words():
    voc = load_vocabulary("naclip-voc21")
    words, owners = query_words(voc)
    assert len(voc) == 21 and len(words) == 56
    assert "background" not in words and words[:3] == ("sky", "wall", "tree")
    assert [words[i] for i, o in enumerate(owners) if o == voc.class_names.index("tv monitor")] == [
        "television monitor", "tv monitor", "monitor", "television", "screen"
    ]
    for name, word in (("boat", "ship"), ("dining table", "table"), ("potted plant", "pottedplant")):
        assert [words[i] for i, o in enumerate(owners) if o == voc.class_names.index(name)] == [word]
    assert owners == tuple(sorted(owners))
    coco = load_vocabulary("naclip-coco-object")
    words, owners = query_words(coco)
    assert len(coco) == 81 and coco.class_names[1:] == load_vocabulary("coco").class_names[1:]
    # The authors' configs/cls_coco_object.txt, word for word: one class a line, queries comma-separated.
    authors = [line.split(", ") for line in COCO_OBJECT_CLASS_FILE.strip().split("\n")]
    assert [[w for w, o in zip(words, owners) if o == c] for c in range(len(coco))] == authors
    corrected = load_vocabulary("naclip-coco-object-bed")
    words_bed, owners_bed = query_words(corrected)
    assert [[w for w, o in zip(words_bed, owners_bed) if o == c] for c in range(len(coco))] == (
        [[w for w in authors[0] if w != "bed"]] + authors[1:]
    )
    # A vocabulary file: every synonym is a query; background's synonyms replace the word itself.
    from clipdiy.segmentation.vocabulary import Vocabulary

    custom = Vocabulary.from_names("mine", [("background", "sky", "grass"), ("cat", "kitten"), "dog"])
    assert query_words(custom) == (("sky", "grass", "cat", "kitten", "dog"), (0, 0, 1, 1, 2))
    assert load_vocabulary("naclip-voc21").content_hash != load_vocabulary("voc").content_hash


def test_coco_object_ties_bed_to_background_as_the_authors_list_does(tiny_clip_config):
    """The authors' list queries "bed" for background and for the class bed: where it wins, the
    two classes tie and the lower index (background) takes the pixel; the -bed variant lets bed win."""
    from clipdiy.segmentation.models.clip import create_clip_model

    clip = create_clip_model(tiny_clip_config)
    generator = torch.Generator().manual_seed(0)
    for name, bed_wins in (("naclip-coco-object", False), ("naclip-coco-object-bed", True)):
        vocabulary = load_vocabulary(name)
        words, owners = query_words(vocabulary)
        text = torch.nn.functional.normalize(torch.randn(len(words), 64, generator=generator), dim=-1)
        config = SegmenterConfig(method="naclip", vocabulary=name, clip=tiny_clip_config, refine="none")
        method = Segmenter(clip, None, vocabulary, config, text_embeddings=text).method
        # One map per listed word, as the authors' code has them (a word listed twice: two equal maps).
        per_word = torch.rand(len(words), 6, 8, generator=generator, dtype=torch.float64) * 0.1
        beds = [i for i, w in enumerate(words) if w == "bed"]
        per_word[beds] = per_word[beds[0]].clone()  # one word, one map
        per_word[beds, :, :4] = 0.5  # "bed" wins the left half
        per_word[words.index("person in dress"), :, 4:] = 0.3
        unique = list(dict.fromkeys(words))
        per_unique = torch.stack([per_word[words.index(u)] for u in unique]).float()
        with torch.inference_mode():
            decision = method.decide(per_unique[None], None)
        classes, expected = reference_decide(per_word, list(owners), len(vocabulary))
        assert torch.equal(decision.labels[0], expected)
        difference = (decision.probabilities[0].double() - classes / classes.sum(dim=0)).abs()
        assert difference.max() < 1e-6, (difference.max(), difference.amax(dim=(1, 2)).argmax())
        bed = vocabulary.class_names.index("bed")
        assert (expected[:, :4] == (bed if bed_wins else 0)).all()
        assert (expected[:, 4:] == vocabulary.class_names.index("person")).all()


def test_query_embeddings_average_the_80_templates(tiny_clip_config):
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    from clipdiy.segmentation.models.clip import create_clip_model

    clip = create_clip_model(tiny_clip_config)
    vocabulary = load_vocabulary("naclip-voc21")
    config = SegmenterConfig(method="naclip", vocabulary="naclip-voc21", clip=tiny_clip_config)
    segmenter = Segmenter(clip, None, vocabulary, config)
    words, _ = query_words(vocabulary)
    assert segmenter.text_embeddings.shape[0] == len(words)
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    for index in (0, 45, 55):
        prompts = [template(words[index]) for template in OPENAI_IMAGENET_TEMPLATES]
        each = clip.encode_text(prompts)
        each = each / each.norm(dim=-1, keepdim=True)
        mean = each.mean(dim=0)
        assert torch.allclose(segmenter.text_embeddings[index].cpu(), mean / mean.norm(), atol=1e-5)


def test_naclip_defaults_and_options():
    config = SegmenterConfig(method="naclip")
    assert (config.clip.model, config.clip.pretrained) == ("ViT-B-16", "openai")
    assert config.refinement == "pamr" and SegmenterConfig().refinement is None
    assert SegmenterConfig(refine="pamr").refinement == "pamr"
    assert SegmenterConfig(method="naclip", refine="none").refinement is None
    with pytest.raises(ValueError, match="refine"):
        SegmenterConfig(refine="crf")
    from clipdiy.segmentation.methods import method_entry

    with pytest.raises(ValueError, match="unknown segmentation method 'sam'.*clipdiy, naclip"):
        method_entry("sam")
