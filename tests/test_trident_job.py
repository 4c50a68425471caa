"""``jobs/label.py --method trident --refine sam`` end to end on two small photos through a local Ray.

Rows record the method, its refinement and its weights, and their masks decode to the label maps
``Segmenter.segment`` gives for the same photos. DINO ViT-B/16 and SAM ViT-B are random models of
the real architectures; CLIP is a tiny two-layer ViT with 16-px patches (its grid must match
DINO's, as ViT-B/16's does) so that the driver's text embeddings take seconds, not minutes.
"""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from pipeline_support import REPO_ROOT, check_rows_match_library, cli_args, read_all_rows, reference_label_maps

from clipdiy.segmentation.config import ClipConfig, SaliencyConfig, SegmenterConfig

pytestmark = pytest.mark.slow

SIZES = ((161, 121), (121, 161))
TINY16 = "clipdiy-test-tiny16"
TINY16_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def small_photos(coco_images, tmp_path_factory):
    folder = tmp_path_factory.mktemp("trident-photos")
    for path, size in zip(coco_images[:2], SIZES):
        with Image.open(path) as image:
            image.convert("RGB").resize(size, Image.BILINEAR).save(folder / path.name, quality=95)
    return folder


@pytest.fixture(scope="module")
def tiny16_clip(tmp_path_factory) -> ClipConfig:
    import open_clip

    folder = tmp_path_factory.mktemp("tiny16")
    config_path = folder / f"{TINY16}.json"
    config_path.write_text(json.dumps(TINY16_CONFIG))
    open_clip.add_model_config(str(config_path))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(TINY16, pretrained=None)
    checkpoint = folder / "tiny16.pt"
    torch.save(model.state_dict(), checkpoint)
    return ClipConfig(model=TINY16, pretrained=None, checkpoint=str(checkpoint), model_config=str(config_path))


def run_cli(argv: list[str]) -> int:
    import sys

    sys.path.insert(0, str(REPO_ROOT / "jobs"))
    try:
        import label
    finally:
        sys.path.pop(0)
    return label.main(argv)


def test_label_job_with_trident_labels_a_folder(small_photos, tiny16_clip, tmp_path_factory, tmp_path):
    import ray
    from model_factories import make_trident_config

    trident = make_trident_config(tmp_path_factory.mktemp("trident-weights"))
    vocabulary = tmp_path / "pets.txt"
    vocabulary.write_text("background\ncat\ndog\nperson\n")
    output = tmp_path / "labels"
    argv = cli_args(small_photos, output, tiny16_clip, "--method", "trident", "--vocabulary", str(vocabulary),
                    "--trident-dino-checkpoint", trident.dino_checkpoint, "--sam-checkpoint", trident.sam_checkpoint,
                    "--refine", "sam", "--batch-size", "2")[2:]
    # address="local": a Ray of its own even where another is running on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        assert run_cli(argv) == 0
    finally:
        ray.shutdown()

    rows = read_all_rows(output).to_pylist()
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows), [r.get("error") for r in rows]
    refine = "sam:vit_b:coarse=0.2:area=225:iou=0.8:mask=0.005"  # the base setting: a vocabulary file
    assert {(r["method"], r["refine"], r["mode"], r["saliency_backend"]) for r in rows} == {("trident", refine, "slide:336/224", "none")}
    assert all(r["saliency_weights"].startswith("dino=sha256:") and ";sam=sha256:" in r["saliency_weights"] for r in rows)
    config = SegmenterConfig(
        method="trident", vocabulary=str(vocabulary), clip=tiny16_clip, saliency=SaliencyConfig(backend="none"), trident=trident,
        refine="sam",
    )
    reference, segmenter = reference_label_maps(config, sorted(small_photos.glob("*.jpg")))
    check_rows_match_library(rows, reference, segmenter)
