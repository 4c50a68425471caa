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

FREE MODEL (``--free naclip`` or ``--free clipdiy``): the host side alone. The job runs the
benchmark-only ``free-<method>`` (``benchmarks/free_method.py``: the method's own input
preparation and output shapes, a fixed pattern instead of a forward; registered here and, through
Ray's ``worker_process_setup_hook``, in the workers) on a local Ray of ``--cores`` CPUs, against a
bare read-and-decode loop of the same files on ``--cores`` processes. Printed: each stage's CPU
ms per image with the stage functions called in this process (``--stages-only`` stops there),
Ray Data's per-operator stats, the CPU time of the whole local Ray (``/proc``; a one-batch run
differenced out), images per CPU-second against the bare loop's, and the wall-clock rates.
``--profile DIR`` adds a py-spy record of the Ray workers.

    python benchmarks/bench_pipeline_overhead.py --free naclip --repeat 32 --batch-size 16 \
        --decode-batch-size 16 --rows-per-file 128
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
    from clipdiy.pipeline.control.run import run_labelling

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


def bare_decode(paths: list[Path]) -> int:
    """Read and decode ``paths`` (EXIF applied, RGB array), as a decode task does short of the
    method's preparation; the pixel count, so that nothing is optimised away."""
    import numpy as np
    from PIL import Image, ImageOps

    pixels = 0
    for path in paths:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            pixels += np.asarray(ImageOps.exif_transpose(image).convert("RGB")).size
    return pixels


def _timed_bare_decode(paths: list[Path]) -> float:
    """CPU seconds (user + system) of this process decoding ``paths``."""
    before = time.process_time()
    bare_decode(paths)
    return time.process_time() - before


def run_bare_loop(images: list[Path], cores: int) -> tuple[float, float]:
    """(images/s, images per CPU-second) of ``cores`` processes reading and decoding their share
    of ``images`` (forked and warmed up first: the rate is of the loop only)."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(bare_decode, [images[:4]] * cores)  # imports and first decode, not timed
        shares = [images[i::cores] for i in range(cores)]
        start = time.perf_counter()
        cpu = sum(pool.map(_timed_bare_decode, shares))
        return len(images) / (time.perf_counter() - start), len(images) / cpu


class CpuAccount:
    """CPU seconds (user + system) spent by this process and all its descendants (the local Ray:
    raylet, GCS, workers, actors) while the block runs. Sampled every 0.2 s per process, so that
    processes that end (an actor) count up to their last sample. On a machine shared with other
    work, images per CPU-second compare where wall-clock rates cannot."""

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.first: dict[int, tuple[str, float]] = {}
        self.last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        """Reads /proc (Linux): the process tree under this one, with each process's CPU time."""
        tick = os.sysconf("SC_CLK_TCK")
        stats: dict[int, tuple[int, str, float]] = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
                title = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            name, fields = text[text.index("(") + 1:text.rindex(")")], text[text.rindex(")") + 2:].split()
            stats[int(entry)] = (int(fields[1]), title if title.startswith("ray::") else name,
                                 (int(fields[11]) + int(fields[12])) / tick)
        tree, grew = {os.getpid()}, True
        while grew:
            grew = False
            for pid, (parent, _, _) in stats.items():
                if parent in tree and pid not in tree:
                    tree.add(pid)
                    grew = True
        for pid in tree:
            _, name, used = stats[pid]
            if pid not in self.first:
                self.first[pid] = (name, used if self._started else 0.0)
            elif name.startswith("ray::"):  # a worker names itself once started
                self.first[pid] = (name, self.first[pid][1])
            self.last[pid] = used

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()
        self.sampler_seconds = time.thread_time()  # this thread's own reading of /proc, not the job's

    def __enter__(self):
        self._started = True
        self._sample()
        self._started = False  # processes first seen from now on started inside the block
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()
        self._sample()

    def by_role(self) -> dict[str, float]:
        from collections import Counter

        roles: Counter = Counter()
        for pid, (name, start) in self.first.items():
            role = "driver" if pid == os.getpid() else name.split("(")[-1].rstrip(")") if name.startswith("ray::") else name
            if role != "py-spy":  # the profiler (--profile) is not the job
                roles[role] += self.last.get(pid, start) - start
        roles["driver"] -= getattr(self, "sampler_seconds", 0.0)
        return dict(roles)

    @property
    def seconds(self) -> float:
        return sum(self.by_role().values())

    def line(self) -> str:
        roles = sorted(self.by_role().items(), key=lambda item: -item[1])
        return f"{self.seconds:.1f} s: " + ", ".join(f"{role} {seconds:.1f}" for role, seconds in roles if seconds >= 0.05)


