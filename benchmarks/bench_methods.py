"""Images/s of each segmentation method on the same photos, and where the time goes, offline.

    python benchmarks/bench_methods.py --images 4
    python benchmarks/bench_methods.py --images 32 --batch 32 --naclip-clip tiny --only naclip-whole-nopamr,naclip-slide-nopamr

On the sample COCO photos at their own size (tests/data/coco-val2017-sample) with random-init
models of the real architectures (tests/model_factories.py; random weights cost exactly what real
ones do), loaded through ``create_segmenter``, it runs in one process:

- clipdiy, faithful, saliency FOUND (random ViT-S/8 + the real head) and saliency none;
- naclip (random ViT-B/16) with the whole image in one forward and with 224/112 sliding windows,
  each with and without PAMR (vocabulary naclip-voc21: 56 query words);
- trident (random ViT-B/16, DINO ViT-B/16 and SAM ViT-B; vocabulary trident-voc21: 46 query
  words; float32), without SAM refinement (``trident``) and with it (``trident-sam``; the random
  decoder's IoU head is stretched around the 0.8 cut-off as the tests do, so that it keeps about
  half the masks, as a trained one keeps its confident ones).

``--gpu-tflops`` turns each method's FLOPs per image into a GPU estimate (images/s at that
sustained rate; the default 100 TFLOP/s is about a quarter of an H100's dense fp16/bf16 tensor
peak, or TF32's, the rate large ViT matmuls reach in practice).

For each it prints images/s of ``Segmenter.segment``, the share of the time inside the model
forwards (CLIP/DINO, NACLIP's encoder), inside the refinement (PAMR, or Trident's SAM refinement
with its decoder) and everything else, and the FLOPs per image of the method's model forwards
and refinement (torch's FlopCounterMode: matmuls, convolutions, attention),
averaged over the photos (each counted alone; their range is printed too); for NACLIP also the
encoder forwards: images per forward (how much work one launch gets on a GPU) and rows per
forward (images, or 224-px windows when sliding).
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
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from model_factories import SAMPLE_IMAGES, make_clip_config, make_saliency_config, make_trident_config, stretch_sam_iou_head

import clipdiy.segmentation.refine
import clipdiy.segmentation.sam_refine
from clipdiy.segmentation.config import NaclipConfig, SaliencyConfig, SegmenterConfig
from clipdiy.segmentation.segmenter import create_segmenter


class Meter:
    """Wraps a callable: adds up wall time; while ``counting``, also the FLOPs it runs."""

    def __init__(self, function):
        self.function = function
        self.seconds = 0.0
        self.flops = 0
        self.counting = False
        self.calls = 0
        self.items = 0  # batch rows of the first argument, over all calls

    def _items(self, args) -> int:
        first = args[0] if args else None
        if isinstance(first, torch.Tensor):
            return int(first.shape[0])
        if isinstance(first, (list, tuple)):
            return len(first)
        return 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        self.items += self._items(args)
        start = time.perf_counter()
        if self.counting:
            with FlopCounterMode(display=False) as counter:
                out = self.function(*args, **kwargs)
            self.flops += counter.get_total_flops()
        else:
            out = self.function(*args, **kwargs)
        self.seconds += time.perf_counter() - start
        return out

    def reset(self) -> None:
        self.seconds = 0.0
        self.flops = 0
        self.calls = 0
        self.items = 0


def load_images(count: int) -> list[np.ndarray]:
    paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:count]
    return [np.array(Image.open(path).convert("RGB")) for path in paths]


def instrument(segmenter) -> list[Meter]:
    """Meters around the model forwards of the segmenter's method."""
    meters = []
    method = segmenter.method
    if segmenter.scorer is not None:  # clipdiy: CLIP's crop forwards and the saliency model
        segmenter.scorer.encode_image = Meter(segmenter.scorer.encode_image)
        meters.append(segmenter.scorer.encode_image)
        if getattr(method.saliency, "needs_pixels", True):
            method.saliency = Meter(method.saliency)
            meters.append(method.saliency)
    elif method.name == "trident":  # CLIP and DINO over the windows; SAM's encoder and the aggregation
        method._window_values = Meter(method._window_values)
        import clipdiy.segmentation.models.trident as trident_models  # _sam_stream imports these at call time

        for name in ("sam_last_attention", "sam_guided_weights"):
            meter = getattr(trident_models, name)
            if not isinstance(meter, Meter):
                setattr(trident_models, name, Meter(meter))
            meters.append(getattr(trident_models, name))
        method.encoder.aggregate = Meter(method.encoder.aggregate)
        meters += [method._window_values, method.encoder.aggregate]
    else:  # naclip: the encoder (blocks 1-11 and the reduced last block)
        method.encoder.forward = Meter(method.encoder.forward)
        meters.append(method.encoder.forward)
    return meters


