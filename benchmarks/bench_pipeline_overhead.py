"""Pipeline overhead: images/s of the labelling job (``run_labelling`` on a local Ray) versus the
segmenter called in a plain Python loop on the same images, same machine, same torch threads.

The loop does what the job does per image short of Parquet: read the file, decode (EXIF
applied), ``Segmenter.segment`` in batches, COCO RLE of every mask. The job adds listing, Ray
Data scheduling, object transfer between decode tasks / the inference actor / row tasks, and
Parquet writing. Reported: the job's labelling-phase rate (``RunSummary.images_per_second``:
from the first block submitted to the last shard written, actor start and model load included)
and, by differencing with a one-batch run of the job, its rate beyond the first batch (the
one-off actor start and model load cancel out: what a corpus of millions sees); the loop's rate
(model loaded beforehand) and its rate after its first batch. Target: the job within 15% of the
loop on CPU.

Models: random-init ViT-B-32 (the paper's CLIP, weights saved as a checkpoint and loaded through
the normal path; throughput does not depend on the weights' values), saliency ``none`` (default)
or ``found`` (random-init ViT-S/8 + the real FOUND head).

    python benchmarks/bench_pipeline_overhead.py                       # 32 COCO photos
    python benchmarks/bench_pipeline_overhead.py --repeat 2 --saliency found --threads 2
    python benchmarks/bench_pipeline_overhead.py --two-node --threads 1 --rows-per-file 8

``--two-node``: the job runs against a two-node ``ray.cluster_utils.Cluster`` given as its address
(as under ``ray job submit``): a head with one CPU (driver, decode, rows, writes) and a worker
that declares one GPU (no CUDA needed: its actor runs the models on CPU) and ``--threads`` CPUs;
the job's defaults put its inference actor there. Also reported: seconds from the job's start to
its first Parquet shard (set ``--rows-per-file`` below the corpus size to see more than one).
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # model_factories: random-init checkpoints


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f}"


def make_corpus(source: Path, target: Path, repeat: int, limit: int | None = None) -> list[Path]:
    photos = sorted(p for p in source.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})[:limit]
    target.mkdir(parents=True)
    out = []
    for r in range(repeat):
        for photo in photos:
            copy = target / f"{r:02d}_{photo.name}"
            shutil.copy(photo, copy)
            out.append(copy)
    return out


def segmenter_config(args, workdir: Path):
    from model_factories import make_clip_config, make_saliency_config

    from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig

    clip = make_clip_config(workdir / "clip", arch=args.clip_arch)
    saliency = make_saliency_config(workdir / "found") if args.saliency == "found" else SaliencyConfig(backend="none")
    return SegmenterConfig(vocabulary=args.vocabulary, clip=clip, saliency=saliency, device="cpu")


def run_loop(config, images: list[Path], batch_size: int, threads: int) -> tuple[float, float, float, int]:
    """(seconds, steady images/s after the first batch, wall seconds incl. model load, masks)."""
    import torch
    from PIL import Image, ImageOps

    from clipdiy.segmentation.segmenter import create_segmenter

    torch.set_num_threads(threads)
    wall_start = time.perf_counter()
    segmenter = create_segmenter(config)
    start = time.perf_counter()
    masks = 0
    first_batch_end = None
    for i in range(0, len(images), batch_size):
        batch = []
        for path in images[i:i + batch_size]:
            with Image.open(io.BytesIO(path.read_bytes())) as image:
                batch.append(ImageOps.exif_transpose(image).convert("RGB"))
        for result in segmenter.segment(batch):
            masks += len(result.masks())  # COCO RLE of each present class, as the job's rows
        if first_batch_end is None:
            first_batch_end = time.perf_counter()
    end = time.perf_counter()
    rest = len(images) - min(batch_size, len(images))
    steady = rest / (end - first_batch_end) if rest and end > first_batch_end else float("nan")
    return end - start, steady, end - wall_start, masks


class FirstShardWatch:
    """Polls OUTPUT for the job's first Parquet shard; ``seconds`` from start to its appearance."""

    def __init__(self, output: Path, poll_s: float = 0.05):
        self.output, self.poll_s = output, poll_s
        self.seconds: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set() and self.seconds is None:
            if any(self.output.glob("runs/*/part-*.parquet")):
                self.seconds = time.perf_counter() - self.started
            self._stop.wait(self.poll_s)


