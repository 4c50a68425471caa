"""The run report (jobs/report.py) over large labels outputs: time and peak RSS at two sizes.

The outputs are those of the readers' benchmark (benchmarks/bench_readers.py): the job's own
output on the COCO sample photos (a tiny random CLIP, ``--saliency none``, ``--vocabulary coco``)
copied into run ``a`` of N rows with unique ids, and a later run ``b`` relabelling 1% of them, in
shards of 1,000 rows. Each size is reported in its own Python process (peak RSS = that process's
VmHWM), beside ``baseline``: a process that only imports the report and matplotlib.

    python benchmarks/bench_report.py                       # N = 200000 and 2000000
    python benchmarks/bench_report.py --sizes 20000
    python benchmarks/bench_report.py --max-keys 2000000 100000   # the readers' key limit and the report's

``--history`` measures what a nightly report costs as the nights pile up: outputs of N nights
(night k labels ``--rows-per-night`` new images and relabels 1% of night k-1's, shards of 1,000
rows; rows copied from 200 rows of random scenes written by the tests' fixture), each reported
twice, each report in its own process (the first fills the cache under OUTPUT/_report, the second
is what every later night costs). Per report: the rows' and manifests' files opened and the bytes
read (``/proc/self/io`` rchar) while collecting, the seconds, the peak RSS (VmHWM) after collecting
and after the page (plots included), and the peak of Arrow's allocations while collecting. ``--code`` runs another checkout's ``clipdiy`` (the code before the cache: its
second report reads everything again).

    python benchmarks/bench_report.py --history 10 100
    python benchmarks/bench_report.py --history 10 100 --code ../main
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from bench_readers import peak_rss_kb, real_output, synthetic_output


def child(labels: str, page: str, max_keys: int | None) -> dict:
    from clipdiy.labels import report

    if labels == "baseline":
        import matplotlib.pyplot  # noqa: F401

        return {"peak_rss_mb": round(peak_rss_kb() / 1024, 1)}
    start = time.perf_counter()
    data = report.write_report(labels, page, report.ReportConfig(max_keys_in_memory=max_keys))
    seconds = time.perf_counter() - start
    return {"rows": data.rows, "shards": data.shards, "read_s": round(data.seconds, 1), "total_s": round(seconds, 1),
            "rows_per_s": round(data.rows / data.seconds), "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
            "page_kb": round(os.path.getsize(page) / 1024), "drifts": len(data.drifts)}


HISTORY_SHARD_ROWS = 1000


def history_output(work: Path, nights: int, rows: int) -> Path:
    """``nights`` finished nights of ``rows`` new images each (and 1% of the previous night's
    relabelled), in shards of :data:`HISTORY_SHARD_ROWS` rows (cached in ``work``)."""
    import datetime as dt

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    output = work / f"history-{nights}x{rows}"
    if (output / "runs" / f"night-{nights - 1:04d}" / "_MANIFEST.json").exists():
        return output
    shutil.rmtree(output, ignore_errors=True)
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from labels_fixtures import (
        VOC_NAMES,
        LabelItem,
        label_row,
        rows_schema,
        write_image,
    )

    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    photo = write_image(work / "photo.png", np.full((20, 30, 3), 128, np.uint8))
    start = dt.datetime(2026, 1, 1, 2, 0, tzinfo=dt.timezone.utc)
    items = []
    for j in range(200):
        scene = np.zeros(600, np.uint8)
        for cls in rng.choice(np.arange(1, 21), 3, replace=False):
            first = int(rng.integers(0, 500))
            scene[first:first + int(rng.integers(20, 100))] = cls
        items.append(LabelItem(f"t{j}", photo, scene.reshape(20, 30),
                               mask_scores={c: float(rng.uniform(0.2, 0.95)) for c in range(21)}))
    template_rows = [label_row(item, VOC_NAMES, "t", start) for item in items]
    template = pa.Table.from_pylist(template_rows, schema=rows_schema(template_rows))
    previous: list[str] = []
    for k in range(nights):
        run_id, started = f"night-{k:04d}", start + dt.timedelta(days=k)
        ids = [f"n{k}/{i}.jpg" for i in range(rows)] + previous[: rows // 100]
        table = template.take(pa.array(np.arange(len(ids)) % template.num_rows))
        for name, values in (("image_id", ids), ("uri", [f"/photos/{i}" for i in ids]), ("run_id", [run_id] * len(ids)),
                             ("run_started_at", [started] * len(ids))):
            table = table.set_column(table.schema.get_field_index(name), table.schema.field(name),
                                     pa.array(values, table.schema.field(name).type))
        run_dir = output / "runs" / run_id
        run_dir.mkdir(parents=True)
        shards = []
        for number, first in enumerate(range(0, table.num_rows, HISTORY_SHARD_ROWS)):
            relative = f"runs/{run_id}/part-000-{k:04d}{number:04d}.parquet"
            chunk = table.slice(first, HISTORY_SHARD_ROWS)
            pq.write_table(chunk, output / relative)
            shards.append({"path": relative, "rows": chunk.num_rows, "ok": chunk.num_rows, "error": 0, "bytes": 0})
        manifest = {
            "schema_version": "1", "run_id": run_id, "status": "finished", "started_at": started.isoformat(),
            "finished_at": started.isoformat(), "input": "bench://", "options": {},
            "vocabulary": {"name": "voc", "hash": "0" * 16, "class_names": list(VOC_NAMES)},
            "counts": {"listed": len(ids), "skipped": 0, "seen": len(ids), "ok": len(ids), "error": 0},
            "shards": shards, "timings": {"total": 600.0, "images_per_second": 3.0}, "versions": {},
            "label_schema_version": "1",
        }
        (run_dir / "_MANIFEST.json").write_text(json.dumps(manifest))
        previous = ids[:rows]
    return output


def _rchar() -> int:
    with open("/proc/self/io") as io_counters:
        return next(int(line.split()[1]) for line in io_counters if line.startswith("rchar:"))


def history_child(labels: str, page: str) -> dict:
    """One report of ``labels`` in this process: what collecting read, and the whole report's time and peak RSS."""
    from clipdiy.labels import report

    root = os.path.realpath(labels)
    opened: list[str] = []

    def count_opens(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str) and os.path.realpath(args[0]).startswith(root):
            opened.append(args[0])

    sys.addaudithook(count_opens)
    start, before = time.perf_counter(), _rchar()
    data = report.collect(labels, report.ReportConfig())
    read_mb, files = (_rchar() - before) / 2**20, list(opened)
    collect_s = time.perf_counter() - start
    import pyarrow as pa

    # Before the page's plots import matplotlib: the process's peak while collecting, and the
    # peak of Arrow's allocations (the rows and keys read; none of the imports).
    collect_rss_mb, arrow_peak_mb = peak_rss_kb() / 1024, pa.default_memory_pool().max_memory() / 2**20
    from clipdiy.storage import open_filesystem

    fs, path = open_filesystem(page)
    fs.pipe_file(path, report.render_html(data, report.ReportConfig(), source=labels).encode())
    return {"nights": len(data.nights), "rows": data.rows, "collect_s": round(collect_s, 2),
            "total_s": round(time.perf_counter() - start, 2), "read_mb": round(read_mb, 2),
            "parquet_opened": sum(f.endswith(".parquet") for f in files),
            "manifests_opened": sum(f.endswith("_MANIFEST.json") for f in files),
            "cache_opened": sum("/_report/" in f for f in files), "cached": getattr(data, "cached", None),
            "collect_rss_mb": round(collect_rss_mb, 1), "arrow_peak_mb": round(arrow_peak_mb, 1),
            "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


def run_history_child(labels: Path, page: Path, code: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(code)}
    done = subprocess.run([sys.executable, __file__, "--history-child", str(labels), "--page", str(page)],
                          capture_output=True, text=True, env=env, cwd=REPO_ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def history(work: Path, nights_sizes: list[int], rows: int, code: Path) -> None:
    print(f"code: {code}; {rows} new rows a night (+1% relabelled), shards of {HISTORY_SHARD_ROWS} rows", flush=True)
    for nights in nights_sizes:
        labels = history_output(work, nights, rows)
        shutil.rmtree(labels / "_report", ignore_errors=True)  # each code starts without a cache
        for which in ("first", "second"):
            r = run_history_child(labels, work / f"report-history-{nights}.html", code)
            print(f"{nights:>4} nights ({r['rows']} rows) {which} report: read {r['read_mb']:>7.2f} MB, opened "
                  f"{r['parquet_opened']:>4} shards + {r['manifests_opened']:>3} manifests + {r['cache_opened']:>3} cache "
                  f"files; collect {r['collect_s']:>5.2f} s (peak RSS {r['collect_rss_mb']:>6.1f} MB, Arrow peak "
                  f"{r['arrow_peak_mb']:>5.1f} MB), report {r['total_s']:>5.2f} s (peak RSS {r['peak_rss_mb']:>6.1f} MB); "
                  f"runs from the cache: {r['cached']}", flush=True)
        shutil.rmtree(labels / "_report", ignore_errors=True)


def run_child(labels: str, page: str, max_keys: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    extra = ["--max-keys", str(max_keys)] if max_keys is not None else []
    done = subprocess.run([sys.executable, __file__, "--child", labels, "--page", page, *extra], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 2_000_000])
    parser.add_argument("--work", default="/tmp/clipdiy-bench-report", help="cache of the outputs built")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--page", help=argparse.SUPPRESS)
    parser.add_argument("--max-keys", type=int, nargs="+", default=[100_000],
                        help="max_keys_in_memory of the latest-write pass (the report's default: 100000)")
    parser.add_argument("--history", type=int, nargs="+", help="histories of this many nights (e.g. 10 100)")
    parser.add_argument("--rows-per-night", type=int, default=2000)
    parser.add_argument("--code", type=Path, default=REPO_ROOT, help="the checkout whose clipdiy the reports run")
    parser.add_argument("--history-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.history_child:
        print(json.dumps(history_child(args.history_child, args.page)))
        return 0
    if args.history:
        history(Path(args.work), args.history, args.rows_per_night, args.code.resolve())
        return 0
    if args.child:
        print(json.dumps(child(args.child, args.page, args.max_keys[0])))
        return 0
    work = Path(args.work)
    real = real_output(work)
    print(f"baseline (imports only): peak RSS {run_child('baseline', '')['peak_rss_mb']:.1f} MB", flush=True)
    for size in args.sizes:
        labels = synthetic_output(real, work, size)
        for max_keys in args.max_keys:
            result = run_child(str(labels), str(work / f"report-{size}.html"), max_keys)
            print(f"N={size:>8}  max keys {max_keys:>7}  {result['rows']} rows in {result['shards']} shards: "
                  f"read {result['read_s']} s ({result['rows_per_s']} rows/s), page written after {result['total_s']} s, "
                  f"peak RSS {result['peak_rss_mb']} MB, page {result['page_kb']} KB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
