"""The same small JPEGs as loose objects and as WebDataset shards: requests per image and
read+decode images/s of each path, and the free-model job over shards against a bare loop.

``--part reads`` (default): a moto S3 server on 127.0.0.1 (threaded, in this process) holds
``--images`` small JPEGs (crops of the 32 COCO photos of ``tests/data``, longer side 96-192 px,
as img2dataset's thumbnails) twice: as loose objects ``loose/<key>.jpg`` and as ``--shards``
img2dataset-style tar shards ``shards/NNNNN.tar`` (``KEY.jpg``, ``KEY.txt``, ``KEY.json``
members, a Parquet sidecar beside each). ``--latency-ms`` is added to every request the server
answers (a sleep, which releases the GIL, as a remote store's wait does), and every request is
counted. Three paths read and decode every image (``PIL`` open, EXIF orientation, RGB array: the
decode stage short of the method's preparation) on the same ``--cores`` forked processes of
``--threads`` threads each:

- ``loose``: the job's read of a loose object (``storage.read_bytes`` bounded by max-bytes: one
  ranged GET), an image per task;
- ``shards``: the job's shard reader (``pipeline.stages.expand.ExpandShards``: one streamed read
  per shard, 8 MiB a GET), a shard per task;
- ``by address``: the readers of labels (``image_address.ImageFetcher``: one ranged GET of the
  member's bytes), an image per task, addresses from the shards' own tar headers.

Reported per path: requests (and GETs) per image, wall images/s, and images per CPU-second of
the reading processes (the moto server's own CPU, in this process, is not counted: S3's is not
yours). Where the machine is shared the CPU figure is the one to compare.

``--part job``: the labelling job with the benchmark-only free model (``free_method.py``: the
method's input preparation and output shapes, no forward) over the same shards written to a
local folder, on a local Ray of ``--cores`` CPUs, against a bare loop reading the same shards
with Python's ``tarfile`` and decoding on ``--cores`` processes, and against a bare loop of the
job's own work (``WorkLoop``: the job's shard reader, decode and the method's preparation, the
free model, label rows and Parquet, called in ``--cores`` forked processes, no Ray). Reported:
images per CPU-second of each (the job's CPU time from ``/proc`` over its process tree, a
one-shard run differenced out as ``bench_pipeline_overhead.py --free`` does), the ratios (goal
>= 0.5), and the job's processes per role (how many worker processes the run started).

    nice -n 10 python benchmarks/bench_shards.py --images 10000 --shards 10 --latency-ms 20
    python benchmarks/bench_shards.py --part job --images 10000 --shards 10 --free naclip
    python benchmarks/bench_shards.py --part job --images 5000 --shards 10 --tenth   # two sizes 10x apart
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import logging
import multiprocessing
import os
import random
import sys
import tarfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))  # model_factories (--part job)
BUCKET = "shards-bench"
PHOTOS = REPO_ROOT / "tests" / "data" / "coco-val2017-sample" / "images"


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} CPUs"


# ---------------------------------------------------------------- corpus


def small_jpegs(count: int, seed: int = 0, max_side: int = 192) -> list[bytes]:
    """``count`` JPEGs: random crops of the COCO sample photos, longer side ``max_side / 2`` to
    ``max_side`` px (96-192 by default: thumbnails as img2dataset writes them), quality 85."""
    from PIL import Image

    photos = [Image.open(p).convert("RGB") for p in sorted(PHOTOS.glob("*.jpg"))]
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        photo = rng.choice(photos)
        width, height = photo.size
        w, h = rng.randint(width // 4, width), rng.randint(height // 4, height)
        x, y = rng.randint(0, width - w), rng.randint(0, height - h)
        side = rng.randint(max_side // 2, max_side)
        crop = photo.crop((x, y, x + w, y + h))
        crop.thumbnail((side, side))
        buffer = io.BytesIO()
        crop.save(buffer, format="JPEG", quality=85)
        out.append(buffer.getvalue())
    return out


def key_of(number: int) -> str:
    return f"{number:09d}"


def shard_bytes(first: int, images: list[bytes]) -> tuple[bytes, bytes, dict[str, tuple[int, int]]]:
    """(the tar, its img2dataset Parquet sidecar, key -> (data offset, length) of each .jpg member
    as Python's tarfile reads it back)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    keys = [key_of(first + i) for i in range(len(images))]
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for key, data in zip(keys, images):
            for name, payload in ((f"{key}.jpg", data), (f"{key}.txt", b"a caption"),
                                  (f"{key}.json", json.dumps({"key": key, "status": "success"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    raw = buffer.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r:") as tar:
        ranges = {m.name[:-4]: (m.offset_data, m.size) for m in tar.getmembers() if m.name.endswith(".jpg")}
    sidecar = io.BytesIO()
    pq.write_table(pa.table({"key": keys, "status": ["success"] * len(keys),
                             "url": [f"https://images.example.com/{k}.jpg" for k in keys],
                             "caption": ["a caption"] * len(keys)}), sidecar)
    return raw, sidecar.getvalue(), ranges


def fill_bucket(images: list[bytes], shards: int) -> tuple[list[str], list[dict], list[dict]]:
    """Put the loose objects and the shards into moto's backend directly (this process: the
    server is threaded in it). Returns the loose keys, the shards' listing rows, and one address
    row per image."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    backend.create_bucket(BUCKET, "us-east-1")
    loose = []
    for number, data in enumerate(images):
        key = f"loose/{key_of(number)}.jpg"
        backend.put_object(BUCKET, key, data)
        loose.append(key)
    per_shard = -(-len(images) // shards)
    shard_rows, addresses = [], []
    for shard in range(shards):
        first = shard * per_shard
        raw, sidecar, ranges = shard_bytes(first, images[first:first + per_shard])
        key = f"shards/{shard:05d}.tar"
        backend.put_object(BUCKET, key, raw)
        backend.put_object(BUCKET, f"shards/{shard:05d}.parquet", sidecar)
        uri = f"s3://{BUCKET}/{key}"
        shard_rows.append({"image_id": f"{shard:05d}.tar", "uri": uri, "source_size": len(raw), "source_etag": None,
                           "source_mtime": None})
        addresses += [{"image_id": f"{shard:05d}.tar/{k}", "uri": uri, "source_format": "webdataset", "source_uri": uri,
                       "source_offset": o, "source_length": n, "source_size": len(raw)} for k, (o, n) in ranges.items()]
    return loose, shard_rows, addresses


class Server:
    """Adds ``latency_s`` to every request moto answers and counts them (method, path prefix)."""

    def __init__(self, latency_s: float):
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication

        self.requests: list[tuple[str, str]] = []
        lock = threading.Lock()
        original = DomainDispatcherApplication.__call__
        server = self

        def answer(app, environ, start_response):
            with lock:
                server.requests.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")))
            if latency_s:
                time.sleep(latency_s)
            return original(app, environ, start_response)

        DomainDispatcherApplication.__call__ = answer


# ---------------------------------------------------------------- the three read paths (in forked workers)


def decode(data: bytes) -> int:
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as image:
        return int(np.asarray(ImageOps.exif_transpose(image).convert("RGB")).size)


_STORAGE = None


def _filesystem():
    from clipdiy.storage import open_filesystem

    return open_filesystem(f"s3://{BUCKET}", _STORAGE)[0]


def read_loose(keys: list[str], threads: int) -> tuple[int, float]:
    from clipdiy.image_address import DEFAULT_MAX_IMAGE_BYTES
    from clipdiy.storage import read_bytes

    fs = _filesystem()

    def one(key: str) -> int:
        return decode(read_bytes(fs, f"{BUCKET}/{key}", max_bytes=DEFAULT_MAX_IMAGE_BYTES))

    return _timed(one, keys, threads)


def read_shards(rows: list[dict], threads: int) -> tuple[int, float]:
    import pyarrow as pa

    from clipdiy.image_address import DEFAULT_MAX_IMAGE_BYTES
    from clipdiy.pipeline.stages.expand import IMAGE_BYTES, ExpandShards

    expand = ExpandShards(_STORAGE, "webdataset", 256, DEFAULT_MAX_IMAGE_BYTES)

    def one(row: dict) -> int:
        images = 0
        for block in expand(pa.Table.from_pylist([row])):
            for data in block.column(IMAGE_BYTES).to_pylist():
                decode(data)
                images += 1
        return images

    return _timed(one, rows, threads, count=True)


def read_by_address(addresses: list[dict], threads: int) -> tuple[int, float]:
    from clipdiy.image_address import ImageFetcher

    fetcher = ImageFetcher(_STORAGE)
    return _timed(lambda row: decode(fetcher.fetch(row)), addresses, threads)


def _timed(work, items: list, threads: int, count: bool = False) -> tuple[int, float]:
    """(images done, CPU seconds of this process) of ``work`` over ``items`` in ``threads`` threads."""
    before = time.process_time()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        results = list(pool.map(work, items))
    return (sum(results) if count else len(results)), time.process_time() - before


def _warm(_: int) -> None:
    import numpy as np  # noqa: F401
    from PIL import Image  # noqa: F401

    import clipdiy.image_address
    import clipdiy.pipeline.stages.expand
    import clipdiy.storage  # noqa: F401


def run_path(pool, server: Server, name: str, function, items: list, cores: int, threads: int, images: int) -> dict:
    shares = [items[i::cores] for i in range(cores)]
    before = len(server.requests)
    started = time.perf_counter()
    results = pool.starmap(function, [(share, threads) for share in shares])
    wall = time.perf_counter() - started
    done, cpu = sum(r[0] for r in results), sum(r[1] for r in results)
    requests = server.requests[before:]
    gets = sum(method == "GET" for method, _ in requests)
    assert done == images, (name, done, images)
    line = {"path": name, "images": done, "requests": len(requests), "gets": gets,
            "requests_per_image": len(requests) / done, "images_per_s": done / wall,
            "images_per_cpu_s": done / cpu, "wall_s": wall, "cpu_s": cpu}
    print(f"{name:>11}: {done} images, {len(requests)} requests ({gets} GET) = {len(requests) / done:.4f} per image; "
          f"{done / wall:7.1f} images/s wall, {done / cpu:7.1f} images per CPU-second "
          f"({wall:.1f} s wall, {cpu:.1f} CPU-s); {load_average()}", flush=True)
    return line


def part_reads(args) -> None:
    global _STORAGE
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from moto.server import ThreadedMotoServer

    from clipdiy.storage import StorageOptions

    started = time.perf_counter()
    images = small_jpegs(args.images, max_side=args.max_side)
    server_app = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server_app.start()
    try:
        loose, shard_rows, addresses = fill_bucket(images, args.shards)
        mean = sum(map(len, images)) / len(images)
        print(f"{len(images)} JPEGs (mean {mean / 1024:.1f} KiB) as {len(loose)} loose objects and {len(shard_rows)} "
              f"shards (mean {sum(r['source_size'] for r in shard_rows) / len(shard_rows) / 2**20:.1f} MiB), put in "
              f"{time.perf_counter() - started:.1f} s; +{args.latency_ms:g} ms a request; {args.cores} processes x "
              f"{args.threads} threads; {load_average()}", flush=True)
        server = Server(args.latency_ms / 1000)
        host, port = server_app.get_host_and_port()
        _STORAGE = StorageOptions(endpoint_url=f"http://{host}:{port}", connect_timeout=10, read_timeout=120)
        results = []
        with multiprocessing.get_context("fork").Pool(args.cores) as pool:
            pool.map(_warm, range(args.cores))
            for _ in range(args.repeat):
                for name in args.paths:
                    function, items = {"loose": (read_loose, loose), "shards": (read_shards, shard_rows),
                                       "address": (read_by_address, addresses)}[name]
                    results.append(run_path(pool, server, name, function, items, args.cores, args.threads, len(images)))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))
    finally:
        server_app.stop()


# ---------------------------------------------------------------- --part job


def write_local_shards(folder: Path, images: list[bytes], shards: int) -> None:
    folder.mkdir(parents=True)
    per_shard = -(-len(images) // shards)
    for shard in range(shards):
        first = shard * per_shard
        raw, sidecar, _ = shard_bytes(first, images[first:first + per_shard])
        (folder / f"{shard:05d}.tar").write_bytes(raw)
        (folder / f"{shard:05d}.parquet").write_bytes(sidecar)


def bare_shard_loop(paths: list[Path]) -> tuple[int, float]:
    """Read ``paths`` (tar shards) with Python's tarfile and decode every .jpg member: (images, CPU s)."""
    before, images = time.process_time(), 0
    for path in paths:
        with tarfile.open(path, mode="r:") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".jpg"):
                    decode(tar.extractfile(member).read())
                    images += 1
    return images, time.process_time() - before


class WorkLoop:
    """The job's own stage functions called in one process, no Ray: each shard streamed by the
    job's reader (``ExpandShards``), decoded and prepared by the method (``DecodeBatch``), the free
    model (``SegmentBatch``), label rows (``build_rows``) and Parquet (``encode_shard``), in the
    job's batch sizes. What the job does per image, short of moving it between processes."""

    def __init__(self, segmenter, batch_size: int, decode_batch_size: int):
        import dataclasses
        import datetime as dt

        from clipdiy.pipeline.config import LabelJobConfig
        from clipdiy.pipeline.stages.decode import DecodeBatch
        from clipdiy.pipeline.stages.driver_models import resolve_models
        from clipdiy.pipeline.stages.expand import ExpandShards
        from clipdiy.pipeline.stages.inference import SegmentBatch
        from clipdiy.pipeline.stages.rows import RowContext
        from clipdiy.segmentation.models.saliency import saliency_input_side

        job = LabelJobConfig(input="unused", output="unused", segmenter=segmenter)
        models = resolve_models(job)
        side = saliency_input_side(segmenter.saliency)
        self.batch_size, self.decode_batch_size = batch_size, decode_batch_size
        self.expand = ExpandShards(job.storage, "webdataset", decode_batch_size, job.max_image_bytes)
        self.decode = DecodeBatch(job.storage, segmenter.mode, job.max_pixels, 1, saliency_max_side=side,
                                  segmenter_config=dataclasses.replace(
                                      segmenter, saliency=dataclasses.replace(segmenter.saliency, max_side=side)))
        self.predict = SegmentBatch(segmenter, models.text_embeddings, num_threads=1)
        self.context = RowContext("bench", dt.datetime.now(dt.timezone.utc), models.provenance, models.class_names)

    def shard(self, path: Path) -> int:
        """Label every sample of the shard at ``path``: the number of ok rows."""
        import pyarrow as pa

        from clipdiy.pipeline.stages.rows import build_rows
        from clipdiy.pipeline.stages.writer import encode_shard

        row = pa.table({"uri": [str(path)], "image_id": [path.name], "source_size": [path.stat().st_size],
                        "source_etag": pa.array([None], pa.string()),
                        "source_mtime": pa.array([None], pa.timestamp("us", tz="UTC"))})
        samples = pa.concat_tables(list(self.expand(row)))
        decoded = pa.concat_tables([self.decode(samples.slice(first, self.decode_batch_size))
                                    for first in range(0, samples.num_rows, self.decode_batch_size)])
        labelled = pa.concat_tables([build_rows(self.predict(decoded.slice(first, self.batch_size)), self.context)
                                     for first in range(0, decoded.num_rows, self.batch_size)])
        encode_shard(labelled)
        return sum(status == "ok" for status in labelled.column("status").to_pylist())


_WORK: WorkLoop | None = None  # the forked processes' copy (built before the fork)


def work_loop(paths: list[Path]) -> tuple[int, float]:
    """``WorkLoop`` over ``paths`` in this process: (images labelled, CPU seconds)."""
    before = time.process_time()
    images = sum(_WORK.shard(path) for path in paths)
    return images, time.process_time() - before


def role_processes(cpu) -> str:
    """Processes and CPU seconds per role of a ``CpuAccount``: how many worker processes a run started."""
    from collections import defaultdict

    roles: dict[str, list[float]] = defaultdict(list)
    for pid, (name, start) in cpu.first.items():
        role = "driver" if pid == os.getpid() else name.split("(")[-1].rstrip(")") if name.startswith("ray::") else name
        roles[role].append(cpu.last.get(pid, start) - start)
    ranked = sorted(roles.items(), key=lambda item: -sum(item[1]))
    return ", ".join(f"{role} {len(seconds)} x ({' '.join(f'{s:.1f}' for s in sorted(seconds, reverse=True)[:6])})"
                     for role, seconds in ranked if sum(seconds) >= 0.5)


def part_job(args) -> None:
    import tempfile

    import ray
    from bench_pipeline_overhead import CpuAccount, DatasetStats
    from free_method import FREE_CLIPDIY, FREE_NACLIP, ray_runtime_env, register
    from model_factories import make_clip_config

    from clipdiy.pipeline.config import LabelJobConfig
    from clipdiy.pipeline.control.run import run_labelling
    from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig

    register()
    images = small_jpegs(args.images, max_side=args.max_side)
    with tempfile.TemporaryDirectory(prefix="clipdiy-bench-shards-") as tmp:
        workdir = Path(tmp)
        write_local_shards(workdir / "shards", images, args.shards)
        write_local_shards(workdir / "one-shard", images[:args.batch_size], 1)
        tenth = len(images) // 10
        if args.tenth:  # the same number of shards, a tenth of the samples: differencing cancels each run's start-up
            write_local_shards(workdir / "tenth", images[:tenth], args.shards)
        method = FREE_NACLIP if args.free == "naclip" else FREE_CLIPDIY
        segmenter = SegmenterConfig(method=method, vocabulary="voc", clip=make_clip_config(workdir / "clip", arch="tiny"),
                                    saliency=SaliencyConfig(backend="none"), device="cpu")
        tars = sorted((workdir / "shards").glob("*.tar"))
        print(f"{len(images)} JPEGs in {len(tars)} local shards, {method}, batch {args.batch_size}, {args.cores} cores; "
              f"{load_average()}", flush=True)
        bare_images, bare_cpu, bare_wall = timed_pool(bare_shard_loop, tars, args.cores)
        assert bare_images == len(images)
        bare_rate = bare_images / bare_cpu
        print(f"bare tarfile read+decode loop: {bare_images / bare_wall:.1f} images/s on {args.cores} processes, "
              f"{bare_rate:.1f} images per CPU-second; {load_average()}", flush=True)
        global _WORK
        _WORK = WorkLoop(segmenter, args.batch_size, args.decode_batch_size)
        work_images, work_cpu, work_wall = timed_pool(work_loop, tars, args.cores)
        assert work_images == len(images)
        work_rate = work_images / work_cpu
        print(f"bare loop of the job's work (read, decode, the method's preparation, free model, rows, Parquet; no "
              f"Ray): {work_images / work_wall:.1f} images/s on {args.cores} processes, {work_rate:.1f} images per "
              f"CPU-second ({1000 / work_rate:.2f} ms/image); {load_average()}", flush=True)

        if args.compare_loose:  # the same images as loose local files, for the job's per-image cost without shards
            for folder, chosen in (("loose", images), ("one-batch", images[:args.batch_size])):
                (workdir / folder).mkdir()
                for number, data in enumerate(chosen):
                    (workdir / folder / f"{key_of(number)}.jpg").write_bytes(data)

        ray.init(num_cpus=args.cores, include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env())
        try:
            def job(corpus: Path, output: Path, input_format: str = "webdataset"):
                config = LabelJobConfig(
                    input=str(corpus), output=str(output), input_format=input_format, segmenter=segmenter, device="cpu",
                    inference_batch_size=args.batch_size, decode_batch_size=args.decode_batch_size,
                    cpus_per_actor=0.5, torch_threads=1, min_actors=1, max_actors=1,
                    rows_per_file=args.rows_per_file, actor_memory_gb=0)
                return run_labelling(config)

            job(workdir / "one-shard", workdir / "warm-up")  # worker processes and imports, not timed
            with CpuAccount() as first_cpu:
                first = job(workdir / "one-shard", workdir / "labels-one-shard")
            if args.tenth:
                with CpuAccount() as tenth_cpu:
                    tenth_summary = job(workdir / "tenth", workdir / "labels-tenth")
                assert tenth_summary.ok == tenth, tenth_summary.line()
            with CpuAccount() as cpu, DatasetStats() as stages:
                summary = job(workdir / "shards", workdir / "labels")
            assert summary.ok == len(images), summary.line()
            if args.compare_loose:
                with CpuAccount() as loose_first_cpu:
                    loose_first = job(workdir / "one-batch", workdir / "labels-loose-one-batch", "files")
                with CpuAccount() as loose_cpu:
                    loose_summary = job(workdir / "loose", workdir / "labels-loose", "files")
                assert loose_summary.ok == len(images), loose_summary.line()
        finally:
            ray.shutdown()
        print(stages.text, flush=True)
        print(f"CPU time of the job: {cpu.line()}", flush=True)
        print(f"CPU time of the one-shard job: {first_cpu.line()}", flush=True)
        marginal = (cpu.seconds - first_cpu.seconds) / (len(images) - first.ok)
        print(f"job over shards, by CPU time: {len(images) / cpu.seconds:.1f} images per CPU-second whole run, "
              f"{1 / marginal:.1f} beyond a one-shard run ({marginal * 1000:.1f} ms/image); bare loop {bare_rate:.1f} "
              f"({1000 / bare_rate:.1f} ms/image) -> ratio {1 / marginal / bare_rate:.2f} whole-run "
              f"{len(images) / cpu.seconds / bare_rate:.2f} (goal >= 0.50)", flush=True)
        print(f"job over shards against the bare loop of the same work: {1 / marginal / work_rate:.2f} beyond a "
              f"one-shard run, {len(images) / cpu.seconds / work_rate:.2f} whole run; the job's CPU above that loop's: "
              f"{(marginal - 1 / work_rate) * 1000:.2f} ms/image beyond a one-shard run", flush=True)
        print(f"processes of the job (count x CPU s): {role_processes(cpu)}", flush=True)
        if args.tenth:
            between = (cpu.seconds - tenth_cpu.seconds) / (len(images) - tenth)
            print(f"CPU time of the job over {tenth} images in {args.shards} shards: {tenth_cpu.line()}", flush=True)
            print(f"processes of that job (count x CPU s): {role_processes(tenth_cpu)}", flush=True)
            print(f"job over shards between {tenth} and {len(images)} images (start-up cancelled): "
                  f"{between * 1000:.2f} ms/image; bare loop of the same work {1000 / work_rate:.2f} ms/image -> ratio "
                  f"{1 / between / work_rate:.2f}; above that loop: {(between - 1 / work_rate) * 1000:.2f} ms/image; "
                  f"against the bare read+decode loop: {1 / between / bare_rate:.3f}; {load_average()}", flush=True)
        print(f"job: {summary.images_per_second:.1f} images/s labelling phase ({summary.line()}); bare loop "
              f"{bare_images / bare_wall:.1f} images/s; {load_average()}", flush=True)
        if args.compare_loose:
            loose_marginal = (loose_cpu.seconds - loose_first_cpu.seconds) / (len(images) - loose_first.ok)
            print(f"CPU time of the job over loose files: {loose_cpu.line()}", flush=True)
            print(f"job over the same images as loose local files: {len(images) / loose_cpu.seconds:.1f} images per "
                  f"CPU-second whole run, {1 / loose_marginal:.1f} beyond a one-batch run ({loose_marginal * 1000:.1f} "
                  f"ms/image) -> shards / loose {loose_marginal / marginal:.2f} by CPU time; {load_average()}", flush=True)


def timed_pool(loop, tars: list, cores: int) -> tuple[int, float, float]:
    """(images, CPU-seconds, wall seconds) of ``loop`` over ``tars`` split across ``cores`` forked
    processes; a first untimed pass over one shard in each process takes imports and first-call
    costs (every output size once) out of the figures."""
    with multiprocessing.get_context("fork").Pool(cores) as pool:
        pool.map(loop, [tars[:1]] * cores)
        started = time.perf_counter()
        results = pool.map(loop, [tars[i::cores] for i in range(cores)])
        wall = time.perf_counter() - started
    return sum(r[0] for r in results), sum(r[1] for r in results), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("reads", "job"), default="reads")
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--shards", type=int, default=10)
    parser.add_argument("--max-side", type=int, default=192, help="longer side of the largest JPEGs (px)")
    parser.add_argument("--cores", type=int, default=2, help="reading processes (reads), CPUs of the local Ray (job)")
    parser.add_argument("--threads", type=int, default=16, help="reads: threads per process (requests in flight)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="reads: added to every request moto answers")
    parser.add_argument("--paths", nargs="+", choices=("loose", "shards", "address"), default=["loose", "shards", "address"])
    parser.add_argument("--repeat", type=int, default=1, help="reads: rounds over the paths")
    parser.add_argument("--json", help="reads: write the results here")
    parser.add_argument("--free", choices=("naclip", "clipdiy"), default="naclip", help="job: the free method")
    parser.add_argument("--batch-size", type=int, default=16, help="job: inference batch (and the one-shard run's size)")
    parser.add_argument("--decode-batch-size", type=int, default=16)
    parser.add_argument("--rows-per-file", type=int, default=2048)
    parser.add_argument("--tenth", action="store_true",
                        help="job: also the job over a tenth of the images in as many shards, differenced out")
    parser.add_argument("--compare-loose", action="store_true",
                        help="job: also the job over the same images as loose local files")
    args = parser.parse_args()
    if args.part == "reads":
        part_reads(args)
    else:
        part_job(args)


if __name__ == "__main__":
    main()
