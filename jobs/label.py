#!/usr/bin/env python
"""Label an image corpus with CLIP-DIY segmentation masks on Ray; write Parquet shards.

Locally (starts an embedded Ray):
    python jobs/label.py --input ./photos --output ./labels

On a cluster (GPU inference actors by default, waiting at most --gpu-wait-seconds for a GPU
node; --device cpu for CPU actors):
    ray job submit --working-dir . -- python jobs/label.py --input s3://bucket/photos/ --output s3://bucket/labels/

Programmatic use: build a ``clipdiy.pipeline.config.LabelJobConfig`` (see ``config_from_args``)
and call ``clipdiy.pipeline.control.run.run_labelling``; ``main(argv)`` returns the exit status.
Exit status (see EXIT_STATUS): 0 done; 2 refused before any work (bad option, unreachable or empty
input, missing weights in the driver or in an inference actor at its start, no GPU the cluster can
provide, OUTPUT locked by another run); 1 failed mid-run (e.g. reads failing run-wide, or the
OUTPUT lock lost); 3 stopped by the error budget. After 1 or 3, what was written stays valid and
starting again resumes. No message or log line shows a credential: URIs are redacted
(``clipdiy.uris``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import traceback
from pathlib import Path

# Under `ray job submit --working-dir .` the script runs from the uploaded copy: use its package.
_REPO_ROOT = Path(__file__).resolve().parent.parent
if (_REPO_ROOT / "clipdiy" / "__init__.py").is_file() and str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from clipdiy.errors import ClipdiyError
from clipdiy.pipeline.planning.incremental import RETRY_ERRORS
from clipdiy.segmentation.config import (
    FOUND_HEAD_URL,
    NACLIP,
    PRECISIONS,
    REFINES,
    TRIDENT,
    TRIDENT_SAM_URL,
    WINDOWS,
    ClipConfig,
    NaclipConfig,
    PamrConfig,
    PromptConfig,
    SaliencyConfig,
    SegmenterConfig,
    TridentConfig,
    default_clip_config,
)
from clipdiy.segmentation.samples import SAMPLES_INPUT, samples_manifest
from clipdiy.uris import RedactingFilter, redact_text

PROG = "label.py"

#: The job's exit statuses (also in --help and docs/job/failures.md).
EXIT_STATUS = """exit status:
  0  done: every listed image has a row (ok or error) and the run manifest is written
  2  refused before any work: a bad option, unreachable or empty input, missing weights,
     OUTPUT locked by another run (nothing was written)
  1  failed mid-run, for a reason not about one image (e.g. reads failing for every object,
     see --stop-after-failed-reads; the cluster lost; an inference actor that cannot load the
     weights after this start wrote shards); start again to resume
  3  stopped: the error budget was exceeded (--max-error-rate over --error-window; the message
     names the dominant error kind); fix the cause or raise the budget, then start again to resume
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown; the epilog (the exit statuses) keeps its line breaks."""

    def _fill_text(self, text, width, indent):
        if text == EXIT_STATUS:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad option in one line (no usage block)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from clipdiy.pipeline.config import (DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_MEMORY_GB, DEFAULT_MAX_WORKER_DEATHS,
                                         DEFAULT_READ_DEADLINE_S, DEFAULT_TIMED_OUT_NIGHTS)

    defaults_clip = ClipConfig()
    defaults_saliency = SaliencyConfig()
    parser = OneLineParser(
        prog=PROG,
        description=(
            "Pseudo-label images with open-vocabulary segmentation masks (CLIP-DIY: multi-scale CLIP crops "
            "+ FOUND saliency) as a Ray Data job. Writes OUTPUT/runs/<run_id>/part-*.parquet (one row per "
            "image: COCO RLE masks, class scores; schema in schemas/label_row.v2.json) and, last, "
            "OUTPUT/runs/<run_id>/_MANIFEST.json. Re-runs label only new or changed images; a killed run "
            "resumes when started again."
        ),
        epilog=EXIT_STATUS,
        formatter_class=_HelpFormatter,
    )
    io = parser.add_argument_group("input and output")
    io.add_argument("--input", required=True, metavar="URI",
                    help="images to label: a folder or prefix (s3://bucket/photos/), a glob (s3://b/**/*.jpg), a "
                         "manifest (.txt with one URI per line, or .parquet with a 'uri' column), or 'samples' for "
                         "the few real photos that installing clipdiy brings (quick start)")
    io.add_argument("--input-format", choices=("files", "webdataset", "parquet"), default=None,
                    help="how the input stores its images: loose files, WebDataset .tar shards (a prefix, glob, "
                         "manifest, or brace pattern s3://b/{00000..00009}.tar; img2dataset output folders too), or "
                         "Parquet files with image bytes; default: detected from the input (docs/job/corpora.md)")
    io.add_argument("--image-column", default="image", metavar="NAME",
                    help="parquet input: the column of image bytes, binary or a {bytes, path} struct (default image)")
    io.add_argument("--id-column", default=None, metavar="NAME",
                    help="parquet input: the column of sample ids (default: the row's number in its file)")
    io.add_argument("--output", required=True, metavar="URI", help="labels folder or prefix (local path, s3://, gs://)")
    io.add_argument("--limit", type=int, default=None, metavar="N", help="only consider the first N listed images")
    io.add_argument("--listing-tasks", type=int, default=16, metavar="N",
                    help="list a prefix's folders with up to N tasks at once, spread over the cluster (default 16)")
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
    model.add_argument("--method", choices=("clipdiy", "naclip", "trident"), default="clipdiy",
                       help="segmentation method: clipdiy (the paper: 59 CLIP crops + FOUND saliency), naclip "
                            "(one CLIP ViT-B/16 forward per image + PAMR; see docs/methods/naclip.md) or trident "
                            "(CLIP ViT-B/16 + DINO ViT-B/16 + SAM ViT-B, about 12x NACLIP's cost; docs/methods/trident.md)")
    model.add_argument("--vocabulary", default=None,
                       help="class vocabulary: 'voc' (the paper's names, e.g. 'diningtable', 'tv/monitor'), 'voc-readable', 'coco', 'naclip-voc21', 'naclip-coco-object', 'trident-voc21', 'trident-coco-object', or a "
                            ".txt/.yaml/.json file (class 0 is background); default: voc for clipdiy, "
                            "naclip-voc21 for naclip, trident-voc21 for trident")
    model.add_argument("--clip-model", default=None,
                       help=f"open_clip model name (default: {defaults_clip.model} for clipdiy, "
                            f"{default_clip_config(NACLIP).model} for naclip and trident)")
    model.add_argument("--clip-pretrained", default=None,
                       help=f"open_clip pretrained tag, downloaded from the hub on first use (default: "
                            f"{defaults_clip.pretrained} for clipdiy, {default_clip_config(NACLIP).pretrained} for naclip and trident)")
    model.add_argument("--clip-checkpoint", default=None, metavar="PATH",
                       help="local path or URI of CLIP weights; wins over --clip-pretrained (the offline way)")
    model.add_argument("--clip-model-config", default=None, metavar="JSON",
                       help="open_clip model-config JSON for an architecture open_clip does not ship")
    model.add_argument("--saliency", choices=("found", "none"), default=defaults_saliency.backend,
                       help="foreground saliency: FOUND (DINO ViT-S/8 + FOUND head) or none (the paper's ablation: "
                            "argmax of the scores, background competing with its own score)")
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
    model.add_argument("--precision", choices=PRECISIONS, default=PRECISIONS[0],
                       help="model precision on every device: fp32 (the paper's; default), or fp16/bf16 "
                            "(faster on GPUs, moves some labels: see docs/methods/faithfulness.md); trident: fp32 "
                            "or fp16, the authors' casts")
    model.add_argument("--refine", choices=REFINES, default="auto",
                       help="refine the method's output: pamr (clipdiy, naclip), sam (trident: SAM ViT-B's mask decoder "
                            "prompted by the coarse regions), none; auto = as published (pamr for naclip, sam for trident, "
                            "none for clipdiy)")
    model.add_argument("--pamr-iterations", type=int, default=PamrConfig().iterations, help="PAMR iterations")
    model.add_argument("--pamr-dilations", default=",".join(str(d) for d in PamrConfig().dilations), metavar="D1,D2",
                       help="PAMR dilations, comma-separated")
    model.add_argument("--trident-dino-checkpoint", default=None, metavar="PATH",
                       help="trident: DINO ViT-B/16 weights (timm vit_base_patch16_224.dino; local path or URI; "
                            "default: the timm hub weights)")
    model.add_argument("--sam-checkpoint", default=TRIDENT_SAM_URL, metavar="PATH",
                       help="trident: SAM ViT-B weights sam_vit_b_01ec64.pth (local path, URI or URL)")
    model.add_argument("--trident-prob-thd", type=float, default=None, metavar="P",
                       help="trident: pixels whose best class probability is under P go to background "
                            "(default: the vocabulary's published value, 0.2 trident-voc21, 0.25 trident-coco-object)")
    model.add_argument("--naclip-window", choices=WINDOWS, default="auto",
                       help="naclip: whole image in one forward, or 224-px sliding windows (stride 112); auto = the "
                            "authors' choice for the vocabulary (whole for VOC, slide otherwise)")

    pipeline = parser.add_argument_group("pipeline and cluster")
    pipeline.add_argument("--batch-size", type=int, default=8, help="images per segmenter call in an actor")
    pipeline.add_argument("--crop-batch-size", type=int, default=None,
                          help="crops per CLIP forward (default: 256 on a GPU, 32 on a CPU)")
    pipeline.add_argument("--decode-batch-size", type=int, default=8, help="images per CPU decode task")
    pipeline.add_argument("--device", choices=("auto", "gpu", "cpu"), default="auto",
                          help="where the segmenter runs: auto = GPU actors on a cluster (--address / RAY_ADDRESS, "
                               "as under `ray job submit`) even before a GPU node is up, and on a local Ray a GPU when "
                               "present, else CPU; gpu; cpu (CPU actors, also on a GPU cluster)")
    pipeline.add_argument("--gpus-per-actor", type=float, default=None,
                          help="GPUs per GPU inference actor (default 1; 0 is the same as --device cpu)")
    pipeline.add_argument("--gpu-wait-seconds", type=float, default=1200.0, metavar="SECONDS",
                          help="on a cluster, how long to wait for a GPU node to join (an autoscaler starts one) "
                               "before the job stops with an error")
    pipeline.add_argument("--cluster-config", default=None, metavar="YAML",
                          help="`ray up` cluster file that bounds the GPU actor pool (its GPU nodes' max_workers); "
                               "default: the autoscaling config Ray reports, else ~/ray_bootstrap_config.yaml on the "
                               "head (where `ray job submit` runs the driver), else the GPUs in the cluster now")
    pipeline.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs reserved per inference actor")
    pipeline.add_argument("--torch-threads", type=int, default=None,
                          help="torch threads of a CPU-only inference actor (default: --cpus-per-actor)")
    pipeline.add_argument("--actor-memory-gb", type=float, default=2.0, help="memory reserved per inference actor")
    pipeline.add_argument("--min-actors", type=int, default=1, help="smallest size of the inference actor pool")
    pipeline.add_argument("--max-actors", type=int, default=None,
                          help="largest size of the inference actor pool; default: GPU actors up to the most GPUs "
                               "the cluster can have (see --cluster-config), 1 CPU actor")
    pipeline.add_argument("--decode-concurrency", type=int, default=None,
                          help="most decode tasks at once (default: as many as free CPUs allow)")
    pipeline.add_argument("--rows-per-file", type=int, default=1000, help="most rows in one Parquet shard")
    pipeline.add_argument("--max-pixels", type=int, default=None,
                          help="images with more pixels (read from the header) get an error row (decompression-bomb guard); "
                               "default 100 million")
    pipeline.add_argument("--max-image-bytes", type=int, default=DEFAULT_MAX_IMAGE_BYTES, metavar="BYTES",
                          help="objects larger than this (listed size, else while reading) get a too_large row "
                               "without being read")
    pipeline.add_argument("--max-image-memory-gb", type=float, default=DEFAULT_MAX_IMAGE_MEMORY_GB, metavar="GB",
                          help="an image whose method would hold more than this at once (its estimate: NACLIP's "
                               "maps of one tile of the original photo, CLIP-DIY's saliency activations) gets a "
                               "too_large row instead of being labelled; a batch runs in groups whose estimates fit it")
    pipeline.add_argument("--max-worker-deaths", type=int, default=DEFAULT_MAX_WORKER_DEATHS, metavar="N",
                          help="a batch whose decode task, inference actor or row task died N times (a lost node "
                               "or another process's memory pressure not counted) goes image by image; an image on "
                               "which its process dies twice gets a worker_lost row")
    pipeline.add_argument("--retry-errors", choices=RETRY_ERRORS, default="transient",
                          help="which images with an error row from an earlier run to label again: transient "
                               "(failed reads and model calls; a missing object, not_found, is an answer: read again when listed "
                               "with another version), all (not_found included), or none")
    pipeline.add_argument("--read-deadline-s", type=float, default=DEFAULT_READ_DEADLINE_S, metavar="S",
                          help="the most seconds one object's read may take, all its tries included (S3, GCS, "
                               "HTTP(S)): a store that stalls or trickles costs this much per object, and the object "
                               "gets a timed_out row")
    pipeline.add_argument("--timed-out-nights", type=int, default=DEFAULT_TIMED_OUT_NIGHTS, metavar="N",
                          help="runs that try an object whose read timed out before its timed_out row is kept as its "
                               "answer (with --retry-errors transient)")
    pipeline.add_argument("--stop-after-failed-reads", type=int, default=200, metavar="N",
                          help="end the run (exit 1) when N reads in a row, across the cluster, fail: credentials, "
                               "permissions, a vanished bucket, an endpoint down, a manifest of missing objects (missing objects "
                               "count only in a first attempt that has read nothing)")
    pipeline.add_argument("--max-error-rate", type=float, default=0.5, metavar="RATE",
                          help="error budget: stop the run (exit 3, resumable) when more than this share of the last "
                               "--error-window written images are error rows (1 never stops)")
    pipeline.add_argument("--error-window", type=int, default=5000, metavar="N",
                          help="images over which --max-error-rate is judged (runs with fewer are never stopped)")
    pipeline.add_argument("--address", default=None,
                          help="Ray cluster address; default: RAY_ADDRESS (set by `ray job submit`), else an embedded local Ray")
    pipeline.add_argument("--num-cpus", type=int, default=None, help="CPUs of an embedded local Ray (default: all)")
    pipeline.add_argument("--log-every", type=float, default=30.0, metavar="SECONDS",
                          help="seconds between progress log lines (and lock heartbeats)")
    return parser


def config_from_args(args: argparse.Namespace):
    """The :class:`LabelJobConfig` of parsed arguments (raises JobConfigError / ValueError)."""
    from clipdiy.pipeline.config import DEFAULT_MAX_PIXELS, LabelJobConfig
    from clipdiy.storage import StorageOptions

    clip_defaults = default_clip_config(args.method)
    try:
        dilations = tuple(int(d) for d in args.pamr_dilations.split(",") if d.strip())
    except ValueError:
        raise ValueError(f"--pamr-dilations must be comma-separated integers, got {args.pamr_dilations!r}") from None
    segmenter = SegmenterConfig(
        method=args.method,
        vocabulary=args.vocabulary or {NACLIP: "naclip-voc21", TRIDENT: "trident-voc21"}.get(args.method, "voc"),
        clip=ClipConfig(
            model=args.clip_model or clip_defaults.model,
            pretrained=args.clip_pretrained if args.clip_pretrained is not None else clip_defaults.pretrained,
            checkpoint=args.clip_checkpoint,
            model_config=args.clip_model_config,
        ),
        refine=args.refine,
        pamr=PamrConfig(iterations=args.pamr_iterations, dilations=dilations),
        naclip=NaclipConfig(window=args.naclip_window),
        trident=TridentConfig(
            dino_checkpoint=args.trident_dino_checkpoint, sam_checkpoint=args.sam_checkpoint, prob_thd=args.trident_prob_thd
        ),
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
        input_format=args.input_format,
        image_column=args.image_column,
        id_column=args.id_column,
        segmenter=segmenter,
        storage=storage,
        decode_batch_size=args.decode_batch_size,
        inference_batch_size=args.batch_size,
        min_actors=args.min_actors,
        max_actors=args.max_actors,
        gpus_per_actor=args.gpus_per_actor,
        device=args.device,
        gpu_wait_s=args.gpu_wait_seconds,
        cluster_config=args.cluster_config,
        cpus_per_actor=args.cpus_per_actor,
        torch_threads=args.torch_threads,
        actor_memory_gb=args.actor_memory_gb,
        decode_concurrency=args.decode_concurrency,
        rows_per_file=args.rows_per_file,
        max_pixels=args.max_pixels if args.max_pixels is not None else DEFAULT_MAX_PIXELS,
        max_image_bytes=args.max_image_bytes,
        max_worker_deaths=args.max_worker_deaths,
        max_image_memory_gb=args.max_image_memory_gb,
        limit=args.limit,
        listing_tasks=args.listing_tasks,
        run_id=args.run_id,
        address=args.address,
        local_num_cpus=args.num_cpus,
        heartbeat_s=args.log_every,
        lock_stale_after_s=max(300.0, 4 * args.log_every),
        retry_errors=args.retry_errors,
        stop_after_failed_reads=args.stop_after_failed_reads,
        read_deadline_s=args.read_deadline_s,
        timed_out_nights=args.timed_out_nights,
        max_error_rate=args.max_error_rate,
        error_window=args.error_window,
    )


def _refuse(error: BaseException) -> int:
    """One error line (no credentials); exit 2, or the error's own ``exit_status`` (1 or 3 when work was done)."""
    from clipdiy.pipeline.control.failure import one_line, root_cause

    # root_cause: an error raised in a Ray task arrives inside Ray's wrapper, whose text is not the message.
    message = one_line(str(root_cause(error))) or type(error).__name__
    print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
    return getattr(error, "exit_status", 2)


