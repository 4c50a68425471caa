"""Driver time to gather a resumed run's shard records for its manifest, at N and 10 N shards.

A run folder of N committed shards (``part-*.parquet``, 100 rows each, a ``status`` column) is
put into a moto S3 server on 127.0.0.1 (straight into moto's backend: N PUTs over HTTP would
dominate), then the records every shard gets in the manifest (rows, ok, error, bytes) are
gathered two ways, and checked equal:

- ``driver``: what the job did before: the driver reads each shard's ``status`` column and
  asks its size, one shard after another (two requests a shard);
- ``tasks``: :func:`clipdiy.pipeline.planning.manifest.shard_records`: one listing of the run folder
  (sizes come with it), the counting done by at most ``--tasks`` Ray tasks (local Ray, 2 CPUs);
- ``one task here``: what one of those tasks does (16 reads at a time), run in this process
  over all the shards: the concurrency without Ray's task starts.

``--latency-ms`` adds a sleep to every GET/HEAD the server answers (a remote store's wait; moto
answers in microseconds).

    nice -n 10 python benchmarks/bench_manifest_stats.py --shards 100 1000 --latency-ms 20
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

BUCKET = "manifest-stats-bench"


def fill_run(run_id: str, shards: int) -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    if BUCKET not in backend.buckets:
        backend.create_bucket(BUCKET, "us-east-1")
    for index in range(shards):
        statuses = ["ok" if (index + row) % 7 else "error" for row in range(100)]
        sink = io.BytesIO()
        pq.write_table(pa.table({"image_id": [f"{index}-{row}" for row in range(100)], "status": statuses}), sink)
        backend.put_object(BUCKET, f"labels/runs/{run_id}/part-001-{index:08x}.parquet", sink.getvalue())


def add_latency(seconds: float) -> None:
    from moto.s3.responses import S3Response

    for name in ("get_object", "head_object"):
        original = getattr(S3Response, name)

        def slowed(self, *args, _original=original, **kwargs):
            time.sleep(seconds)
            return _original(self, *args, **kwargs)

        setattr(S3Response, name, slowed)


def driver_records(layout, run_id: str) -> list[dict]:
    """The earlier code: each shard read by the driver, one after another."""
    records = []
    for path in layout.shard_paths(run_id):
        status = pq.read_table(path, columns=["status"], filesystem=layout.fs).column("status")
        ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
        records.append({"path": layout.relative(path), "rows": len(status), "ok": ok, "error": len(status) - ok,
                        "bytes": layout.fs.size(path)})
    return records


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()

    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_EC2_METADATA_DISABLED": "true"})
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    import ray
    from moto.server import ThreadedMotoServer

    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.planning.manifest import _count_shards, shard_records
    from clipdiy.storage import StorageOptions

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        if args.latency_ms:
            add_latency(args.latency_ms / 1000)
        host, port = server.get_host_and_port()
        storage = StorageOptions(endpoint_url=f"http://{host}:{port}", connect_timeout=10, read_timeout=120)
        layout = OutputLayout.open(f"s3://{BUCKET}/labels", storage)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        fill_run("warm-up", 2)
        shard_records(layout, "warm-up", {}, storage=storage, tasks=1)  # Ray Data's first-use costs, not counted
        print(f"moto S3 +{args.latency_ms:g} ms a GET/HEAD; Ray local, 2 CPUs, stats tasks {args.tasks}; "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}", flush=True)
        for shards in args.shards:
            run_id = f"run-{shards}"
            fill_run(run_id, shards)
            started = time.perf_counter()
            before = driver_records(layout, run_id)
            driver_s = time.perf_counter() - started
            started = time.perf_counter()
            after = shard_records(layout, run_id, {}, storage=storage, tasks=args.tasks)
            tasks_s = time.perf_counter() - started
            started = time.perf_counter()
            sizes = layout.shard_sizes(run_id)
            here = _count_shards(pa.table({"path": [p for p, _ in sizes], "bytes": [n for _, n in sizes]}),
                                 output_uri=layout.uri, storage=storage).to_pylist()
            here_s = time.perf_counter() - started
            assert after == before == here and len(after) == shards
            print(f"{shards:>6} shards: driver reads each {driver_s:7.1f} s | Ray tasks {tasks_s:7.1f} s | "
                  f"one task here {here_s:7.1f} s (records equal)", flush=True)
        ray.shutdown()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
