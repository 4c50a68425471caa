"""How far a reduced precision moves CLIP-DIY's labels, offline (issue 11.3).

    flock /work/wt/heavy.lock python benchmarks/bench_precision.py --images 32 --precision bf16

(about 4 minutes for all 32 photos on a 2-core CPU, fp32 2.5 of them; ``--images 8`` for a quick
look. On a shared machine run it under ``flock`` as above so it does not compete with others.)

Runs the sample COCO photos (tests/data/coco-val2017-sample) through ``create_segmenter``
twice: in float32 (faithful, SPEC 3.6) and in ``--precision`` (bf16 or fp16), with the same
random-init, *discriminative* ViT-B-32 (SPEC 6, ``tests/model_factories.py``) and FOUND (the real
head on a random-init ViT-S/8), every model, text embeddings included, in that precision, as a
run with ``--precision`` would. It prints the share of pixels whose label changes, counted where
the float32 run's top-1 minus top-2 fused score exceeds ``--margin`` (1e-3; elsewhere a tie
decides), and over all pixels, at the model resolution (256 x 256, where the label is decided;
the original-size map is its nearest-neighbour resize). The margin is that of the fused scores
(S weighted by saliency, the softmax's input; = the gap of log P), as the faithfulness tests use.

Random weights are not real ones: the figure says how much the arithmetic moves a method of this
shape, not what real CLIP/DINO weights would do. On a CPU bf16 runs through oneDNN (AMX where the
CPU has it); fp16 on a CPU is slow and only meaningful on a GPU (``--device cuda``).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from model_factories import SAMPLE_IMAGES, make_clip_config, make_saliency_config

from clipdiy.segmentation.config import SegmenterConfig
from clipdiy.segmentation.prepared import prepare_image
from clipdiy.segmentation.segmenter import create_segmenter


def run(config: SegmenterConfig, prepared: list, batch: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(labels N x h x w, top-1 minus top-2 fused score N x h x w, seconds) of every photo.

    The fused score is the softmax's input, S weighted by saliency (SPEC 3.2); its gap is the gap
    of log P, as tests/test_faithfulness.py measures it.
    """
    segmenter = create_segmenter(config)
    labels, margins = [], []
    start = time.perf_counter()
    for first in range(0, len(prepared), batch):
        for output in segmenter.predict(prepared[first : first + batch], return_probabilities=True):
            top2 = np.sort(np.log(np.maximum(output.probabilities, 1e-30)), axis=0)[-2:]
            labels.append(output.label_map.astype(np.int64))
            margins.append(top2[1] - top2[0])
    seconds = time.perf_counter() - start
    return np.stack(labels), np.stack(margins), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=32, help="sample photos to use (max 32)")
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16", help="the reduced precision")
    parser.add_argument("--margin", type=float, default=1e-3, help="count pixels whose float32 top-1/top-2 fused-score gap exceeds this")
    parser.add_argument("--saliency", choices=("found", "none"), default="found")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4, help="images per predict() call")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))[: args.images]
    prepared = []
    for path in paths:
        with Image.open(path) as image:
            prepared.append(prepare_image(image))
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        config = SegmenterConfig(vocabulary="voc", clip=make_clip_config(workdir / "clip", arch="ViT-B-32"), device=args.device)
        if args.saliency == "found":
            config = replace(config, saliency=make_saliency_config(workdir / "found"))
        else:
            config = replace(config, saliency=replace(config.saliency, backend="none"))
        full_labels, full_margin, full_seconds = run(config, prepared, args.batch)
        low_labels, _, low_seconds = run(replace(config, precision=args.precision), prepared, args.batch)

    decided = full_margin > args.margin
    changed = full_labels != low_labels
    winners = np.bincount(full_labels.ravel(), minlength=21)
    saliency = "FOUND (random ViT-S/8, real head)" if args.saliency == "found" else "no saliency"
    print(f"{len(paths)} sample photos, random discriminative ViT-B-32 + {saliency}, "
          f"device {args.device}, {torch.get_num_threads()} threads")
    print(f"fp32 {full_seconds:.1f} s, {args.precision} {low_seconds:.1f} s")
    print(f"classes winning pixels in fp32: {int((winners > 0).sum())} of 21 "
          f"(largest share {winners.max() / winners.sum():.1%})")
    print(f"pixels with fp32 top-1/top-2 margin > {args.margin:g}: {decided.mean():.2%}")
    print(f"labels changed by {args.precision} where margin > {args.margin:g}: {changed[decided].mean():.3%} "
          f"({int(changed[decided].sum())} of {int(decided.sum())} pixels)")
    print(f"labels changed by {args.precision}, all pixels: {changed.mean():.3%}")


if __name__ == "__main__":
    main()
