"""Nightly planning at scale: time and driver peak RSS of deciding which listed images need labels.

For each N it builds (once, cached under --workdir) a synthetic OUTPUT of N labelled rows in the
job's real row schema (``label_schema()``; the heavy mask/score columns null), spread over
``--runs`` finished runs of ``--rows-per-shard``-row shards, 1% of them ``unreadable`` error rows;
and a Parquet manifest input (``uri``, ``size``, ``mtime``) of those N images (0.5% of them with
a changed size) plus 1% new entries. Then, in a fresh driver process per measurement, it plans a
run over that input exactly as the job does (``planning.plan_pending``, Ray Data joins on an
embedded ``--num-cpus`` Ray) and reports the planning wall time and the driver's peak RSS
(``ru_maxrss``) before and after planning (the growth is what planning costs the driver).

``--old REV`` also times the planning of git revision REV (e.g. ``main`` before this change:
``labelled_keys`` + ``pending_blocks`` in the driver), for comparison.

    python benchmarks/bench_planning.py --sizes 100000 1000000
    python benchmarks/bench_planning.py --sizes 100000 1000000 --old 132d4cf
    python benchmarks/bench_planning.py --sizes 10000000          # once, by hand (minutes)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO_ROOT = Path(__file__).resolve().parent.parent
STARTED = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _ids(start: int, stop: int) -> pa.Array:
    return pa.array([f"photos/{i // 10000:05d}/{i:010d}.jpg" for i in range(start, stop)], pa.string())


def build(workdir: Path, n: int, runs: int, rows_per_shard: int) -> None:
    """Write OUTPUT (``workdir/labels``) and the manifest (``workdir/input/manifest.parquet``)."""
    from clipdiy.schema import label_schema

    schema = label_schema()
    output = workdir / "labels"
    per_run = -(-n // runs)
    for run in range(runs):
        run_id = f"2026010{run + 1}T000000Z-bench{run}"
        run_dir = output / "runs" / run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        first, last = run * per_run, min(n, (run + 1) * per_run)
        for shard, start in enumerate(range(first, last, rows_per_shard)):
            stop = min(last, start + rows_per_shard)
            rows = stop - start
            index = np.arange(start, stop)
            error = index % 100 == 7  # 1% unreadable: retried by the default --retry-errors
            columns = {
                "schema_version": pa.array(["1"] * rows), "run_id": pa.array([run_id] * rows),
                "run_started_at": pa.array([STARTED] * rows, pa.timestamp("us", tz="UTC")),
                "image_id": _ids(start, stop), "uri": pa.array(["file:///in/x.jpg"] * rows),
                "source_size": pa.array(1000 + index % 5000, pa.int64()),
                "source_mtime": pa.array([STARTED] * rows, pa.timestamp("us", tz="UTC")),
                "status": pa.array(np.where(error, "error", "ok")),
                "error_kind": pa.array(np.where(error, "unreadable", None)),
            }
            for name in ("vocabulary_name", "vocabulary_hash", "clip_model", "clip_weights", "saliency_backend",
                         "mode", "clipdiy_version"):
                columns[name] = pa.array(["bench"] * rows)
            table = pa.table([columns.get(f.name, pa.nulls(rows, f.type)) for f in schema], schema=schema)
            pq.write_table(table, run_dir / f"part-001-{shard:06d}.parquet")
        (run_dir / "_MANIFEST.json").write_text(json.dumps({"run_id": run_id, "status": "finished"}))
    (workdir / "input").mkdir(exist_ok=True)
    total = n + n // 100
    index = np.arange(total)
    size = np.where(index < n, 1000 + index % 5000, 1000)
    size = np.where((index < n) & (index % 200 == 3), size + 1, size)  # 0.5% changed since labelled
    # Entries relative to the manifest's folder: their image ids are the rows' ids.
    pq.write_table(
        pa.table({
            "uri": _ids(0, total),
            "size": pa.array(size, pa.int64()),
            "mtime": pa.array([STARTED] * total, pa.timestamp("us", tz="UTC")),
        }),
        workdir / "input" / "manifest.parquet",
        row_group_size=65536,
    )
    (workdir / "READY").write_text(json.dumps({"n": n, "runs": runs, "rows_per_shard": rows_per_shard, "listed": total}))


def plan_new(workdir: Path, rows_per_shard: int, num_cpus: int) -> dict:
    import ray

    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.planning.manifest import finished_run_ids
    from clipdiy.pipeline.planning.pending import PlanTarget, plan_pending, remove_plans
    from clipdiy.storage import StorageOptions

    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    before = peak_rss_mb()
    output = str(workdir / "labels")
    layout = OutputLayout.open(output)
    target = PlanTarget(input_uri=str(workdir / "input" / "manifest.parquet"), output_uri=output,
                        storage=StorageOptions(), run_id="bench-run", attempt=1, retry_errors="transient",
                        block_rows=64)
    started = time.monotonic()
    plan = plan_pending(target, finished_run_ids(layout), estimated_rows_per_shard=rows_per_shard)
    seconds = time.monotonic() - started
    counts = plan.counts
    remove_plans(layout, "bench-run")
    (layout.fs.rm(layout.run_dir("bench-run"), recursive=True) if layout.fs.exists(layout.run_dir("bench-run")) else None)
    ray.shutdown()
    return {"seconds": round(seconds, 2), "rss_before_mb": round(before), "rss_peak_mb": round(peak_rss_mb()),
            "listed": counts.listed, "skipped": counts.skipped, "todo": counts.todo, "retried": counts.retried}


def plan_old(workdir: Path, rev: str) -> dict:
    """The planning of git revision ``rev`` (driver-side is_in), blocks put as the job did."""
    import importlib.util

    import ray

    source = subprocess.run(["git", "show", f"{rev}:clipdiy/pipeline/planning/incremental.py"], cwd=REPO_ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "old_incremental.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("old_incremental", path)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_incremental"] = old  # dataclasses look their module up
    spec.loader.exec_module(old)

    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.sources.listing import iter_sources
    from clipdiy.pipeline.planning.manifest import finished_run_ids

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    before = peak_rss_mb()
    layout = OutputLayout.open(str(workdir / "labels"))
    started = time.monotonic()
    counts = old.ListingCounts()
    other = old.labelled_keys(layout, finished_run_ids(layout), retry_errors="transient")
    blocks = old.pending_blocks(iter_sources(str(workdir / "input" / "manifest.parquet")), counts,
                                done_by_other_runs=other.done, done_by_this_run=old.labelled_keys(layout, ["bench-run"]).done,
                                block_rows=64, retried_errors=other.retry)
    refs = [ray.put(block) for block in blocks]
    seconds = time.monotonic() - started
    del refs
    ray.shutdown()
    return {"seconds": round(seconds, 2), "rss_before_mb": round(before), "rss_peak_mb": round(peak_rss_mb()),
            "listed": counts.listed, "skipped": counts.skipped, "todo": counts.todo, "retried": counts.retried}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--runs", type=int, default=4)
    parser.add_argument("--rows-per-shard", type=int, default=5000)
    parser.add_argument("--num-cpus", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "clipdiy-bench-planning"))
    parser.add_argument("--old", metavar="REV", help="also time the planning of this git revision")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        mode, n = args.child[0], int(args.child[1])
        workdir = Path(args.workdir) / f"n{n}"
        if mode == "build":
            build(workdir, n, args.runs, args.rows_per_shard)
            result = {}
        elif mode == "new":
            result = plan_new(workdir, args.rows_per_shard, args.num_cpus)
        else:
            result = plan_old(workdir, mode.removeprefix("old:"))
        print("RESULT " + json.dumps(result), flush=True)
        return

    def child(mode: str, n: int) -> dict:
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        command = [sys.executable, __file__, "--child", mode, str(n), "--runs", str(args.runs),
                   "--rows-per-shard", str(args.rows_per_shard), "--num-cpus", str(args.num_cpus),
                   "--workdir", args.workdir]
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode or not lines:
            raise SystemExit(f"{mode} {n} failed (rc {done.returncode}):\n{done.stderr[-3000:]}")
        return json.loads(lines[-1].removeprefix("RESULT "))

    results = {}
    for n in args.sizes:
        if not (Path(args.workdir) / f"n{n}" / "READY").exists():
            started = time.monotonic()
            child("build", n)
            print(f"built N={n:,} in {time.monotonic() - started:.0f} s", flush=True)
        results[n] = child("new", n)
        print(f"N={n:>11,} new: {json.dumps(results[n])}", flush=True)
        if args.old:
            print(f"N={n:>11,} old ({args.old}): {json.dumps(child('old:' + args.old, n))}", flush=True)
    if len(args.sizes) >= 2:
        small, large = results[args.sizes[0]], results[args.sizes[-1]]
        growth_small = small["rss_peak_mb"] - small["rss_before_mb"]
        growth_large = large["rss_peak_mb"] - large["rss_before_mb"]
        print(f"time ratio {args.sizes[-1]:,}/{args.sizes[0]:,}: {large['seconds'] / max(small['seconds'], 1e-9):.2f}; "
              f"driver peak RSS {small['rss_peak_mb']} -> {large['rss_peak_mb']} MB "
              f"(ratio {large['rss_peak_mb'] / small['rss_peak_mb']:.2f}; growth during planning "
              f"{growth_small} -> {growth_large} MB)")


if __name__ == "__main__":
    main()
