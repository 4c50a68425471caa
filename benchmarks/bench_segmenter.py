"""Time the batched segmenter against the per-crop reference transcription, offline.

    python benchmarks/bench_segmenter.py --images 8 --reference-images 2

Runs on the sample COCO photos (tests/data/coco-val2017-sample) with a random-init,
discriminative ViT-B-32 and FOUND (real head, random-init ViT-S/8), built by
``tests/model_factories.py`` and loaded through ``create_segmenter`` like a user's checkpoints.
Random weights cost exactly what real ones do. For each device (CPU, and CUDA when present) it
prints images/s of ``Segmenter.segment`` and of ``tests/reference_clipdiy.py`` (one CLIP forward
per crop), the time inside CLIP's and DINO's forwards, and the share of the batched path spent
outside them.
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
from reference_clipdiy import reference_segment

from clipdiy.segmentation.config import SegmenterConfig
from clipdiy.segmentation.segmenter import create_segmenter


class Stopwatch:
    """Wraps a callable and adds up the wall time spent in it (synchronising CUDA around it)."""

    def __init__(self, function, device: torch.device):
        self.function = function
        self.device = device
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self._sync()
        start = time.perf_counter()
        out = self.function(*args, **kwargs)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out

    def reset(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class ForwardTimers:
    """Stopwatches put on a segmenter's CLIP image forward (``clip``) and, when it has one, its
    saliency model (``dino``, else None); ``reset`` after a warm-up."""

    def __init__(self, segmenter, device: torch.device, saliency: bool):
        self.clip = Stopwatch(segmenter.scorer.encode_image, device)
        segmenter.scorer.encode_image = self.clip
        self.dino = None
        if saliency:
            self.dino = Stopwatch(segmenter.saliency, device)
            segmenter.saliency = self.dino

    @property
    def seconds(self) -> float:
        """CLIP plus DINO forward seconds since the last reset."""
        return self.clip.seconds + (self.dino.seconds if self.dino else 0.0)

    def reset(self) -> None:
        self.clip.reset()
        if self.dino:
            self.dino.reset()


def gemm_rate(device: torch.device, rows: int, width: int, repeats: int = 5) -> float:
    """GFLOP/s of the ViT's biggest matmul (``rows`` tokens x width -> 4 * width, the MLP's first
    layer) on ``device``: what one forward's linear layers can run at, for that many tokens."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randn(rows, width, generator=generator).to(device)
    weight = torch.randn(4 * width, width, generator=generator).to(device)
    bias = torch.zeros(4 * width, device=device)
    torch.nn.functional.linear(tokens, weight, bias)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(tokens, weight, bias)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return 2.0 * rows * width * 4 * width * repeats / (time.perf_counter() - start) / 1e9


