"""The run report (jobs/report.py) over large labels outputs: time and peak RSS at two sizes.

The outputs are those of the readers' benchmark (benchmarks/bench_readers.py): the job's own
output on the COCO sample photos (a tiny random CLIP, ``--saliency none``, ``--vocabulary coco``)
copied into run ``a`` of N rows with unique ids, and a later run ``b`` relabelling 1% of them, in
shards of 1,000 rows. Each size is reported in its own Python process (peak RSS = that process's
VmHWM), beside ``baseline``: a process that only imports the report and matplotlib.

    python benchmarks/bench_report.py                       # N = 200000 and 2000000
    python benchmarks/bench_report.py --sizes 20000
    python benchmarks/bench_report.py --max-keys 2000000 100000   # the readers' key limit and the report's
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from bench_readers import peak_rss_kb, real_output, synthetic_output  # noqa: E402


def child(labels: str, page: str, max_keys: int | None) -> dict:
    import clipdiy.labels.report as report

    if labels == "baseline":
        import matplotlib.pyplot  # noqa: F401

        return {"peak_rss_mb": round(peak_rss_kb() / 1024, 1)}
    start = time.perf_counter()
    data = report.write_report(labels, page, report.ReportConfig(max_keys_in_memory=max_keys))
    seconds = time.perf_counter() - start
    return {"rows": data.rows, "shards": data.shards, "read_s": round(data.seconds, 1), "total_s": round(seconds, 1),
            "rows_per_s": round(data.rows / data.seconds), "peak_rss_mb": round(peak_rss_kb() / 1024, 1),
            "page_kb": round(os.path.getsize(page) / 1024), "drifts": len(data.drifts)}


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
    args = parser.parse_args()
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