def _exit_on_lock_loss(error: BaseException) -> None:
    """The OUTPUT lock is lost: end the driver now (its Ray tasks end with it), before another run
    may take the lock over; exit 1 (work was done; starting again resumes)."""
    _refuse(error)
    logging.shutdown()
    os._exit(1)


def _redacted_excepthook(kind, value, tb) -> None:
    """Tracebacks (bugs) still print, without the credentials a URI in them may carry."""
    # Text from any library's exception (finding 7): redacted as text, there is no Location here.
    sys.stderr.write(redact_text("".join(traceback.format_exception(kind, value, tb))))


def main(argv: list[str] | None = None) -> int:
    sys.excepthook = _redacted_excepthook
    threading.excepthook = lambda hook: _redacted_excepthook(hook.exc_type, hook.exc_value, hook.exc_traceback)
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    try:
        config = config_from_args(args)
    except ValueError as error:  # a config dataclass rejected an option value
        return _refuse(error)
    from clipdiy.pipeline.control.run import run_labelling

    try:
        summary = run_labelling(config, on_lock_lost=_exit_on_lock_loss)
    except ClipdiyError as error:
        # Refusals (input, weights, vocabulary, lock) and stopped runs are one line; tracebacks are for bugs.
        return _refuse(error)
    except Exception as error:  # logged with its traceback, reported as "failed mid-run"
        from clipdiy.pipeline.control.failure import describe_failure

        logging.getLogger(PROG).exception("the run failed")
        # The root cause (a full disk and its path), not the Ray task wrapper that carried it.
        print(f"{PROG}: error: the run failed mid-run ({describe_failure(error)}); start again to resume",
              file=sys.stderr, flush=True)
        return 1
    print(f"{PROG}: {summary.line()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