def print_gemm_ceiling(device: torch.device, clip, crop_batch: int) -> None:
    """What batching can gain on this device: matmul speed at the batched forward's token count
    over the speed at one crop's. Batching does the same arithmetic, only faster, so beyond this
    ratio the batched path gains only by doing less (the class-token-only last block) and by
    skipping the reference's per-crop PIL work."""
    visual = clip.model.visual
    width = int(visual.transformer.width)
    grid = visual.grid_size if hasattr(visual, "grid_size") else (clip.image_size // 32,) * 2
    tokens = int(grid[0]) * int(grid[1]) + 1
    one = gemm_rate(device, tokens, width)
    batched = gemm_rate(device, tokens * crop_batch, width)
    print(f"  matmul {tokens} x {width} -> {4 * width}: {one:6.1f} GFLOP/s for 1 crop, {batched:6.1f} for "
          f"{crop_batch} crops ({batched / one:4.2f}x: what batching alone can gain on CLIP's arithmetic)")


def load_images(count: int) -> list[np.ndarray]:
    paths = sorted(SAMPLE_IMAGES.glob("*.jpg"))[:count]
    if len(paths) < count:
        raise SystemExit(f"only {len(paths)} sample photos in {SAMPLE_IMAGES}")
    return [np.array(Image.open(path).convert("RGB")) for path in paths]


def bench_device(device: torch.device, args, config: SegmenterConfig) -> None:
    segmenter = create_segmenter(replace(config, device=str(device)))
    timers = ForwardTimers(segmenter, device, saliency=config.saliency.backend != "none")
    clip_timer, dino_timer = timers.clip, timers.dino
    images = load_images(args.images)

    segmenter.segment(images[:1])  # warm-up: allocations, kernel selection
    timers.reset()
    start = time.perf_counter()
    for first in range(0, len(images), args.batch):
        segmenter.segment(images[first : first + args.batch])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    clip_s = clip_timer.seconds
    dino_s = dino_timer.seconds if dino_timer else 0.0
    crops = 59 * len(images)

    print(f"\n== {device} ({torch.get_num_threads()} CPU threads), {len(images)} photos, "
          f"batch {args.batch} images, crop batch {segmenter.scorer.crop_batch_size}, saliency {config.saliency.backend}"
          f" (max side {config.saliency.max_side or 'full resolution'})")
    print(f"batched  Segmenter.segment: {len(images) / total:7.3f} images/s  ({total:.1f} s)")
    print(f"  CLIP forwards:  {clip_s:7.1f} s  ({clip_timer.calls} forwards, {crops / clip_s:.1f} crops/s, "
          f"{len(images) / clip_s:.3f} images/s alone)  {clip_s / total:6.1%}")
    if dino_timer:
        print(f"  DINO forwards:  {dino_s:7.1f} s  ({dino_timer.calls} forwards)  {dino_s / total:6.1%}")
    outside = total - clip_s - dino_s
    print(f"  outside CLIP+DINO: {outside:5.1f} s  {outside / total:6.1%}  (target < 25%)")
    print_gemm_ceiling(device, segmenter.clip, segmenter.scorer.crop_batch_size)

    if args.reference_images <= 0:
        return
    # The reference: one image at a time, one CLIP forward per crop, PIL resizes, same models.
    clip = segmenter.clip
    plain_forward = clip.model.encode_image  # open_clip's whole forward per crop, as the reference runs CLIP
    saliency = dino_timer.function if dino_timer else None
    text = segmenter.text_embeddings
    reference_images = images[: args.reference_images]
    start = time.perf_counter()
    for image in reference_images:
        with torch.inference_mode():
            if saliency is not None:
                pixels = torch.from_numpy(image).permute(2, 0, 1)[None].to(device).float() / 255.0
                s = saliency(pixels)[0, 0].float().cpu().numpy()
            else:
                s = np.ones(image.shape[:2], np.float32)
            reference_segment(image, lambda x: plain_forward(x.to(device, clip.dtype)).cpu(), text.cpu(), s)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    reference_total = time.perf_counter() - start
    reference_rate = len(reference_images) / reference_total
    print(f"per-crop reference:         {reference_rate:7.3f} images/s  ({reference_total:.1f} s, "
          f"{len(reference_images)} photos)")
    print(f"speed-up batched / reference: {len(images) / total / reference_rate:5.2f}x  (target >= 3x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8, help="photos for the batched path (max 32)")
    parser.add_argument("--reference-images", type=int, default=2, help="photos for the per-crop reference")
    parser.add_argument("--batch", type=int, default=8, help="images per segment() call")
    parser.add_argument("--crop-batch-size", type=int, default=None, help="default: the segmenter's (256 GPU, 32 CPU)")
    parser.add_argument("--saliency", choices=("found", "none"), default="found")
    parser.add_argument("--saliency-max-side", type=int, default=None,
                        help="FOUND input's longer side (default: full resolution, the faithful setting)")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--workdir", default=None, help="where the random checkpoints go (default: a temp dir)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(args.workdir or tmp)
        clip_config = make_clip_config(workdir / "clip", arch="ViT-B-32")
        config = SegmenterConfig(vocabulary="voc", clip=clip_config, crop_batch_size=args.crop_batch_size)
        if args.saliency == "found":
            found = make_saliency_config(workdir / "found")
            config = replace(config, saliency=replace(found, max_side=args.saliency_max_side))
        else:
            config = replace(config, saliency=replace(config.saliency, backend="none"))
        devices = []
        if args.device in ("all", "cpu"):
            devices.append(torch.device("cpu"))
        if args.device in ("all", "cuda") and torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        for device in devices:
            bench_device(device, args, config)


if __name__ == "__main__":
    main()