def random_text(config: SegmenterConfig, width: int) -> torch.Tensor:
    """Random unit text embeddings of the right count: the ViT-B/16 text tower over NACLIP's
    56 x 80 prompts takes minutes on a CPU, and the image side's cost does not depend on them."""
    from clipdiy.segmentation.methods.naclip import query_words
    from clipdiy.segmentation.vocabulary import load_vocabulary

    vocabulary = load_vocabulary(config.vocabulary)
    rows = len(query_words(vocabulary)[0]) if config.method in ("naclip", "trident") else len(vocabulary)
    return torch.nn.functional.normalize(torch.randn(rows, width, generator=torch.Generator().manual_seed(0)), dim=-1)


def bench(name: str, config: SegmenterConfig, images: list[np.ndarray], batch: int, pamr_meter: Meter, width: int = 512,
          gpu_tflops: float = 100.0, sam_meter: Meter | None = None) -> float:
    segmenter = create_segmenter(config, text_embeddings=random_text(config, width))
    meters = instrument(segmenter)
    refine_meters = [pamr_meter]
    if getattr(segmenter.method, "refine", False) is True:  # trident-sam: the refinement's FLOPs count too
        stretch_sam_iou_head(segmenter.method.sam)
        refine_meters.append(sam_meter)
    flop_meters = meters + refine_meters[1:]
    segmenter.segment(images[:1])  # warm-up: allocations, caches
    # FLOPs of every image (their sizes differ, and so do the forwards), one image a call, in a
    # pass of their own: the counter's overhead stays out of the timed pass below.
    for meter in flop_meters:
        meter.counting = True
    per_image = []
    for image in images:
        for meter in flop_meters:
            meter.reset()
        segmenter.segment([image])
        per_image.append(sum(meter.flops for meter in flop_meters))
    flops = sum(per_image) / len(per_image)
    for meter in flop_meters:
        meter.counting = False
        meter.reset()
    for meter in refine_meters:
        meter.reset()
    start = time.perf_counter()
    for first in range(0, len(images), batch):
        segmenter.segment(images[first : first + batch])
    total = time.perf_counter() - start
    forwards = sum(meter.seconds for meter in meters)
    refine = sum(meter.seconds for meter in refine_meters)
    rest = total - forwards - refine
    line = (
        f"{name:34s} {len(images) / total:7.3f} images/s  forwards {forwards / total:6.1%}  refine {refine / total:6.1%}  "
        f"else {rest / total:6.1%}  forward+refine FLOPs/image {flops / 1e9:7.1f} G "
        f"(mean of {len(per_image)}: {min(per_image) / 1e9:.1f} to {max(per_image) / 1e9:.1f} G)"
        f"  GPU estimate at {gpu_tflops:g} TFLOP/s: {gpu_tflops * 1e12 / flops:7.1f} images/s"
    )
    if segmenter.scorer is None and segmenter.method.name == "naclip":  # naclip: how much work each encoder forward gets
        calls, rows = meters[0].calls, meters[0].items
        line += f"  encoder forwards {calls}: images/forward {len(images) / calls:5.1f}, rows/forward {rows / calls:6.1f}"
    print(line, flush=True)
    return len(images) / total


