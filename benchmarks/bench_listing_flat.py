"""Listing a flat S3 prefix (``images/<sha1>.jpg``, one folder) with 1 and with 16 listing tasks.

Against a moto S3 server on 127.0.0.1, the prefix is listed, and every key checked to come
exactly once, three ways:

- ``sequential``: :func:`iter_sources`, one client paging through (what any number of listing
  tasks did for a flat prefix before it was split by key range);
- ``threads``: :func:`listing_parts` (the split) then :func:`iter_part_sources` of the parts in a
  pool of N threads: the split and its parallelism without Ray's per-task overheads;
- ``ray``: the job's own listing (:func:`clipdiy.pipeline.planning.pending.listing_dataset`, as a first
  run streams it into the labelling) on a local Ray with ``--listing-tasks N``.

Reported for each: wall time to the last key (the split included), parts, listing requests,
and for ``threads`` the pages of the busiest task (the parts dealt to the N tasks longest first):
the requests that wait on one another after the split. Where the store's latency dominates (S3:
tens of ms to a few hundred a page), the wall time follows them; on a small shared machine,
where parsing 1,000-key pages is what costs, it does not.

The keys are put into moto's backend directly (in this process: the server is threaded in it),
since 100,000 PUTs over HTTP take most of an hour. Two things about moto would hide what the
split buys, so the server can be changed (both flags are printed with the numbers):

- moto sorts the whole bucket on every ListObjectsV2 request (even ``MaxKeys=1``), a cost that
  grows with the bucket; ``--indexed`` answers un-delimited listings from a sorted index
  instead (bisect + one page), as S3 does;
- moto answers in microseconds where S3 takes tens of milliseconds a page, and its server is
  one Python process; ``--latency-ms`` adds a sleep per listing request (which releases the
  GIL, as a remote store's wait does).

    nice -n 10 python benchmarks/bench_listing_flat.py --keys 100000 --indexed --latency-ms 50
    python benchmarks/bench_listing_flat.py --keys 20000 --runners sequential threads   # stock moto
"""

from __future__ import annotations

import argparse
import bisect
import concurrent.futures
import math
import hashlib
import logging
import os
import sys
import threading
import time

BUCKET = "flat-listing-bench"
PREFIX = "images/"


