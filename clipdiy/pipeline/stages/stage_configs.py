"""What each stage of the labelling needs to know, and nothing more.

``control/run.py`` builds these once from the job's :class:`~clipdiy.pipeline.config.LabelJobConfig`
(:func:`clipdiy.pipeline.control.run.labelling_stages`); the Ray Data plan
(:func:`clipdiy.pipeline.stages.dataset.build_dataset`) hands each stage its own: the reads
(:class:`ReadConfig`: expand shards, decode), the inference actors (:class:`InferenceConfig`),
and the rows and shard writes (:class:`WriteConfig`). So a stage's options are read in one place,
and a change to the job's flags reaches a stage only through the field that stage reads.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipdiy.pipeline.stages.writer import ShardTarget
from clipdiy.segmentation.config import SegmenterConfig
from clipdiy.storage import StorageOptions


@dataclass(frozen=True)
class ReadConfig:
    """Listing rows -> decoded images: the shard-expanding stage and the decode tasks.

    ``input_format``: ``files``, ``webdataset`` or ``parquet`` (fixed before the run).
    ``batch_size``: images per decode batch; ``concurrency``: decode tasks at once (None: one
    per CPU). ``max_pixels``, ``max_image_bytes``, ``read_attempts``, ``read_deadline_s``: the
    bounds of one read and decode (see ``LabelJobConfig``). ``image_column`` / ``id_column``:
    the columns of a Parquet corpus."""

    storage: StorageOptions
    input_format: str
    batch_size: int
    concurrency: int | None
    max_pixels: int
    max_image_bytes: int | None
    read_attempts: int
    read_deadline_s: float | None
    image_column: str | None = None
    id_column: str | None = None


@dataclass(frozen=True)
class InferenceConfig:
    """Decoded images -> predictions: the inference actor pool.

    ``segmenter``: the model side; ``batch_size``: images per ``Segmenter.predict`` call;
    ``num_threads``: torch threads of an actor; ``cpus_per_actor`` / ``memory_bytes``: what each
    actor reserves (None: no memory reservation); ``min_actors``: the pool's floor (its ceiling
    is the placement's); ``max_image_bytes_in_memory``: an image whose working memory exceeds it
    gets a ``too_large`` row."""

    segmenter: SegmenterConfig
    batch_size: int
    num_threads: int
    cpus_per_actor: float
    memory_bytes: float | None
    min_actors: int
    max_image_bytes_in_memory: int


@dataclass(frozen=True)
class WriteConfig:
    """Predictions -> label rows -> Parquet shards: where, and up to how many rows a shard."""

    target: ShardTarget
    rows_per_file: int


@dataclass(frozen=True)
class LabellingStages:
    """The three stages' configurations, and what they share: ``max_worker_deaths`` (deaths of a
    process on one batch before it goes image by image, the attempt ledger)."""

    read: ReadConfig
    inference: InferenceConfig
    write: WriteConfig
    max_worker_deaths: int