class DatasetStats:
    """Keeps the job's last Ray Data plan (``build_dataset``'s result) and its execution stats:
    wall and CPU time per operator (decode, predict, rows + shards)."""

    def __enter__(self):
        import clipdiy.pipeline.control.run as run

        self.run, self.original, self.datasets = run, run.build_dataset, []

        def keep(*args, **kwargs):
            dataset = self.original(*args, **kwargs)
            self.datasets.append(dataset)
            return dataset

        run.build_dataset = keep
        self.text = ""
        return self

    def __exit__(self, *exc_info):
        self.run.build_dataset = self.original
        if self.datasets:
            self.text = self.datasets[-1].stats()


class WorkerProfile:
    """py-spy over this process and its children (the local Ray's workers) while a job runs:
    a raw collapsed-stack file, summarised per function (own samples, and inclusive)."""

    def __init__(self, folder: Path | None, name: str):
        self.folder, self.name, self.process = folder, name, None

    def __enter__(self):
        import subprocess

        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.raw = self.folder / f"{self.name}.txt"
            self.process = subprocess.Popen(
                ["py-spy", "record", "--subprocesses", "--nonblocking", "--rate", "50", "--format", "raw",
                 "--output", str(self.raw), "--pid", str(os.getpid())],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        return self

    def __exit__(self, *exc_info):
        import signal

        if self.process is not None:
            self.process.send_signal(signal.SIGINT)
            self.process.wait(timeout=60)
            print(summarise_profile(self.raw), flush=True)


def summarise_profile(raw: Path, top: int = 30) -> str:
    """Samples per Ray process role and the functions they are spent in (inclusive shares)."""
    from collections import Counter

    by_role: Counter = Counter()
    inclusive: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        # The first frame names the process: ``process PID:"ray::MapWorker(MapBatches(SegmentBatch))"``.
        role = frames[0].split("ray::", 1)[1].rstrip('"') if "ray::" in frames[0] else "driver and Ray's own"
        by_role[role] += int(count)
        for frame in {f.split(" (")[0] for f in frames[1:]}:
            inclusive[(role, frame)] += int(count)
    total = sum(by_role.values()) or 1
    out = [f"profile {raw}: {total} samples on CPU (py-spy, 50 Hz, idle threads left out)"]
    out += [f"  {n / total:6.1%}  {role}" for role, n in by_role.most_common(10)]
    out.append("  functions (inclusive share of all samples):")
    out += [f"    {n / total:6.1%}  {role}: {frame}" for (role, frame), n in inclusive.most_common(top)]
    return "\n".join(out)


def stage_costs(segmenter, images: list[Path], batch_size: int) -> str:
    """CPU ms per image of each stage's function, called in this process on the same batches as
    the job (no Ray): decode (read, decode, the method's preparation, payload), predict (the
    actor's call; inside it ``Segmenter.predict``: on a GPU that part runs on the device), rows
    (finalize, RLE, saliency preview), Parquet encoding. Every output size is seen once first."""
    import dataclasses
    import datetime as dt

    import pyarrow as pa

    from clipdiy.segmentation.models.saliency import saliency_input_side
    from clipdiy.pipeline.config import LabelJobConfig
    from clipdiy.pipeline.stages.decode import DecodeBatch
    from clipdiy.pipeline.stages.inference import SegmentBatch
    from clipdiy.pipeline.stages.rows import RowContext, build_rows
    from clipdiy.pipeline.stages.driver_models import resolve_models
    from clipdiy.pipeline.stages.writer import encode_shard

    job = LabelJobConfig(input="unused", output="unused", segmenter=segmenter)
    models = resolve_models(job.segmenter)
    side = saliency_input_side(segmenter.saliency)
    decode = DecodeBatch(job.storage, segmenter.mode, job.max_pixels, 1, saliency_max_side=side,
                         segmenter_config=dataclasses.replace(
                             segmenter, saliency=dataclasses.replace(segmenter.saliency, max_side=side)))
    predict = SegmentBatch(segmenter, models.text_embeddings, num_threads=1)
    context = RowContext("bench", dt.datetime.now(dt.timezone.utc), models.provenance, models.class_names)
    inner = {"seconds": 0.0}
    segment = predict.segmenter.predict

    def timed_predict(prepared, **kwargs):
        started = time.process_time()
        try:
            return segment(prepared, **kwargs)
        finally:
            inner["seconds"] += time.process_time() - started

    predict.segmenter.predict = timed_predict

    def listing(paths: list[Path]) -> pa.Table:
        return pa.table({"image_id": [p.name for p in paths], "uri": [str(p) for p in paths],
                         "source_size": [p.stat().st_size for p in paths], "source_etag": [None] * len(paths),
                         "source_mtime": [None] * len(paths)},
                        schema=pa.schema([("image_id", pa.string()), ("uri", pa.string()), ("source_size", pa.int64()),
                                          ("source_etag", pa.string()), ("source_mtime", pa.timestamp("us", tz="UTC"))]))

    stages = {"decode": decode, "predict": predict, "rows": lambda batch: build_rows(batch, context),
              "parquet": encode_shard}
    unique = {p.name.split("_", 1)[-1]: p for p in images}
    warm = list(unique.values())
    for first in range(0, len(warm), batch_size):  # warm-up: every output size once
        batch = listing(warm[first:first + batch_size])
        for function in stages.values():
            batch = function(batch)
    spent = dict.fromkeys(stages, 0.0)
    inner["seconds"] = 0.0
    for first in range(0, len(images), batch_size):
        batch = listing(images[first:first + batch_size])
        for name, function in stages.items():
            started = time.process_time()
            batch = function(batch)
            spent[name] += time.process_time() - started
    n = len(images)
    parts = [f"{name} {seconds / n * 1000:.2f}" for name, seconds in spent.items()]
    return (f"stage CPU ms/image in one process: {', '.join(parts)}; total {sum(spent.values()) / n * 1000:.2f} "
            f"(of which Segmenter.predict, device work on a GPU: {inner['seconds'] / n * 1000:.2f})")


def run_free(args) -> None:
    """The job with the free model (no model cost) against the bare read-and-decode loop."""
    import ray
    from free_method import FREE_CLIPDIY, FREE_NACLIP, ray_runtime_env, register
    from model_factories import make_clip_config

    from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
    from clipdiy.pipeline.config import LabelJobConfig
    from clipdiy.pipeline.control.run import run_labelling

    register()
    with tempfile.TemporaryDirectory(prefix="clipdiy-bench-free-") as tmp:
        workdir = Path(tmp)
        images = make_corpus(args.images, workdir / "corpus", args.repeat, args.limit)
        make_corpus(workdir / "corpus", workdir / "one-batch", 1, args.batch_size)
        n = len(images)
        method = FREE_NACLIP if args.free == "naclip" else FREE_CLIPDIY
        # The free model reads no saliency input: CLIP-DIY's preparation with saliency ``none`` ships
        # a 32-pixel placeholder, with ``found`` the full-resolution photo, as the real method would.
        segmenter = SegmenterConfig(
            method=method, vocabulary=args.vocabulary, clip=make_clip_config(workdir / "clip", arch="tiny"),
            saliency=SaliencyConfig(backend=args.saliency), device="cpu")
        print(f"{n} images ({args.repeat} copies of {n // args.repeat} COCO photos), {method}, batch {args.batch_size}, "
              f"{args.cores} cores, {os.cpu_count()} CPUs on the machine; {load_average()}", flush=True)

        print(stage_costs(segmenter, images, args.batch_size), flush=True)
        if args.stages_only:
            return
        bare, bare_cpu = run_bare_loop(images, args.cores)
        print(f"bare read+decode loop: {bare:.1f} images/s on {args.cores} processes = "
              f"{bare / args.cores:.1f} images/s per core; {bare_cpu:.1f} images per CPU-second; {load_average()}",
              flush=True)

        ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env())
        try:
            def job(corpus: Path, output: Path):
                config = LabelJobConfig(
                    input=str(corpus), output=str(output), segmenter=segmenter, device="cpu",
                    inference_batch_size=args.batch_size, decode_batch_size=args.decode_batch_size,
                    # A GPU actor's CPU share: the free model needs none, decode gets the rest.
                    cpus_per_actor=0.5, torch_threads=1, min_actors=1, max_actors=1,
                    rows_per_file=args.rows_per_file, actor_memory_gb=0)
                return run_labelling(config)

            job(workdir / "one-batch", workdir / "warm-up")  # worker processes and imports, not timed
            with CpuAccount() as first_cpu:
                first = job(workdir / "one-batch", workdir / "labels-one-batch")
            with WorkerProfile(args.profile, f"free-{args.free}"), CpuAccount() as cpu, DatasetStats() as stages:
                summary = job(workdir / "corpus", workdir / "labels")
            assert summary.seen == n and summary.ok == n, summary.line()
        finally:
            ray.shutdown()
        print(stages.text, flush=True)
        print(f"CPU time of the job: {cpu.line()}", flush=True)
        print(f"CPU time of the one-batch job: {first_cpu.line()}", flush=True)
        # Differencing the two runs' CPU time cancels what every run pays once (a fresh actor's
        # imports and model load, Ray Data's start): what a corpus of millions pays per image.
        marginal = (cpu.seconds - first_cpu.seconds) / (n - first.seen)
        print(f"job, by CPU time: {n / cpu.seconds:.1f} images per CPU-second whole run, "
              f"{1 / marginal:.1f} per CPU-second beyond the first batch ({marginal * 1000:.1f} ms/image); "
              f"bare loop {bare_cpu:.1f} ({1000 / bare_cpu:.1f} ms/image) -> ratio {1 / marginal / bare_cpu:.2f} "
              f"(goal >= 0.50)", flush=True)
        steady = (n - first.seen) / (summary.labelling_seconds - first.labelling_seconds)
        print(f"job:  {summary.images_per_second:.1f} images/s labelling phase = "
              f"{summary.images_per_second / args.cores:.1f} images/s per core ({summary.line()}); {load_average()}")
        print(f"      {steady:.1f} images/s beyond the first batch (one-batch run: {first.labelling_seconds:.1f} s) "
              f"= {steady / args.cores:.1f} images/s per core")
        print(f"job / bare decode: {summary.images_per_second / bare:.2f} whole labelling phase, "
              f"{steady / bare:.2f} beyond the first batch (goal >= 0.50)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=Path, default=REPO_ROOT / "tests/data/coco-val2017-sample/images")
    parser.add_argument("--repeat", type=int, default=1, help="copies of each photo (more images, steadier rates)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    parser.add_argument("--clip-arch", default="ViT-B-32")
    parser.add_argument("--saliency", choices=("none", "found"), default="none")
    parser.add_argument("--vocabulary", default="voc")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--decode-batch-size", type=int, default=8, help="--free: images per decode task batch")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the loop and CPUs of the job's inference actor")
    parser.add_argument("--order", choices=("loop-first", "job-first"), default="loop-first")
    parser.add_argument("--rows-per-file", type=int, default=1000)
    parser.add_argument("--free", choices=("naclip", "clipdiy"), default=None,
                        help="host-side mode (see FREE MODEL above): the job with the benchmark-only free-<method> "
                             "against a bare read-and-decode loop on --cores processes")
    parser.add_argument("--stages-only", action="store_true", help="--free: only the in-process stage costs (no Ray)")
    parser.add_argument("--cores", type=int, default=2, help="--free: processes of the bare loop, CPUs of the local Ray")
    parser.add_argument("--profile", type=Path, default=None,
                        help="--free: py-spy the job's Ray workers (--subprocesses) into this folder (flame SVG "
                             "and a top-functions text file)")
    parser.add_argument("--two-node", action="store_true",
                        help="run the job on a two-node local cluster whose worker declares a GPU (see above)")
    args = parser.parse_args()
    if args.free:
        run_free(args)
        return
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