def fill_bucket(keys: int) -> None:
    """``keys`` objects ``images/<sha1(i)>.jpg`` of 4 bytes, put into moto's backend directly."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    backend.create_bucket(BUCKET, "us-east-1")
    for i in range(keys):
        backend.put_object(BUCKET, f"{PREFIX}{hashlib.sha1(str(i).encode()).hexdigest()}.jpg", b"\xff\xd8\xff\xd9")


class ServerChanges:
    """Counts ListObjectsV2 requests; optionally answers them from a sorted index, after a delay."""

    def __init__(self, indexed: bool, latency_s: float):
        from moto.s3.models import S3Backend

        self.requests = 0
        self._lock = threading.Lock()
        self._index: dict[str, list[str]] = {}
        original = S3Backend.list_objects_v2
        changes = self

        def list_objects_v2(backend, bucket, prefix, delimiter, continuation_token, start_after, max_keys):
            with changes._lock:
                changes.requests += 1
            if latency_s:
                time.sleep(latency_s)
            if not indexed or delimiter:
                return original(backend, bucket, prefix, delimiter, continuation_token, start_after, max_keys)
            names = changes._sorted_names(bucket)
            after = backend._pagination_tokens.get(continuation_token) if continuation_token else start_after
            start = max(bisect.bisect_left(names, prefix or ""), bisect.bisect_right(names, after) if after else 0)
            page = [n for n in names[start : start + max_keys + 1] if n.startswith(prefix or "")]
            return backend._truncate_result([bucket.keys[n] for n in page], max_keys)

        S3Backend.list_objects_v2 = list_objects_v2

    def _sorted_names(self, bucket) -> list[str]:
        with self._lock:
            names = self._index.get(bucket.name)
            if names is None or len(names) != len(bucket.keys):
                names = self._index[bucket.name] = sorted(bucket.keys.keys())
            return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--indexed", action="store_true", help="answer listings from a sorted index (as S3 does)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added delay per ListObjectsV2 request")
    parser.add_argument("--runners", nargs="+", choices=("sequential", "threads", "ray"),
                        default=["sequential", "threads", "ray"])
    args = parser.parse_args()

    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    from moto.server import ThreadedMotoServer

    import ray

    from clipdiy.pipeline.sources.listing import iter_sources
    from clipdiy.pipeline.sources.listing_parts import iter_part_sources, listing_parts
    from clipdiy.pipeline.planning.pending import PARTS_PER_LISTING_TASK, PlanTarget, listing_dataset
    from clipdiy.storage import StorageOptions

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        started = time.perf_counter()
        fill_bucket(args.keys)
        print(f"put {args.keys} keys into moto's backend in {time.perf_counter() - started:.1f} s", flush=True)
        changes = ServerChanges(args.indexed, args.latency_ms / 1000)
        host, port = server.get_host_and_port()
        storage = StorageOptions(endpoint_url=f"http://{host}:{port}", connect_timeout=10, read_timeout=120)
        uri = f"s3://{BUCKET}/{PREFIX}"
        print(f"server: moto {'indexed' if args.indexed else 'stock'}, +{args.latency_ms:g} ms a listing request; "
              f"{os.cpu_count()} cores on this machine, load average {os.getloadavg()[0]:.1f}", flush=True)

        def report(runner: str, tasks: int, ids: list[str], seconds: float, requests: int, parts: int) -> None:
            assert len(ids) == args.keys == len(set(ids)), (len(ids), len(set(ids)))
            print(f"{runner:>10} {tasks:>3} task(s): {len(ids)} keys, each once, in {seconds:6.1f} s "
                  f"({len(ids) / seconds:,.0f} keys/s), {parts} part(s), {requests} listing requests", flush=True)

        if "sequential" in args.runners:
            before, started = changes.requests, time.perf_counter()
            ids = [source.image_id for source in iter_sources(uri, storage)]
            report("sequential", 1, ids, time.perf_counter() - started, changes.requests - before, 1)
        for tasks in args.tasks if "threads" in args.runners else ():
            before, started = changes.requests, time.perf_counter()
            parts = list(listing_parts(uri, storage, min_parts=PARTS_PER_LISTING_TASK * tasks))
            split_requests = changes.requests - before

            def list_part(part):
                # Its pages: a bounded range ends on the page that passes its end.
                listed = [s.image_id for s in iter_part_sources(uri, part, storage)]
                pages = len(listed) // 1000 + 1 if part.end_at is not None else max(1, math.ceil(len(listed) / 1000))
                return listed, pages

            with concurrent.futures.ThreadPoolExecutor(tasks) as pool:
                results = list(pool.map(list_part, parts))
            ids = [image_id for listed, _ in results for image_id in listed]
            report("threads", tasks, ids, time.perf_counter() - started, changes.requests - before, len(parts))
            loads = [0] * tasks
            for pages in sorted((pages for _, pages in results), reverse=True):
                loads[loads.index(min(loads))] += pages
            print(f"{'':>10} split: {split_requests} requests (nodes split concurrently); then the busiest task's "
                  f"pages: {max(loads)}, one after another", flush=True)
        if "ray" in args.runners:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            for tasks in args.tasks:
                target = PlanTarget(input_uri=uri, output_uri="/nonexistent", storage=storage, run_id="bench",
                                    attempt=1, retry_errors="transient", block_rows=1000, listing_tasks=tasks)
                before, started = changes.requests, time.perf_counter()
                dataset = listing_dataset(target, 1000)
                ids = [image_id for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None)
                       for image_id in batch.column("image_id").to_pylist()]
                seconds, requests = time.perf_counter() - started, changes.requests - before
                parts = sum(1 for _ in listing_parts(uri, storage, min_parts=PARTS_PER_LISTING_TASK * tasks))
                report("ray", tasks, ids, seconds, requests, parts)
            ray.shutdown()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
