"""Write the run report of a labels output: one self-contained HTML page with plots.

    python jobs/report.py --output ./labels --html report.html
    python jobs/report.py --output s3://bucket/labels --html s3://bucket/reports/latest.html

Reads each finished run (a run = a night) once, shard by shard, in memory bounded by one shard,
and keeps its aggregates under OUTPUT/_report/ (later reports read those, and the newest night's
rows): per night the images seen, labelled, errors by kind, skipped, wall time,
images/s, method, precision and model fingerprint; per class its pixel share and the images it
wins, with the nights where a class moved by more than --drift-threshold against the median of the
previous nights called out; score histograms; the lowest-scoring images with their overlays.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

# Under `ray job submit --working-dir .` the script runs from the uploaded copy: use its package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if (_REPO_ROOT / "clipdiy" / "__init__.py").is_file() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from clipdiy.errors import ClipdiyError  # noqa: E402
from clipdiy.labels.report import ReportConfig, write_report  # noqa: E402
from clipdiy.locations import Location  # noqa: E402
from clipdiy.storage import add_storage_arguments, storage_from_arguments  # noqa: E402
from clipdiy.uris import redact_text  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ReportConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--output", required=True, nargs="+", help="labels output(s): OUTPUT roots or run folders (any fsspec URI)")
    parser.add_argument("--html", default="report.html", help="where to write the page (any fsspec URI)")
    parser.add_argument("--drift-threshold", type=float, default=defaults.drift_threshold,
                        help="call out a class whose share moved more than this (0.05 = 5 points) against the median of the previous nights")
    parser.add_argument("--lowest", type=int, default=defaults.lowest, help="lowest-scoring images shown as thumbnails")
    parser.add_argument("--bins", type=int, default=defaults.bins, help="histogram bins over [0, 1]")
    parser.add_argument("--classes-plotted", type=int, default=defaults.classes_plotted, help="classes drawn in the per-class plots")
    parser.add_argument("--max-keys-in-memory", type=int, default=defaults.max_keys_in_memory,
                        help="rows of keys the latest-write pass holds before it spills to local disk")
    parser.add_argument("--no-cache", action="store_true",
                        help="read every run's shards; do not keep each run's aggregates under OUTPUT/_report/")
    add_storage_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage = storage_from_arguments(args)
    config = ReportConfig(drift_threshold=args.drift_threshold, lowest=args.lowest, bins=args.bins,
                          classes_plotted=args.classes_plotted, max_keys_in_memory=args.max_keys_in_memory,
                          cache=not args.no_cache)
    started = time.perf_counter()
    try:
        data = write_report(args.output if len(args.output) > 1 else args.output[0], args.html, config, storage)
    except (ClipdiyError, FileNotFoundError, ValueError) as error:
        # An exception's text, from any library (finding 7): a URI in it is redacted as text.
        print(f"report: error: {redact_text(str(error))}", file=sys.stderr)
        return 2
    print(f"report: {len(data.nights)} runs, {data.rows} rows in {data.shards} shards ({data.cached} runs from the "
          f"cache under OUTPUT/_report, {data.shards_read} shards read) in {data.seconds:.1f} s, "
          f"{len(data.drifts)} class moves called out; page written in {time.perf_counter() - started:.1f} s -> "
          f"{Location(args.html)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
