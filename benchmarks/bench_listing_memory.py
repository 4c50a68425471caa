"""Driver memory of streaming a listing: ``iter_sources`` over 1,000 vs 50,000 tiny objects.

For each size and layout it reports the tracemalloc peak of the driver *while iterating* (the
listing consumed one object at a time, as the job does), next to the peak of materialising
the same listing as one list (what a non-streaming listing would cost), plus the process RSS
growth. Streaming must stay flat as the listing grows.

Layouts: local ``nested`` (folders of 1,000 files), local ``flat`` (one folder), and ``s3``
(one flat prefix on a moto S3 server started as a separate process on 127.0.0.1, so the
server's own memory is not counted; 1,000 vs 10,000 keys by default, because moto's listing
cost grows quadratically with the bucket, not because of anything in the driver).

    python benchmarks/bench_listing_memory.py                # local 1000 / 50000, S3 1000 / 10000
    python benchmarks/bench_listing_memory.py --sizes 1000 5000 --s3-sizes 1000 50000 --layouts nested s3
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from clipdiy.pipeline.sources.listing import iter_sources
from clipdiy.storage import StorageOptions

PAYLOAD = b"\xff\xd8\xff\xd9"  # a 4-byte "jpeg": listing never reads it


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(uri: str, options: StorageOptions | None) -> dict:
    """tracemalloc peak (MB) of streaming vs materialising the listing of ``uri``."""
    results = {}
    for how in ("stream", "list"):
        gc.collect()
        rss_before = rss_mb()
        tracemalloc.start()
        start = time.perf_counter()
        if how == "stream":
            count = sum(1 for _ in iter_sources(uri, options))
        else:
            listing = list(iter_sources(uri, options))
            count = len(listing)
        seconds = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if how == "list":
            del listing
        results[how] = {"count": count, "peak_mb": peak / 2**20, "seconds": seconds,
                        "rss_growth_mb": rss_mb() - rss_before}
    return results


def make_local(root: Path, n: int, per_dir: int | None) -> None:
    for i in range(n):
        folder = root if per_dir is None else root / f"d{i // per_dir:04d}"
        if i == 0 or (per_dir and i % per_dir == 0):
            folder.mkdir(parents=True, exist_ok=True)
        (folder / f"img_{i:07d}.jpg").write_bytes(PAYLOAD)


# Runs in a separate process: a moto S3 server whose buckets are filled straight through moto's
# backend (50,000 HTTP PUTs would take minutes); the benchmark then lists them over HTTP.
MOTO_SERVER = """
import logging
import sys
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import ThreadedMotoServer
logging.getLogger("werkzeug").setLevel(logging.WARNING)
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
for n in map(int, sys.argv[1:]):
    backend.create_bucket(f"bench-{n}", "us-east-1")
    for i in range(n):
        backend.put_object(f"bench-{n}", f"flat/img_{i:07d}.jpg", PAYLOAD)
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()  # serve until the benchmark closes our stdin
server.stop()
"""


def start_moto(sizes: list[int]) -> tuple[subprocess.Popen, str]:
    code = f"PAYLOAD = {PAYLOAD!r}\n" + MOTO_SERVER
    proc = subprocess.Popen([sys.executable, "-c", code, *map(str, sizes)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    port = proc.stdout.readline().strip()
    if not port.isdigit():
        proc.kill()
        raise RuntimeError("moto server did not start")
    return proc, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 50000])
    parser.add_argument("--s3-sizes", type=int, nargs="+", default=[1000, 10000],
                        help="moto sorts every key of a bucket for each listed page, so its listing "
                             "time grows quadratically: 50,000 keys take ~10 min there")
    parser.add_argument("--layouts", nargs="+", default=["nested", "flat", "s3"],
                        choices=["nested", "flat", "s3"])
    args = parser.parse_args()

    print(f"load average before: {os.getloadavg()}  cpus: {os.cpu_count()}")
    print(f"{'layout':7} {'objects':>8} {'stream peak MB':>15} {'list peak MB':>13} "
          f"{'stream RSS+ MB':>15} {'stream s':>9}")
    moto = None
    try:
        for layout in args.layouts:
            for n in args.s3_sizes if layout == "s3" else args.sizes:
                with tempfile.TemporaryDirectory() as tmp:
                    if layout == "s3":
                        if moto is None:
                            t = time.perf_counter()
                            moto, endpoint = start_moto(args.s3_sizes)
                            print(f"  (moto S3 filled with {args.s3_sizes} objects in "
                                  f"{time.perf_counter() - t:.0f} s)", flush=True)
                            os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
                            os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
                            os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
                        options = StorageOptions(endpoint_url=endpoint)
                        uri = f"s3://bench-{n}/flat"
                    else:
                        options = None
                        make_local(Path(tmp), n, 1000 if layout == "nested" else None)
                        uri = tmp
                    # Warm-up: client creation (botocore loads its service models) is a one-off
                    # cost of the process, not of the listing's size.
                    next(iter_sources(uri, options))
                    r = measure(uri, options)
                    assert r["stream"]["count"] == r["list"]["count"] == n, r
                    print(f"{layout:7} {n:>8} {r['stream']['peak_mb']:>15.2f} {r['list']['peak_mb']:>13.2f} "
                          f"{r['stream']['rss_growth_mb']:>15.1f} {r['stream']['seconds']:>9.2f}", flush=True)
    finally:
        if moto is not None:
            moto.stdin.close()
            try:
                moto.wait(timeout=30)
            except subprocess.TimeoutExpired:
                moto.kill()
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
