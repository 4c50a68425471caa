"""Calls per second the run's health actors take: is the attempt ledger a bottleneck?

Every decode, inference and row-building batch registers with the attempt ledger before it
works (:class:`~clipdiy.pipeline.stages.health.AttemptLedger`). This measures, on a local Ray,
``--callers`` processes that each register batches as fast as they can (the stage's work left
out, so the ledger alone sets the pace), against ``--shards`` ledger actors:

- ``per batch``: what one batch of one stage costs in actor calls (begin at its ledger shard,
  the end carried by the next begin; a decode batch also reports its reads to the reads actor,
  without waiting);
- the batches per second the ledger serves, and the actor calls per second that is;
- the images per second it would carry at ``--images-per-batch`` images a batch and three
  stages a batch (decode, inference, rows), to set against the target of 11,600 images/s (a
  billion a day).

    python benchmarks/bench_run_health.py --callers 2 --shards 1 --seconds 5
    python benchmarks/bench_run_health.py --callers 8 --shards 4 --seconds 5

One actor serves its calls on one thread, so its rate is about the cost of one call on the head
node's CPU; ``--shards`` actors (keys spread by hash) multiply it where cores are free. A real
cluster's callers are on other nodes (network round trips add latency to each call, not load to
the actor): the actor's rate is what bounds the cluster.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGET_IMAGES_PER_SECOND = 11_600  # a billion a day (issue 26)
STAGES = 3  # decode, inference, rows: each batch registers once per stage


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--callers", type=int, default=2, help="processes registering batches at once")
    parser.add_argument("--shards", type=int, default=1, help="ledger actors (RunHealth's ledger shards)")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long each caller registers batches")
    parser.add_argument("--images-per-batch", type=int, default=8)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="the local Ray's CPUs")
    args = parser.parse_args(argv)

    import ray

    from clipdiy.pipeline.stages.attempts import AttemptLedger
    from clipdiy.pipeline.stages.health import report_reads
    from clipdiy.pipeline.stages.health_actors import start_run_health

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)  # never a running one
    try:
        health = start_run_health(200, ledger_shards=args.shards)

        @ray.remote(num_cpus=0)
        def register(caller: int, seconds: float, images: int) -> tuple[int, float]:
            ledger = AttemptLedger(health, "decode", max_deaths=1)
            batches = 0
            start = time.perf_counter()
            while time.perf_counter() - start < seconds:
                ids = [f"c{caller}/b{batches}/{i}.jpg" for i in range(images)]
                attempt = ledger.begin(ids)
                attempt.end()
                report_reads(health, images, {})  # a decode batch's report, to the reads actor, not waited on
                batches += 1
            AttemptLedger.flush(health)
            return batches, time.perf_counter() - start

        ray.get(register.remote(0, 0.5, args.images_per_batch))  # warm: workers started, code imported
        results = ray.get([register.remote(c + 1, args.seconds, args.images_per_batch) for c in range(args.callers)])
        # The ledger kept up only if its queue is empty now: wait for every call in flight.
        drained = time.perf_counter()
        ray.get([shard.attempts_on_record.remote() for shard in health.shards] + [health.reads.verdict.remote()])
        drain_s = time.perf_counter() - drained
        batches = sum(b for b, _ in results)
        seconds = max(s for _, s in results) + drain_s
        # One registration per batch at a ledger shard, one read report at the reads actor.
        per_batch = 2
        rate = batches / seconds
        calls = rate * per_batch
        images = rate * args.images_per_batch / STAGES
        records = sum(ray.get([shard.attempts_on_record.remote() for shard in health.shards]))
        print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}; "
              f"ray {ray.__version__}")
        print(f"callers {args.callers}, ledger shards {args.shards}, {args.images_per_batch} images a batch")
        print(f"batches registered: {batches} in {seconds:.2f} s (queue drained in {drain_s:.2f} s): "
              f"{rate:,.0f} batches/s")
        print(f"actor calls per batch: {per_batch:.2f}; actor calls/s: {calls:,.0f} "
              f"({rate / args.shards:,.0f} registrations/s per ledger shard)")
        print(f"images/s carried ({STAGES} stages a batch): {images:,.0f} "
              f"({images / TARGET_IMAGES_PER_SECOND:.2f}x the {TARGET_IMAGES_PER_SECOND:,} images/s target)")
        print(f"records left in the ledger: {records} (ends not yet sent: at most one per process and shard)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
