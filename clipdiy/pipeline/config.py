"""Typed configuration of one labelling job (``jobs/label.py`` builds it from its flags)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from clipdiy.errors import ClipdiyError
from clipdiy.image_address import DEFAULT_MAX_IMAGE_BYTES
from clipdiy.locations import Location, as_location
from clipdiy.pipeline.planning.incremental import RETRY_ERRORS
from clipdiy.pipeline.stages.placement import DEVICES
from clipdiy.segmentation.config import SegmenterConfig
from clipdiy.storage import StorageOptions
from clipdiy.uris import redact_document

#: Run ids become folder names under ``OUTPUT/runs/``: keep them path- and URL-safe.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

#: Default decompression-bomb guard: 100 megapixels (a 12,000 x 8,000 photo still passes).
DEFAULT_MAX_PIXELS = 100_000_000
#: Default bound of the bytes read per object (defined with the image fetcher the readers of
#: labels share, :mod:`clipdiy.image_address`): 256 MiB (a 100-megapixel JPEG is ~30-60 MB, a
#: 16-bit TIFF of one 300 MB); larger objects get a ``too_large`` row without being read.
#: The most seconds one object's read may take (retries included): a stalled store costs at most
#: two minutes of one decode task per object (docs/job/reads-and-faults.md).
DEFAULT_READ_DEADLINE_S = 120.0
#: Runs that read an object whose read timed out, before its ``timed_out`` row is its answer.
DEFAULT_TIMED_OUT_NIGHTS = 3
#: Default number of times a decode task or inference actor may die on one batch before the batch
#: goes image by image and the image that still kills its process gets a ``worker_lost`` row.
DEFAULT_MAX_WORKER_DEATHS = 3
#: Default bound of one image's working memory in the inference actor (the method's estimate,
#: ``SegmentationMethod.working_bytes``). NACLIP works in tiles of the original photo after its
#: forward, so its estimate follows the tile (about 2.6 GB at 100 megapixels with the authors'
#: COCO-Object words and PAMR): with 16 GiB no photo under the decode guard is refused for memory.
DEFAULT_MAX_IMAGE_MEMORY_GB = 16.0
#: Listing rows per block handed to the labelling, in decode batches. A decode task takes whole
#: blocks, so blocks stay small enough for decode tasks to run in parallel; the listing streams
#: them (a read task's generator, backpressured), so the driver only ever holds the refs of the
#: blocks in flight, however large the bucket.
LISTING_BATCHES_PER_BLOCK = 8


class JobConfigError(ClipdiyError, ValueError):
    """An option of the labelling job is invalid; the message names the flag."""


@dataclass(frozen=True)
class LabelJobConfig:
    """Everything one run of the labelling job needs.

    input / output:        fsspec URIs or local paths (prefix, glob or manifest for the input;
                           for shards also a brace pattern, ``{00000..00009}.tar``).
    input_format:          ``files``, ``webdataset`` or ``parquet`` (None: detected from the input,
                           ``clipdiy.pipeline.sources.formats``); see docs/job/corpora.md.
    image_column:          ``parquet``: the column of image bytes (binary, or a ``{bytes, path}`` struct).
    id_column:             ``parquet``: the column of sample ids (None: the row's number in its file).
    segmenter:             the model side (vocabulary, CLIP, saliency, mode, crop batch size).
    storage:               object-storage settings, never credentials.
    decode_batch_size:     images per batch of a CPU decode task.
    inference_batch_size:  images per ``Segmenter.predict`` call in an actor.
    min_actors/max_actors: bounds of the autoscaling inference actor pool; ``max_actors`` None =
                           what the cluster can provide (see ``clipdiy.pipeline.stages.placement``).
    device:                ``auto`` (GPU actors on a cluster; on a local Ray, GPU when present),
                           ``gpu`` or ``cpu``.
    gpus_per_actor:        GPUs per GPU actor (None: 1); 0 means CPU actors.
    gpu_wait_s:            on a cluster, how long to wait for a GPU node to join before refusing.
    cluster_config:        ``ray up`` cluster file giving the most GPUs the cluster can have
                           (None: what Ray reports, else ``~/ray_bootstrap_config.yaml`` if present).
    cpus_per_actor:        CPUs reserved per inference actor.
    torch_threads:         torch threads of a CPU-only actor (None: ``cpus_per_actor``); more
                           than reserved suits a CPU machine whose other stages are light.
    actor_memory_gb:       memory reserved per inference actor (models and activations).
    decode_concurrency:    at most this many decode tasks at once (None: as many as CPUs allow).
    rows_per_file:         upper bound of rows in one Parquet shard.
    max_pixels:            decompression-bomb guard, checked from the image header.
    max_image_bytes:       objects larger than this (the listed size, else while reading) get a
                           ``too_large`` row without being read whole.
    max_image_memory_gb:   an image whose method's working memory (its estimate, which grows with
                           the pixel count) exceeds this gets a ``too_large`` row instead of being
                           labelled: it would otherwise kill its actor (an OOM kill) and end as
                           ``worker_lost`` after ``max_worker_deaths`` deaths. A batch runs in
                           groups whose summed estimates stay within it.
    max_worker_deaths:     a batch whose decode task, inference actor or row task died this many
                           times (deaths that were not about it, a lost node or another process's
                           memory pressure, not counted) is retried image by image; an image on
                           which its process dies twice then gets a ``worker_lost`` row (see
                           ``clipdiy.pipeline.stages.attempts``).
    limit:                 only the first N listed images are considered (None: all); a limit
                           keeps the listing in one task, in listing order.
    listing_tasks:         folders of a prefix listed at once, by tasks spread over the cluster.
    run_id:                None = resume the unfinished run in OUTPUT if there is one, else a
                           new id (UTC time + random suffix).
    address:               Ray cluster address; None = RAY_ADDRESS, else an embedded local Ray.
    local_num_cpus:        CPUs of an embedded local Ray (None: all of the machine).
    lock_stale_after_s:    a lock whose heartbeat is older than this is taken over.
    heartbeat_s:           how often the lock heartbeat and the progress log line are written.
    read_attempts:         tries per source read on transient storage errors.
    read_deadline_s:       the most seconds one object's read may take, all its tries and waits
                           included (S3, GCS, HTTP(S)); past it the object gets a ``timed_out`` row.
    timed_out_nights:      how many runs read an object whose read timed out before its
                           ``timed_out`` row stands as its answer (with ``retry_errors=transient``).
    retry_errors:          which error rows of earlier runs are labelled again: ``transient``
                           (failed reads and model calls; not ``not_found``), ``all`` or ``none``.
    stop_after_failed_reads: this many failed reads in a row, across the cluster, end the run
                           (exit 1): credentials, permissions, a vanished bucket, an endpoint down
                           (missing objects only in a first attempt that has read nothing).
    max_error_rate / error_window: the error budget; the run stops (exit 3, resumable) when more
                           than this share of the last ``error_window`` written images are errors
                           (1.0 never stops).
    """

    input: Location
    output: Location
    input_format: str | None = None
    image_column: str = "image"
    id_column: str | None = None
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    storage: StorageOptions = field(default_factory=StorageOptions)
    decode_batch_size: int = 8
    inference_batch_size: int = 8
    min_actors: int = 1
    max_actors: int | None = None
    gpus_per_actor: float | None = None
    device: str = "auto"
    gpu_wait_s: float = 1200.0
    cluster_config: str | None = None
    cpus_per_actor: float = 1.0
    torch_threads: int | None = None
    actor_memory_gb: float = 2.0
    decode_concurrency: int | None = None
    rows_per_file: int = 1000
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    max_worker_deaths: int = DEFAULT_MAX_WORKER_DEATHS
    max_image_memory_gb: float = DEFAULT_MAX_IMAGE_MEMORY_GB
    limit: int | None = None
    listing_tasks: int = 16
    run_id: str | None = None
    address: str | None = None
    local_num_cpus: int | None = None
    lock_stale_after_s: float = 300.0
    heartbeat_s: float = 30.0
    read_attempts: int = 4
    read_deadline_s: float = DEFAULT_READ_DEADLINE_S
    timed_out_nights: int = DEFAULT_TIMED_OUT_NIGHTS
    retry_errors: str = "transient"
    stop_after_failed_reads: int = 200
    max_error_rate: float = 0.5
    error_window: int = 5000

    def __post_init__(self) -> None:
        # The user-given INPUT and OUTPUT become Locations where they enter: every message and
        # record names them by their public form; only the listing and storage open them.
        object.__setattr__(self, "input", as_location(self.input))
        object.__setattr__(self, "output", as_location(self.output))
        self.validate()

    def validate(self) -> None:
        """Raise :class:`JobConfigError` naming the flag of the first invalid option."""
        if not self.input:
            raise JobConfigError("--input is required")
        if not self.output:
            raise JobConfigError("--output is required")
        positive = {
            "--batch-size": self.inference_batch_size,
            "--decode-batch-size": self.decode_batch_size,
            "--rows-per-file": self.rows_per_file,
            "--max-pixels": self.max_pixels,
            "--max-image-bytes": self.max_image_bytes,
            "--max-worker-deaths": self.max_worker_deaths,
            "--max-image-memory-gb": self.max_image_memory_gb,
            "--min-actors": self.min_actors,
            "--max-actors": self.max_actors if self.max_actors is not None else 1,
            "--read-attempts": self.read_attempts,
            "--read-deadline-s": self.read_deadline_s,
            "--timed-out-nights": self.timed_out_nights,
            "--stop-after-failed-reads": self.stop_after_failed_reads,
            "--error-window": self.error_window,
        }
        for flag, value in positive.items():
            if value < 1:
                raise JobConfigError(f"{flag} must be >= 1, got {value}")
        if self.max_actors is not None and self.max_actors < self.min_actors:
            raise JobConfigError(f"--max-actors ({self.max_actors}) is below --min-actors ({self.min_actors})")
        if self.decode_concurrency is not None and self.decode_concurrency < 1:
            raise JobConfigError(f"--decode-concurrency must be >= 1, got {self.decode_concurrency}")
        if self.gpus_per_actor is not None and self.gpus_per_actor < 0:
            raise JobConfigError(f"--gpus-per-actor must be >= 0, got {self.gpus_per_actor}")
        if self.device not in DEVICES:
            raise JobConfigError(f"--device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.device == "cpu" and self.gpus_per_actor:
            raise JobConfigError(f"--device cpu contradicts --gpus-per-actor {self.gpus_per_actor:g}")
        if self.gpu_wait_s < 0:
            raise JobConfigError(f"--gpu-wait-seconds must be >= 0, got {self.gpu_wait_s}")
        if self.cpus_per_actor <= 0:
            raise JobConfigError(f"--cpus-per-actor must be > 0, got {self.cpus_per_actor}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise JobConfigError(f"--torch-threads must be >= 1, got {self.torch_threads}")
        if self.actor_memory_gb < 0:
            raise JobConfigError(f"--actor-memory-gb must be >= 0, got {self.actor_memory_gb}")
        if self.listing_tasks < 1:
            raise JobConfigError(f"--listing-tasks must be >= 1, got {self.listing_tasks}")
        if self.limit is not None and self.limit < 1:
            raise JobConfigError(f"--limit must be >= 1, got {self.limit}")
        if self.run_id is not None and not RUN_ID_PATTERN.match(self.run_id):
            raise JobConfigError(
                f"--run-id {self.run_id!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if self.input_format is not None and self.input_format not in ("files", "webdataset", "parquet"):
            raise JobConfigError(f"--input-format must be files, webdataset or parquet, got {self.input_format!r}")
        if self.retry_errors not in RETRY_ERRORS:
            raise JobConfigError(f"--retry-errors must be one of {', '.join(RETRY_ERRORS)}, got {self.retry_errors!r}")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise JobConfigError(f"--max-error-rate must be between 0 and 1, got {self.max_error_rate}")
        if self.lock_stale_after_s <= 0 or self.heartbeat_s <= 0:
            raise JobConfigError("lock_stale_after_s and heartbeat_s must be > 0")
        if self.heartbeat_s * 2 > self.lock_stale_after_s:
            raise JobConfigError("heartbeat_s must be at most half of lock_stale_after_s")

    def describe(self) -> dict:
        """JSON-able options for the run manifest (no credentials: StorageOptions holds none)."""
        options = asdict(self)
        options["input"] = self.input.public
        options["output"] = self.output.public
        options["storage"] = self.storage.describe()
        return redact_document(options)  # checkpoint, head and model-config URIs too
