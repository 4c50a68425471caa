"""Score a clipdiy labels output against ground truth (PASCAL VOC or COCO), by the paper's protocol.

    python jobs/evaluate.py --labels ./labels --gt VOC2012/SegmentationClass
    python jobs/evaluate.py --labels s3://bucket/labels --gt instances_val2017.json --report s3://bucket/eval.json

GT short side 448 px (nearest), predictions resized to it (nearest), one confusion matrix over the
data set, mIoU over all classes with background (classes absent from both GT and prediction are
left out), plus per-class IoU, per-image mIoU, pixel accuracy and the saliency's own
foreground/background IoU. Runs in-process for small sets (or ``--local``) and on Ray for large
ones (``ray job submit --working-dir . -- python jobs/evaluate.py ...`` on a cluster).
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
from clipdiy.labels.evaluation import LOCAL_BELOW, SHORT_SIDE, evaluate  # noqa: E402
from clipdiy.labels.ground_truth import load_ground_truth  # noqa: E402
from clipdiy.storage import StorageOptions, add_storage_arguments, read_uri, storage_from_arguments  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--labels", required=True, nargs="+", help="labels output(s): OUTPUT roots or run folders (any fsspec URI)")
    parser.add_argument("--gt", required=True, help="ground truth: a COCO instances .json, or a folder of VOC class-map PNGs")
    parser.add_argument("--gt-format", choices=("voc", "coco"), help="override the format guessed from --gt")
    parser.add_argument("--gt-classes", help="VOC form: text file of GT class names, one a line, index = pixel value "
                        "(default: the 21 PASCAL VOC classes)")
    parser.add_argument("--class-map", help="JSON/YAML file {predicted class name: GT class name} for names that differ")
    parser.add_argument("--vocabulary", help="the labels' vocabulary (voc, coco or a file) when the runs' manifests lack it")
    parser.add_argument("--report", help="write the JSON report here (any fsspec URI)")
    parser.add_argument("--short-side", type=int, default=SHORT_SIDE, help="GT short side after resizing (default 448)")
    parser.add_argument("--include-unfinished", action="store_true", help="also read runs that have no manifest yet")
    parser.add_argument("--worst", type=int, default=10, help="how many of the worst images to print")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="score in this process, without Ray")
    where.add_argument("--ray", action="store_true", help="score on Ray whatever the size")
    parser.add_argument("--local-below", type=int, default=LOCAL_BELOW,
                        help=f"without --local/--ray: score in-process below this many images (default {LOCAL_BELOW})")
    parser.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    add_storage_arguments(parser)
    return parser.parse_args(argv)


def _read_text(uri: str, storage: StorageOptions) -> str:
    return read_uri(uri, storage).decode("utf-8")


def _class_map(uri: str | None, storage: StorageOptions) -> dict[str, str] | None:
    if uri is None:
        return None
    text = _read_text(uri, storage)
    if uri.lower().endswith((".yaml", ".yml")):
        import yaml

        mapping = yaml.safe_load(text)
    else:
        mapping = json.loads(text)
    if not isinstance(mapping, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
        raise ValueError(f"{uri}: a class map must be an object of predicted name -> ground-truth name")
    return mapping


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    storage = storage_from_arguments(args)
    try:
        gt_classes = None
        if args.gt_classes:
            gt_classes = tuple(line.strip() for line in _read_text(args.gt_classes, storage).splitlines() if line.strip())
        ground_truth = load_ground_truth(args.gt, args.gt_format, gt_classes, storage)
        class_names = None
        if args.vocabulary:
            from clipdiy.segmentation.vocabulary import load_vocabulary

            class_names = load_vocabulary(args.vocabulary).class_names
        use_ray = False if args.local else (True if args.ray else None)
        if use_ray is not False and args.ray_address:
            import ray

            ray.init(address=args.ray_address)
        report = evaluate(
            args.labels if len(args.labels) > 1 else args.labels[0], ground_truth,
            class_map=_class_map(args.class_map, storage), class_names=class_names, use_ray=use_ray,
            local_below=args.local_below, short_side=args.short_side, finished_only=not args.include_unfinished,
            storage=storage,
        )
    except (ClipdiyError, FileNotFoundError, ValueError, KeyError) as error:
        print(f"evaluate: error: {error}", file=sys.stderr)
        return 2
    print(report.table(worst=args.worst))
    if args.report:
        report.write_json(args.report, storage)
        print(f"report written to {args.report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