def forward_plan(images: list[np.ndarray], budget: int, window: str) -> str:
    """Images (and rows) per ViT-B/16 forward NACLIP plans for these photos in one batch under a token budget."""
    from clipdiy.segmentation.methods.naclip import naclip_input_size, token_chunks, window_boxes

    config = NaclipConfig()
    sizes = [naclip_input_size(*image.shape[:2], config) for image in images]
    if window == "whole":
        tokens = [1 + (h // 16) * (w // 16) for h, w in sizes]
    else:
        tokens = [1 + 14 * 14 for h, w in sizes for _ in window_boxes(h, w, config.window_size, config.window_stride)]
    forwards = len(token_chunks(tokens, budget, sort=window == "whole"))
    return f"{window}: {forwards} forwards, images/forward {len(images) / forwards:.1f}, rows/forward {len(tokens) / forwards:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=4, help="photos per method (max 32)")
    parser.add_argument("--batch", type=int, default=4, help="images per segment() call")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip", default="", help="comma-separated names of runs to skip (e.g. clipdiy-found)")
    parser.add_argument("--only", default="", help="comma-separated names of the only runs to do (e.g. naclip-whole-pamr)")
    parser.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temp dir)")
    parser.add_argument(
        "--naclip-clip", choices=("ViT-B-16", "tiny"), default="ViT-B-16",
        help="NACLIP's CLIP: the real architecture, or the tests' tiny one (two 64-wide layers, 32-px "
        "patches: the model costs almost nothing, what is left is everything around it)",
    )
    parser.add_argument("--forward-tokens", type=int, default=None, help="NACLIP's max_forward_tokens (default: the device's)")
    parser.add_argument("--gpu-tflops", type=float, default=100.0, help="sustained GPU rate for the FLOPs-based estimate")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    only = set(filter(None, args.only.split(",")))
    images = load_images(args.images)
    sizes = sorted({image.shape[:2] for image in images})
    print(f"{len(images)} photos of sizes {sizes}, batch {args.batch}, {torch.get_num_threads()} CPU threads, device cpu")
    for budget, device in ((8192, "CPU"), (32768, "CUDA")):
        plans = "; ".join(forward_plan(images[: args.batch], budget, window) for window in ("whole", "slide"))
        print(f"NACLIP ViT-B/16 forwards of the first batch at {budget} tokens ({device} default): {plans}")
    pamr_meter = Meter(clipdiy.segmentation.refine.pamr)
    clipdiy.segmentation.refine.pamr = pamr_meter  # the segmenter imports it at call time
    sam_meter = Meter(clipdiy.segmentation.sam_refine.sam_refine)
    clipdiy.segmentation.sam_refine.sam_refine = sam_meter  # Trident's decide imports it at call time

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        b32 = make_clip_config(workdir / "clip-b32", arch="ViT-B-32")
        b16 = make_clip_config(workdir / f"clip-{args.naclip_clip}", arch=args.naclip_clip)
        naclip_width = 64 if args.naclip_clip == "tiny" else 512
        found = make_saliency_config(workdir / "found")
        clipdiy_config = SegmenterConfig(vocabulary="voc", clip=b32, device="cpu")
        runs = {
            "clipdiy-found": replace(clipdiy_config, saliency=found),
            "clipdiy-found-pamr": replace(clipdiy_config, saliency=found, refine="pamr"),
            "clipdiy-none": replace(clipdiy_config, saliency=SaliencyConfig(backend="none")),
            "clipdiy-none-pamr": replace(clipdiy_config, saliency=SaliencyConfig(backend="none"), refine="pamr"),
        }
        forward_tokens = {} if args.forward_tokens is None else {"max_forward_tokens": args.forward_tokens}
        for window in ("whole", "slide"):
            for refine in ("pamr", "none"):
                runs[f"naclip-{window}-{'pamr' if refine == 'pamr' else 'nopamr'}"] = SegmenterConfig(
                    method="naclip", vocabulary="naclip-voc21", clip=b16, device="cpu",
                    naclip=NaclipConfig(window=window, **forward_tokens), refine=refine,
                )
        if (not only or {"trident", "trident-sam"} & only) and not {"trident", "trident-sam"} <= skip:
            vitb16 = b16 if args.naclip_clip == "ViT-B-16" else make_clip_config(workdir / "clip-ViT-B-16", arch="ViT-B-16")
            for name, refine in (("trident", "none"), ("trident-sam", "sam")):
                runs[name] = SegmenterConfig(
                    method="trident", vocabulary="trident-voc21", clip=vitb16, device="cpu",
                    trident=make_trident_config(workdir / "trident"), refine=refine,
                )
        rates = {}
        for name, config in runs.items():
            if name not in skip and (not only or name in only):
                width = naclip_width if name.startswith("naclip") else 512
                rates[name] = bench(name, config, images, args.batch, pamr_meter, width, args.gpu_tflops, sam_meter)
        if "clipdiy-found" in rates and "naclip-whole-pamr" in rates:
            print(f"naclip whole (PAMR) / clipdiy faithful with FOUND: {rates['naclip-whole-pamr'] / rates['clipdiy-found']:.2f}x  (target >= 3x)")


if __name__ == "__main__":
    main()