def run_job(config, corpus: Path, output: Path, args, address: str | None = None):
    from clipdiy.pipeline.config import LabelJobConfig
    from clipdiy.pipeline.run import run_labelling

    on_cluster = {"address": address, "max_actors": None} if address else {"max_actors": 1}
    job = LabelJobConfig(
        input=str(corpus),
        output=str(output),
        segmenter=config,
        inference_batch_size=args.batch_size,
        decode_batch_size=args.batch_size,
        cpus_per_actor=float(args.threads),
        min_actors=1,
        # The actor's CPUs plus one for decode / row / write tasks.
        local_num_cpus=args.threads + 1,
        rows_per_file=args.rows_per_file,
        **on_cluster,
    )
    start = time.perf_counter()
    with FirstShardWatch(output) as watch:
        summary = run_labelling(job)
    return summary, time.perf_counter() - start, watch.seconds


def start_two_node_cluster(threads: int):
    """Head: 1 CPU, no GPU; worker: ``threads`` CPUs and a declared GPU. Ray connected to it."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=threads, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=REPO_ROOT / "tests/data/coco-val2017-sample/images")
    parser.add_argument("--repeat", type=int, default=1, help="copies of each photo (more images, steadier rates)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    parser.add_argument("--clip-arch", default="ViT-B-32")
    parser.add_argument("--saliency", choices=("none", "found"), default="none")
    parser.add_argument("--vocabulary", default="voc")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the loop and CPUs of the job's inference actor")
    parser.add_argument("--order", choices=("loop-first", "job-first"), default="loop-first")
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--two-node", action="store_true",
                        help="run the job on a two-node local cluster whose worker declares a GPU (see above)")
    args = parser.parse_args()
    cluster = start_two_node_cluster(args.threads) if args.two_node else None
    try:
        _run(args, cluster.address if cluster else None)
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()


def _run(args, address: str | None) -> None:

    with tempfile.TemporaryDirectory(prefix="clipdiy-bench-") as tmp:
        workdir = Path(tmp)
        images = make_corpus(args.images, workdir / "corpus", args.repeat, args.limit)
        # One batch's worth, for the job's fixed cost (actor start, model load, first batch).
        make_corpus(workdir / "corpus", workdir / "one-batch", 1, args.batch_size)
        config = segmenter_config(args, workdir)
        n = len(images)
        print(f"{n} images, CLIP {args.clip_arch} (random init), saliency {args.saliency}, batch {args.batch_size}, "
              f"{args.threads} torch thread(s), {os.cpu_count()} CPUs; "
              f"{'two-node cluster, GPU-declaring worker' if address else 'embedded local Ray'}; {load_average()}",
              flush=True)

        results = {}
        for which in (("loop", "job") if args.order == "loop-first" else ("job", "loop")):
            if which == "loop":
                seconds, steady, wall, masks = run_loop(config, images, args.batch_size, args.threads)
                results["loop"] = (n / seconds, steady)
                print(f"loop: {n / seconds:.3f} images/s ({seconds:.1f} s; model loaded beforehand), "
                      f"{steady:.3f} images/s after the first batch, {wall:.1f} s with model load, "
                      f"{masks} masks; {load_average()}", flush=True)
            else:
                summary, wall, first_shard = run_job(config, workdir / "corpus", workdir / "labels", args, address)
                assert summary.seen == n and summary.ok == n, summary
                first, _, _ = run_job(config, workdir / "one-batch", workdir / "labels-one-batch", args, address)
                b = first.seen
                # Differencing the two runs cancels the one-off costs (actor start, model load).
                steady = (n - b) / (summary.labelling_seconds - first.labelling_seconds)
                results["job"] = (summary.images_per_second, steady)
                print(f"job:  {summary.images_per_second:.3f} images/s labelling phase "
                      f"({summary.labelling_seconds:.1f} s, actor start and model load included), "
                      f"{wall:.1f} s wall incl. Ray start; {load_average()}", flush=True)
                print(f"      {summary.line()}", flush=True)
                print(f"      first Parquet shard {first_shard:.1f} s after the job's start "
                      f"(--rows-per-file {args.rows_per_file})", flush=True)
                print(f"      one batch: {first.labelling_seconds:.1f} s labelling phase for {b} images -> "
                      f"{steady:.3f} images/s beyond the first batch; {load_average()}", flush=True)
        whole = results["job"][0] / results["loop"][0]
        steady = results["job"][1] / results["loop"][1]
        print(f"job / loop, whole run (job pays actor start + model load): {whole:.3f}")
        print(f"job / loop, beyond the first batch (one-off costs removed): {steady:.3f}  "
              f"({'within' if steady >= 0.85 else 'NOT within'} 15%)")


if __name__ == "__main__":
    main()
