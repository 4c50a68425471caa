"""NACLIP on a GPU, for ``benchmarks/gpu_check.sh``: the whole-image and sliding-window settings,
each with and without PAMR, on photos of mixed sizes.

For each setting it prints images/s (one process on one GPU: images/s per GPU), images per
encoder forward (and the encoder's inputs per forward: windows in the sliding setting), the
share of the time outside the encoder forwards (pre/post-processing, upsampling, PAMR, the
decision, transfers), and the GPU memory peak. The photos: the 32 COCO sample photos plus copies
of some at 0.6x, 1.5x and 2x (up to 1280 px), so that a batch mixes many sizes. The model: a
random-init ViT-B/16 (NACLIP's architecture; random weights cost what real ones do) loaded
through the checkpoint path, random unit text embeddings of naclip-voc21's 56 query words.

    python benchmarks/gpu_naclip_check.py                       # CUDA (exit 2 without it)
    python benchmarks/gpu_naclip_check.py --device cpu --dry    # smoke test of the code paths:
                                                                # tiny CLIP, 4 small photos
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))

#: (setting name, NACLIP window, refine)
SETTINGS = (("whole", "whole", "none"), ("whole+pamr", "whole", "pamr"),
            ("slide", "slide", "none"), ("slide+pamr", "slide", "pamr"))


def mixed_photos(count: int | None, dry: bool) -> list[np.ndarray]:
    """H x W x 3 uint8 photos of many sizes (see the module docstring); ``dry``: 4 photos of
    at most 96 px, so that the CPU smoke run costs seconds."""
    import cv2
    from PIL import Image, ImageOps

    paths = sorted((REPO_ROOT / "tests/data/coco-val2017-sample/images").glob("*.jpg"))
    photos = []
    for path in paths:
        with Image.open(path) as image:
            photos.append(np.asarray(ImageOps.exif_transpose(image).convert("RGB")))
    scaled = []
    for index, factor in ((0, 0.6), (1, 1.5), (2, 2.0), (3, 0.6), (4, 1.5), (5, 2.0), (6, 0.6), (7, 1.5)):
        photo = photos[index]
        size = (round(photo.shape[1] * factor), round(photo.shape[0] * factor))
        scaled.append(cv2.resize(photo, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR))
    photos += scaled
    photos = [photos[i] for i in np.random.default_rng(0).permutation(len(photos))]  # sizes mixed in every batch
    if dry:
        photos = [cv2.resize(p, (max(16, p.shape[1] // 8), max(16, p.shape[0] // 8)), interpolation=cv2.INTER_AREA)
                  for p in photos[:4]]
    return photos[:count] if count else photos


class EncoderMeter:
    """Wraps NACLIP's encoder forward: calls, inputs, and seconds (device synchronised)."""

    def __init__(self, forward, device):
        self.forward, self.device = forward, device
        self.reset()

    def reset(self) -> None:
        self.calls = self.inputs = 0
        self.seconds = 0.0

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, pixels, *args, **kwargs):
        self._sync()
        start = time.perf_counter()
        out = self.forward(pixels, *args, **kwargs)
        self._sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        self.inputs += int(pixels.shape[0])
        return out


def run_setting(name: str, window: str, refine: str, clip, photos, args) -> str:
    import torch

    from clipdiy.segmentation.config import NaclipConfig, PamrConfig, SegmenterConfig
    from clipdiy.segmentation.methods.naclip import query_words
    from clipdiy.segmentation.segmenter import create_segmenter
    from clipdiy.segmentation.vocabulary import load_vocabulary

    device = torch.device(args.device)
    pamr = PamrConfig(iterations=2 if args.dry else 10)
    # The smoke run shrinks NACLIP's input (short side 64, 64-px windows) so that it costs seconds.
    naclip = (NaclipConfig(window=window, short_side=64, long_side=128, window_size=64, window_stride=32)
              if args.dry else NaclipConfig(window=window))
    config = SegmenterConfig(method="naclip", vocabulary="naclip-voc21", clip=clip, device=args.device,
                             refine=refine, pamr=pamr, naclip=naclip)
    queries = len(query_words(load_vocabulary(config.vocabulary))[0])
    width = 64 if args.dry else 512
    text = torch.nn.functional.normalize(torch.randn(queries, width, generator=torch.Generator().manual_seed(0)), dim=-1)
    segmenter = create_segmenter(config, text_embeddings=text)
    meter = EncoderMeter(segmenter.method.encoder.forward, device)
    segmenter.method.encoder.forward = meter
    segmenter.segment(photos[: min(len(photos), args.batch_size)])  # warm-up: kernels, caches
    meter.reset()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    labelled = 0
    for first in range(0, len(photos), args.batch_size):
        labelled += len(segmenter.segment(photos[first:first + args.batch_size]))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    outside = 1.0 - meter.seconds / seconds
    return (f"naclip {name:11s} {labelled / seconds:8.2f} images/s per {'GPU' if device.type == 'cuda' else 'process'}  "
            f"{labelled / max(1, meter.calls):5.2f} images per forward ({meter.inputs / max(1, meter.calls):6.1f} "
            f"inputs)  outside the forwards {outside:6.1%}  GPU memory peak {peak:5.2f} GiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --dry)")
    parser.add_argument("--dry", action="store_true", help="smoke run: tiny CLIP, 4 small photos, 2 PAMR iterations")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--images", type=int, default=None, help="use only the first N photos")
    parser.add_argument("--only", default="", help="comma-separated settings (whole, whole+pamr, slide, slide+pamr)")
    args = parser.parse_args()

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_naclip_check.py: error: no CUDA device (torch.cuda.is_available() is False); "
              "--device cpu --dry runs a smoke test", file=sys.stderr)
        return 2
    if not args.device.startswith("cuda") and not args.dry:
        print("gpu_naclip_check.py: error: without CUDA only the smoke run (--device cpu --dry) is offered",
              file=sys.stderr)
        return 2
    from model_factories import make_clip_config

    photos = mixed_photos(args.images, args.dry)
    sizes = {p.shape[:2] for p in photos}
    where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "CPU (smoke run)"
    print(f"{len(photos)} photos, {len(sizes)} distinct sizes, batch {args.batch_size}, on {where}", flush=True)
    only = {s for s in args.only.split(",") if s}
    with tempfile.TemporaryDirectory(prefix="clipdiy-gpu-naclip-") as tmp:
        clip = make_clip_config(Path(tmp) / "clip", arch="tiny" if args.dry else "ViT-B-16")
        for name, window, refine in SETTINGS:
            if not only or name in only:
                print(run_setting(name, window, refine, clip, photos, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
