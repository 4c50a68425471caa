"""Send doubtful images to Label Studio, and bring the corrections back into the labels output.

    python jobs/review.py export --output ./labels --count 200 --to tasks.json [--classes cat dog]
    python jobs/review.py import --from export.json --output ./labels

export: the rows the feed would yield (its filters: --classes, --min-class-score,
--min-foreground-fraction), lowest mean mask score first, --count of them, as Label Studio tasks
with the pseudo-labels as predictions (brush RLE, one result per class mask; model version = the
model fingerprint; score = the mask score), and the labelling config (--config, default next to
--to). An image inside a WebDataset shard or a Parquet file is fetched by its row's address and
copied under --images-to (default next to --to), which its task names. Create a project with the
config, import the tasks, correct, export as JSON.

import: the export's annotations become rows marked source = human (annotator, time) in a run of
their own; the feed and the exports prefer them over the model rows of the same image version.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the script runs from the uploaded copy: use its package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if (_REPO_ROOT / "clipdiy" / "__init__.py").is_file() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from clipdiy.errors import ClipdiyError  # noqa: E402
from clipdiy.labels.feed import FeedFilter  # noqa: E402
from clipdiy.labels.review import export_tasks  # noqa: E402
from clipdiy.pipeline.control.corrections import import_corrections  # noqa: E402
from clipdiy.storage import add_storage_arguments, storage_from_arguments  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="rows to Label Studio tasks with predictions, and the labelling config")
    export.add_argument("--output", required=True, nargs="+", help="labels output(s) (any fsspec URI)")
    export.add_argument("--to", required=True, help="tasks JSON to write (any fsspec URI)")
    export.add_argument("--config", help="labelling config XML to write (default: --to with .xml)")
    export.add_argument("--count", type=int, default=100, help="tasks: the rows with the lowest mean mask score")
    export.add_argument("--classes", nargs="+", help="only images holding one of these classes (feed filter)")
    export.add_argument("--min-class-score", type=float, default=0.0, help="feed filter: a class mask scored at least this")
    export.add_argument("--min-foreground-fraction", type=float, default=0.0, help="feed filter")
    export.add_argument("--images-to", help="where the images of shard samples (WebDataset, Parquet) are written for "
                        "Label Studio, fetched by address (default: beside --to, <name>_images)")
    export.add_argument("--local-files-root", help="Label Studio's LOCAL_FILES_DOCUMENT_ROOT: local images get /data/local-files URLs")
    imported = commands.add_parser("import", help="a Label Studio JSON export into the labels output as human rows")
    imported.add_argument("--from", dest="source", required=True, help="Label Studio JSON export (any fsspec URI)")
    imported.add_argument("--output", required=True, help="the labels output the tasks were exported from")
    for sub in (export, imported):
        add_storage_arguments(sub)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage = storage_from_arguments(args)
    try:
        if args.command == "export":
            config = args.config or (args.to[:-5] if args.to.endswith(".json") else args.to) + ".xml"
            feed_filter = FeedFilter(classes=tuple(args.classes) if args.classes else None,
                                     min_class_score=args.min_class_score,
                                     min_foreground_fraction=args.min_foreground_fraction)
            summary = export_tasks(args.output if len(args.output) > 1 else args.output[0], args.to, config,
                                   feed_filter=feed_filter, count=args.count, local_files_root=args.local_files_root,
                                   storage=storage, images_to=args.images_to)
            print(f"review: {summary['tasks']} tasks ({summary['masks']} masks) -> {args.to}; labelling config -> {config}")
        else:
            summary = import_corrections(args.source, args.output, storage=storage)
            print(f"review: {summary['rows']} corrections of {summary['tasks']} tasks -> run {summary['run_id']} "
                  f"({summary['without_annotation']} tasks without annotation)")
    except (ClipdiyError, FileNotFoundError, ValueError) as error:
        print(f"review: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
