#!/usr/bin/env python
"""Label an image corpus with CLIP-DIY segmentation masks on Ray; write Parquet shards.

Locally (starts an embedded Ray):
    python jobs/label.py --input ./photos --output ./labels

On a cluster:
    ray job submit --working-dir . -- python jobs/label.py --input s3://bucket/photos/ --output s3://bucket/labels/

Programmatic use: build a ``clipdiy.pipeline.config.LabelJobConfig`` (see ``config_from_args``)
and call ``clipdiy.pipeline.run.run_labelling``; ``main(argv)`` returns the exit status.
Exit status: 0 done; 2 refused before any work (bad option, unreachable or empty input, missing
weights, OUTPUT locked by another run); 1 the run failed while working (resume by starting it
again).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# Under `ray job submit --working-dir .` the script runs from the uploaded copy: use its package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if (_REPO_ROOT / "clipdiy" / "__init__.py").is_file() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from clipdiy.config import (
    FOUND_HEAD_URL,
    NACLIP,
    REFINES,
    WINDOWS,
    ClipConfig,
    NaclipConfig,
    PamrConfig,
    PromptConfig,
    SaliencyConfig,
    SegmenterConfig,
    default_clip_config,
)
from clipdiy.errors import ClipdiyError
from clipdiy.pipeline.incremental import RETRY_ERRORS
from clipdiy.samples import SAMPLES_INPUT, samples_manifest

PROG = "label.py"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    defaults_clip = ClipConfig()
    defaults_saliency = SaliencyConfig()
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Pseudo-label images with open-vocabulary segmentation masks (CLIP-DIY: multi-scale CLIP crops "
            "+ FOUND saliency) as a Ray Data job. Writes OUTPUT/runs/<run_id>/part-*.parquet (one row per "
            "image: COCO RLE masks, class scores; schema in schemas/label_row.v1.json) and, last, "
            "OUTPUT/runs/<run_id>/_MANIFEST.json. Re-runs label only new or changed images; a killed run "
            "resumes when started again."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", required=True, metavar="URI",
                    help="images to label: a folder or prefix (s3://bucket/photos/), a glob (s3://b/**/*.jpg), a "
                         "manifest (.txt with one URI per line, or .parquet with a 'uri' column), or 'samples' for "
                         "the few real photos that installing clipdiy brings (quick start)")
    io.add_argument("--output", required=True, metavar="URI", help="labels folder or prefix (local path, s3://, gs://)")
    io.add_argument("--limit", type=int, default=None, metavar="N", help="only consider the first N listed images")
    io.add_argument("--run-id", default=None,
                    help="id of this run (folder OUTPUT/runs/<id>); default: resume the unfinished run in OUTPUT if "
                         "there is one, else a new id from the UTC time")

    storage = parser.add_argument_group("object storage (credentials come from the environment / ~/.aws, never flags)")
    storage.add_argument("--endpoint-url", default=None,
                         help="S3-compatible endpoint (MinIO, R2, ...); env AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL")
    storage.add_argument("--anon", action="store_true", default=None,
                         help="anonymous (unsigned) access for public buckets; env CLIPDIY_S3_ANON=1")
    storage.add_argument("--profile", default=None, help="AWS profile name; env AWS_PROFILE")
    storage.add_argument("--region", default=None, help="bucket region; env AWS_REGION / AWS_DEFAULT_REGION")

    model = parser.add_argument_group("model")
    model.add_argument("--method", choices=("clipdiy", "naclip"), default="clipdiy",
                       help="segmentation method: clipdiy (the paper: 59 CLIP crops + FOUND saliency) or naclip "
                            "(one CLIP ViT-B/16 forward per image + PAMR; see README)")
    model.add_argument("--vocabulary", default=None,
                       help="class vocabulary: 'voc', 'coco', 'naclip-voc21', 'naclip-coco-object', or a "
                            ".txt/.yaml/.json file (class 0 is background); default: voc for clipdiy, "
                            "naclip-voc21 for naclip")
    model.add_argument("--clip-model", default=None,
                       help=f"open_clip model name (default: {defaults_clip.model} for clipdiy, "
                            f"{default_clip_config(NACLIP).model} for naclip)")
    model.add_argument("--clip-pretrained", default=None,
                       help=f"open_clip pretrained tag, downloaded from the hub on first use (default: "
                            f"{defaults_clip.pretrained} for clipdiy, {default_clip_config(NACLIP).pretrained} for naclip)")
    model.add_argument("--clip-checkpoint", default=None, metavar="PATH",
                       help="local path or URI of CLIP weights; wins over --clip-pretrained (the offline way)")
    model.add_argument("--clip-model-config", default=None, metavar="JSON",
                       help="open_clip model-config JSON for an architecture open_clip does not ship")
    model.add_argument("--saliency", choices=("found", "none"), default=defaults_saliency.backend,
                       help="foreground saliency: FOUND (DINO ViT-S/8 + FOUND head) or none (every pixel foreground)")
    model.add_argument("--dino-model", default=defaults_saliency.backbone, help="timm name of FOUND's DINO backbone")
    model.add_argument("--dino-checkpoint", default=None, metavar="PATH",
                       help="local path or URI of the DINO backbone weights (the offline way)")
    model.add_argument("--found-head", default=FOUND_HEAD_URL, metavar="PATH",
                       help="FOUND head weights: local path, URI or URL")
    model.add_argument("--saliency-max-side", type=int, default=None, metavar="PIXELS",
                       help="shrink images whose longer side exceeds PIXELS before FOUND (default: full resolution, "
                            "as the paper; 1024 keeps large photos affordable)")
    model.add_argument("--mode", choices=("faithful", "aspect"), default="faithful",
                       help="faithful: squash to 256x256 as the paper; aspect: keep the aspect ratio (short side 256)")
    model.add_argument("--prompt-ensemble", default=None, metavar="NAME",
                       help="average a prompt ensemble (e.g. 'imagenet') instead of 'a photo of a {}'")
    model.add_argument("--article", action="store_true", help="write 'an' before vowels in prompts")
    model.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                       help="model precision; auto = fp16 on GPU, fp32 on CPU")
    model.add_argument("--refine", choices=REFINES, default="auto",
                       help="refine the method's logits with PAMR: auto = as published (on for naclip, off for clipdiy)")
    model.add_argument("--pamr-iterations", type=int, default=PamrConfig().iterations, help="PAMR iterations")
    model.add_argument("--pamr-dilations", default=",".join(str(d) for d in PamrConfig().dilations), metavar="D1,D2",
                       help="PAMR dilations, comma-separated")
    model.add_argument("--naclip-window", choices=WINDOWS, default="auto",
                       help="naclip: whole image in one forward, or 224-px sliding windows (stride 112); auto = the "
                            "authors' choice for the vocabulary (whole for VOC, slide otherwise)")

    pipeline = parser.add_argument_group("pipeline and cluster")
    pipeline.add_argument("--batch-size", type=int, default=8, help="images per segmenter call in an actor")
    pipeline.add_argument("--crop-batch-size", type=int, default=None,
                          help="crops per CLIP forward (default: 256 on a GPU, 32 on a CPU)")
    pipeline.add_argument("--decode-batch-size", type=int, default=8, help="images per CPU decode task")
    pipeline.add_argument("--gpus-per-actor", type=float, default=None,
                          help="GPUs per inference actor; default: 1 when the cluster has GPUs now, else 0 "
                               "(pass 1 for an autoscaling cluster that starts without GPU nodes)")
    pipeline.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per inference actor")
    pipeline.add_argument("--torch-threads", type=int, default=None,
                          help="torch threads of a CPU-only inference actor (default: --cpus-per-actor)")
    pipeline.add_argument("--actor-memory-gb", type=float, default=2.0, help="memory reserved per inference actor")
    pipeline.add_argument("--min-actors", type=int, default=1, help="smallest size of the inference actor pool")
    pipeline.add_argument("--max-actors", type=int, default=1, help="largest size of the inference actor pool")
    pipeline.add_argument("--decode-concurrency", type=int, default=None,
                          help="most decode tasks at once (default: as many as free CPUs allow)")
    pipeline.add_argument("--rows-per-file", type=int, default=1000, help="most rows in one Parquet shard")
    pipeline.add_argument("--max-pixels", type=int, default=None,
                          help="images with more pixels (read from the header) get an error row (decompression-bomb guard); "
                               "default 100 million")
    pipeline.add_argument("--retry-errors", choices=RETRY_ERRORS, default="transient",
                          help="which images with an error row from an earlier run to label again: transient "
                               "(failed reads and model calls), all, or none")
    pipeline.add_argument("--address", default=None,
                          help="Ray cluster address; default: RAY_ADDRESS (set by `ray job submit`), else an embedded local Ray")
    pipeline.add_argument("--num-cpus", type=int, default=None, help="CPUs of an embedded local Ray (default: all)")
    pipeline.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                          help="seconds between progress log lines (and lock heartbeats)")
    return parser


def config_from_args(args: argparse.Namespace):
    """The :class:`LabelJobConfig` of parsed arguments (raises JobConfigError / ValueError)."""
    from clipdiy.pipeline.config import DEFAULT_MAX_PIXELS, LabelJobConfig
    from clipdiy.pipeline.storage import StorageOptions

    clip_defaults = default_clip_config(args.method)
    try:
        dilations = tuple(int(d) for d in args.pamr_dilations.split(",") if d.strip())
    except ValueError:
        raise ValueError(f"--pamr-dilations must be comma-separated integers, got {args.pamr_dilations!r}") from None
    segmenter = SegmenterConfig(
        method=args.method,
        vocabulary=args.vocabulary or ("naclip-voc21" if args.method == NACLIP else "voc"),
        clip=ClipConfig(
            model=args.clip_model or clip_defaults.model,
            pretrained=args.clip_pretrained if args.clip_pretrained is not None else clip_defaults.pretrained,
            checkpoint=args.clip_checkpoint,
            model_config=args.clip_model_config,
        ),
        refine=args.refine,
        pamr=PamrConfig(iterations=args.pamr_iterations, dilations=dilations),
        naclip=NaclipConfig(window=args.naclip_window),
        saliency=SaliencyConfig(
            backend=args.saliency,
            backbone=args.dino_model,
            backbone_checkpoint=args.dino_checkpoint,
            head=args.found_head,
            max_side=args.saliency_max_side,
        ),
        prompts=PromptConfig(ensemble=args.prompt_ensemble, article=args.article),
        mode=args.mode,
        crop_batch_size=args.crop_batch_size,
        precision=args.precision,
    )
    storage = StorageOptions.from_env(endpoint_url=args.endpoint_url, anon=args.anon, profile=args.profile, region=args.region)
    return LabelJobConfig(
        input=samples_manifest() if args.input == SAMPLES_INPUT else args.input,
        output=args.output,
        segmenter=segmenter,
        storage=storage,
        decode_batch_size=args.decode_batch_size,
        inference_batch_size=args.batch_size,
        min_actors=args.min_actors,
        max_actors=args.max_actors,
        gpus_per_actor=args.gpus_per_actor,
        cpus_per_actor=args.cpus_per_actor,
        torch_threads=args.torch_threads,
        actor_memory_gb=args.actor_memory_gb,
        decode_concurrency=args.decode_concurrency,
        rows_per_file=args.rows_per_file,
        max_pixels=args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS,
        limit=args.limit,
        run_id=args.run_id,
        address=args.address,
        local_num_cpus=args.num_cpus,
        heartbeat_s=args.log_every,
        lock_stale_after_s=max(300.0, 4 * args.log_every),
        retry_errors=args.retry_errors,
    )


def _refuse(error: BaseException) -> int:
    message = str(error).splitlines()[0] if str(error) else type(error).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        config = config_from_args(args)
    except ValueError as error:  # a config dataclass rejected an option value
        return _refuse(error)
    from clipdiy.pipeline.run import run_labelling

    try:
        summary = run_labelling(config)
    except ClipdiyError as error:
        # Refusals (input, weights, vocabulary, lock) are one line; tracebacks are for bugs.
        return _refuse(error)
    print(f"{PROG}: {summary.line()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
