"""NACLIP + COCO-Object + PAMR on large photos, on the CPU: peak resident memory of the labelling
process above the model, and seconds per photo, tiled (``NaclipConfig.tile_side``, the default)
against untiled (the whole photo at once, as before tiles: ``--tile-side 0``).

Each photo runs in a fresh process (so each peak is its own): the process loads the model, builds
the photo (a COCO test photo resized to the size asked), prepares it, then measures its resident
set before ``Segmenter.predict`` (the model, the text side, the prepared input: "model") and its
peak during it (``ru_maxrss``); "above the model" is the difference. The method's estimate
(``working_bytes``, what the pipeline bounds with ``--max-image-memory-gb``) is printed beside it.

The model is a random CLIP with the real ViT-B/16 image tower and a tiny text tower by default
(``vitb16-small-text`` of ``tests/model_factories.py``: a ViT-B/16 text side costs half an hour of
CPU for COCO-Object's words x 80 templates, and nothing per photo; ``--arch tiny`` for a quick
run): after the forward (one 336-px ViT-B/16 forward per 224-px window, the same for every
photo) the cost does not depend on the weights. An untiled photo whose estimate exceeds the memory
available is not run; its estimate is printed instead.

    python benchmarks/bench_large_photos.py --megapixels 12 24 48 100
    python benchmarks/bench_large_photos.py --megapixels 1 3 --tile-side 0   # before tiles

``--method trident``: Trident with its COCO-Object setting and SAM refinement (random CLIP with
the ViT-B/16 image tower, random DINO ViT-B/16 and SAM ViT-B; the test-only logit scale 400 and
a stretched SAM IoU head, so that random models find regions and SAM keeps masks). Its forward
(the windows, SAM's 1024-px encoder) does not grow with the photo; the peak above the model
includes that forward's working set (SAM's global attention, about 1.6 GB), the same at every size.

    python benchmarks/bench_large_photos.py --method trident --megapixels 2.4 24
    python benchmarks/bench_large_photos.py --method trident --megapixels 2.4 --tile-side 0   # untiled
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def segmenter_config(method: str, tile_side: int | None, arch: str, workdir: str):
    """NACLIP + COCO-Object + PAMR, or Trident + its COCO-Object setting + SAM refinement, on
    random models (``tile_side`` 0: untiled; None: the method's default)."""
    from model_factories import make_clip_config, make_trident_config

    from clipdiy.segmentation.config import (
        NaclipConfig,
        SaliencyConfig,
        SegmenterConfig,
    )

    clip_config = make_clip_config(Path(workdir) / f"clip-{arch}", arch=arch)
    if method == "naclip":
        return SegmenterConfig(method="naclip", vocabulary="naclip-coco-object", clip=clip_config, saliency=SaliencyConfig(backend="none"),
                               device="cpu", naclip=NaclipConfig() if tile_side is None else NaclipConfig(tile_side=tile_side or 10**9))
    # The test-only sharper logit scale (tests/test_trident.py): at the authors' 40 a random CLIP
    # leaves every pixel under the 0.25 threshold, and the refinement would find no region.
    sides = {} if tile_side is None else {"tile_side": tile_side or 10**9}
    trident = make_trident_config(Path(workdir) / "trident", logit_scale=400.0, **sides)
    return SegmenterConfig(method="trident", vocabulary="trident-coco-object", clip=clip_config, saliency=SaliencyConfig(backend="none"),
                           device="cpu", trident=trident)


def run_one(megapixels: float, tile_side: int | None, arch: str, workdir: str, method: str = "naclip") -> dict:
    """In this process: label one photo of ``megapixels`` (4:3) and measure it."""
    import numpy as np
    import torch
    from PIL import Image

    sys.path.insert(0, str(REPO / "tests"))
    from clipdiy.segmentation.segmenter import create_segmenter, prepare_input

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    config = segmenter_config(method, tile_side, arch, workdir)
    segmenter = create_segmenter(config)
    if method == "trident":
        from model_factories import stretch_sam_iou_head

        stretch_sam_iou_head(segmenter.method.sam)  # a random decoder's IoUs all fall under 0.8: keep some masks
    width = round((megapixels * 1e6 * 4 / 3) ** 0.5)
    height = round(megapixels * 1e6 / width)
    photo = min((REPO / "tests" / "data").rglob("*.jpg"))
    with Image.open(photo) as image:
        rgb = np.asarray(image.convert("RGB").resize((width, height), Image.BILINEAR))
    prepared = prepare_input(rgb, config)
    del rgb  # the labelling worker gets the prepared (336-px) input, not the decoded photo
    estimate = segmenter.working_bytes(prepared)
    result = {"megapixels": round(height * width / 1e6, 1), "size": f"{width} x {height}", "tiled": tile_side != 0,
              "estimate_gb": estimate / 1e9}
    if tile_side == 0 and estimate > 0.8 * available_bytes():
        result["skipped"] = f"estimate {estimate / 1e9:.1f} GB > 80% of the {available_bytes() / 1e9:.1f} GB available"
        return result
    if not segmenter.method.tiled(prepared.original_size):
        tiles = 1
    elif method == "trident":  # bands of whole rows
        tiles = -(-height // segmenter.method.band_rows(prepared.original_size))
    else:
        tiles = len(segmenter.method.plan_tiles(prepared.original_size))
    model = rss_bytes()
    start, cpu_start = time.perf_counter(), time.process_time()
    output = segmenter.predict([prepared])[0]
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert output.label_map.shape == (height, width)
    result.update(tiles=tiles, seconds=seconds, cpu_seconds=cpu_seconds, model_gb=model / 1e9, peak_gb=peak / 1e9, above_model_gb=(peak - model) / 1e9)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, nargs="+", default=[12, 24, 48, 100])
    parser.add_argument("--method", choices=["naclip", "trident"], default="naclip")
    parser.add_argument("--tile-side", type=int, default=None, help="NaclipConfig / TridentConfig.tile_side (default: theirs); 0: untiled (before tiles)")
    parser.add_argument("--arch", default="vitb16-small-text", help="random model of tests/model_factories.py (tiny: quicker)")
    parser.add_argument("--workdir", default="/tmp/bench_large_photos")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.megapixels[0], args.tile_side, args.arch, args.workdir, args.method)))
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    print(f"# {args.method}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, arch {args.arch}, tile side {'default' if args.tile_side is None else args.tile_side or 'untiled'}")
    print("| MP | size | tiles | s / photo | CPU s / photo | model GB | peak GB | above model GB | estimate GB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for megapixels in args.megapixels:
        command = [sys.executable, __file__, "--one", "--megapixels", str(megapixels), "--arch", args.arch, "--workdir", args.workdir, "--method", args.method]
        if args.tile_side is not None:
            command += ["--tile-side", str(args.tile_side)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(f"| {megapixels} | failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]} |")
            continue
        row = json.loads(done.stdout.strip().splitlines()[-1])
        if "skipped" in row:
            print(f"| {row['megapixels']} | {row['size']} | - | - | - | - | - | not run: {row['skipped']} | {row['estimate_gb']:.2f} |")
            continue
        print(f"| {row['megapixels']} | {row['size']} | {row['tiles']} | {row['seconds']:.1f} | {row['cpu_seconds']:.1f} | {row['model_gb']:.2f} | "
              f"{row['peak_gb']:.2f} | {row['above_model_gb']:.2f} | {row['estimate_gb']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
