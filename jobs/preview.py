"""Render a clipdiy labels output into pictures and a sortable HTML page.

    python jobs/preview.py --labels ./labels --output ./preview
    python jobs/preview.py --labels s3://bucket/labels --output s3://bucket/preview --report eval.json

Writes OUTPUT/images/*.png (photo with the mask overlaid in the VOC palette | saliency | legend of
classes and scores), OUTPUT/contact_sheet.png (a sample of N overlays) and OUTPUT/index.html
(every rendered image with its per-class scores and errors; click a column to sort; it opens
worst first). Give an evaluation report (jobs/evaluate.py --report) to list each image's mIoU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the script runs from the uploaded copy: use its package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if (_REPO_ROOT / "clipdiy" / "__init__.py").is_file() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from clipdiy.errors import ClipdiyError  # noqa: E402
from clipdiy.labels.preview import PreviewConfig, render_output  # noqa: E402
from clipdiy.storage import add_storage_arguments, read_uri, storage_from_arguments  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = PreviewConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--labels", required=True, nargs="+", help="labels output(s): OUTPUT roots or run folders (any fsspec URI)")
    parser.add_argument("--output", required=True, help="folder to write the preview into (any fsspec URI)")
    parser.add_argument("--report", help="evaluation report JSON from jobs/evaluate.py, to show per-image mIoU")
    parser.add_argument("--sample", type=int, default=defaults.sample, help="images on the contact sheet")
    parser.add_argument("--limit", type=int, default=defaults.limit, help="at most this many images rendered and listed (seeded sample)")
    parser.add_argument("--size", type=int, default=defaults.size, help="longer side of each panel, px")
    parser.add_argument("--alpha", type=float, default=defaults.alpha, help="mask opacity over the photo")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the samples")
    parser.add_argument("--include-unfinished", action="store_true", help="also read runs that have no manifest yet")
    add_storage_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage = storage_from_arguments(args)
    config = PreviewConfig(size=args.size, alpha=args.alpha, sample=args.sample, limit=args.limit, seed=args.seed)
    try:
        report = json.loads(read_uri(args.report, storage)) if args.report else None
        summary = render_output(args.labels if len(args.labels) > 1 else args.labels[0], args.output, config,
                                evaluation_report=report, finished_only=not args.include_unfinished, storage=storage)
    except (ClipdiyError, FileNotFoundError, ValueError) as error:
        print(f"preview: error: {error}", file=sys.stderr)
        return 2
    print(f"preview: {summary['listed']} images listed, {summary['pictures']} pictures, {summary['errors']} with errors, "
          f"{summary['contact_sheet']} on the contact sheet -> {args.output.rstrip('/')}/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
