"""Memory of streaming one tar shard (``iter_shard_samples``): bounded by one image, not the shard.

Builds a tar of N samples (``KEY.jpg`` of ``--image-kb`` random bytes, ``KEY.txt``, ``KEY.json``,
as img2dataset writes them) in a temporary file, then streams it through the job's reader the
way the expanding stage does (an fsspec local file, 8 MB read-ahead blocks), dropping each
sample's bytes once seen. Reports, per shard size, the shard's bytes, the peak of Python
allocations while reading (``tracemalloc``: the reader's buffers, the images it holds, its
set of keys) and the read rate. Run at two sizes 10x apart to see what grows:

    nice -n 10 python benchmarks/bench_shard_reader_memory.py --samples 1000 10000 --image-kb 50
"""

from __future__ import annotations

import argparse
import io
import os
import tarfile
import tempfile
import time
import tracemalloc

import fsspec

from clipdiy.pipeline.sources.webdataset import iter_shard_samples
from clipdiy.pipeline.stages.expand import READ_BLOCK_BYTES


def write_shard(path: str, samples: int, image_bytes: int) -> None:
    payload = os.urandom(image_bytes)
    with tarfile.open(path, "w") as tar:
        for n in range(samples):
            key = f"{n:09d}"
            for extension, data in (("jpg", payload), ("txt", b"a caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def measure(samples: int, image_kb: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "00000.tar")
        write_shard(path, samples, image_kb * 1024)
        size = os.path.getsize(path)
        fs = fsspec.filesystem("file")
        tracemalloc.start()
        started = time.perf_counter()
        count = 0
        with fs.open(path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead") as handle:
            for sample in iter_shard_samples(handle, "00000.tar"):
                count += sample.data is not None
        seconds = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert count == samples
    return {"samples": samples, "shard_mb": size / 2**20, "peak_mb": peak / 2**20, "seconds": seconds,
            "samples_per_s": samples / seconds, "mb_per_s": size / 2**20 / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--image-kb", type=int, default=50)
    args = parser.parse_args()
    print(f"{'samples':>8} {'shard MB':>9} {'peak MB':>8} {'s':>7} {'samples/s':>10} {'MB/s':>7}")
    for samples in args.samples:
        r = measure(samples, args.image_kb)
        print(f"{r['samples']:>8} {r['shard_mb']:>9.1f} {r['peak_mb']:>8.2f} {r['seconds']:>7.2f} "
              f"{r['samples_per_s']:>10.0f} {r['mb_per_s']:>7.0f}")


if __name__ == "__main__":
    main()
