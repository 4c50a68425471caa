"""A short labelling job on GPU actors (an embedded local Ray on a CUDA machine), for
``benchmarks/gpu_check.sh``: images/s per GPU, and the share of the actors' time spent outside
the model forwards.

The job runs ``run_labelling`` with ``--device gpu`` (one actor per GPU) on copies of the COCO
sample photos, with a random-init ViT-B-32 and FOUND (real head, random-init ViT-S/8) loaded
through the users' checkpoint path. The forward time per image is then measured in this process
on the same GPU, same models and batch size (CLIP's and DINO's forwards timed, CUDA synchronised);
``forward s/image x job images/s per GPU`` is the share of a GPU's time in the forwards, the rest
is decode waits, pre/post-processing, RLE, transfers and scheduling.

    python benchmarks/gpu_job_check.py --repeat 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))


def forward_seconds_per_image(config, images: list[Path], batch_size: int) -> float:
    """Seconds of CLIP + DINO forwards per image on CUDA (after a warm-up batch)."""
    import numpy as np
    import torch
    from bench_segmenter import ForwardTimers
    from PIL import Image, ImageOps

    from clipdiy.segmentation.segmenter import create_segmenter

    device = torch.device("cuda")
    segmenter = create_segmenter(replace(config, device="cuda"))
    timers = ForwardTimers(segmenter, device, saliency=config.saliency.backend != "none")
    arrays = []
    for path in images:
        with Image.open(path) as image:
            arrays.append(np.asarray(ImageOps.exif_transpose(image).convert("RGB")))
    segmenter.segment(arrays[:batch_size])  # warm-up
    timers.reset()
    for first in range(0, len(arrays), batch_size):
        segmenter.segment(arrays[first:first + batch_size])
    torch.cuda.synchronize()
    return timers.seconds / len(arrays)


def free_job(args, gpus: int) -> int:
    """The job with the free model on GPU actors: images/s per GPU against the bare decode rate."""
    import os

    import ray
    import torch
    from bench_pipeline_overhead import make_corpus, run_bare_loop
    from free_method import FREE_CLIPDIY, FREE_NACLIP, ray_runtime_env, register
    from model_factories import make_clip_config

    from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
    from clipdiy.pipeline.config import LabelJobConfig
    from clipdiy.pipeline.control.run import run_labelling

    register()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="clipdiy-gpu-free-") as tmp:
        workdir = Path(tmp)
        images = make_corpus(args.images, workdir / "corpus", args.repeat)
        bare, _ = run_bare_loop(images, cores)
        method = FREE_NACLIP if args.free == "naclip" else FREE_CLIPDIY
        config = SegmenterConfig(method=method, vocabulary="voc", clip=make_clip_config(workdir / "clip", arch="tiny"),
                                 saliency=SaliencyConfig(backend="none"))
        ray.init(include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env())
        try:
            job = LabelJobConfig(input=str(workdir / "corpus"), output=str(workdir / "labels"), segmenter=config,
                                 device="gpu", inference_batch_size=args.batch_size, decode_batch_size=8,
                                 cpus_per_actor=1.0, rows_per_file=256)
            summary = run_labelling(job)
        finally:
            ray.shutdown()
        if summary.ok != len(images):
            print(f"gpu_job_check.py: error: {summary.line()}", file=sys.stderr)
            return 1
        print(f"free-model job ({method}) on {gpus} GPU actor(s) ({torch.cuda.get_device_name(0)}), {cores} CPUs: "
              f"{summary.line()}")
        print(f"free-model job: {summary.images_per_second / gpus:.1f} images/s per GPU (labelling phase, actor start "
              f"included); bare read+decode on {cores} processes: {bare:.1f} images/s; "
              f"job / bare: {summary.images_per_second / bare:.2f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=REPO_ROOT / "tests/data/coco-val2017-sample/images")
    parser.add_argument("--repeat", type=int, default=4, help="copies of each photo")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--saliency", choices=("found", "none"), default="found")
    parser.add_argument("--free", choices=("naclip", "clipdiy"), default=None,
                        help="the job with the benchmark-only free-<method> (no model cost: benchmarks/free_method.py) "
                             "on GPU actors, against a bare read-and-decode loop on this machine's cores")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_job_check.py: error: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    from bench_pipeline_overhead import make_corpus
    from model_factories import make_clip_config, make_saliency_config

    from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
    from clipdiy.pipeline.config import LabelJobConfig
    from clipdiy.pipeline.control.run import run_labelling

    gpus = torch.cuda.device_count()
    if args.free:
        return free_job(args, gpus)
    with tempfile.TemporaryDirectory(prefix="clipdiy-gpu-check-") as tmp:
        workdir = Path(tmp)
        images = make_corpus(args.images, workdir / "corpus", args.repeat)
        saliency = make_saliency_config(workdir / "found") if args.saliency == "found" else SaliencyConfig(backend="none")
        config = SegmenterConfig(vocabulary="voc", clip=make_clip_config(workdir / "clip", arch="ViT-B-32"),
                                 saliency=saliency)
        job = LabelJobConfig(input=str(workdir / "corpus"), output=str(workdir / "labels"), segmenter=config,
                             device="gpu", inference_batch_size=args.batch_size, decode_batch_size=8,
                             cpus_per_actor=2.0, rows_per_file=1000)
        started = time.perf_counter()
        summary = run_labelling(job)
        wall = time.perf_counter() - started
        if summary.ok != len(images):
            print(f"gpu_job_check.py: error: {summary.line()}", file=sys.stderr)
            return 1
        per_gpu = summary.images_per_second / gpus
        print(f"job on {gpus} GPU actor(s) ({torch.cuda.get_device_name(0)}): {summary.line()}; {wall:.1f} s wall")
        print(f"job: {per_gpu:.2f} images/s per GPU (labelling phase, actor start and model load included)")
        forward = forward_seconds_per_image(config, images[: min(len(images), 64)], args.batch_size)
        inside = forward * per_gpu
        print(f"forwards: {forward * 1000:.1f} ms/image (CLIP + DINO, saliency {args.saliency}); "
              f"share of GPU-actor time outside the model forwards: {1 - inside:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
