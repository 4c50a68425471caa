"""The run's Ray Data plan: pending listing rows -> decode -> predict -> label rows -> Parquet shards."""

from __future__ import annotations

import dataclasses

from clipdiy.pipeline.config import LISTING_BATCHES_PER_BLOCK
from clipdiy.pipeline.stages.driver_models import DriverModels
from clipdiy.pipeline.planning.manifest import RunPlan
from clipdiy.pipeline.stages.placement import InferencePlacement
from clipdiy.pipeline.stages.retry_options import map_batches_retried
from clipdiy.pipeline.stages.stage_configs import LabellingStages, ReadConfig
from clipdiy.pipeline.stages.writer import write_shard


def keep_task_exceptions() -> None:
    """Make a map task's exception reach the driver as itself (inside Ray's ``RayTaskError``),
    not as a ``UserCodeException`` whose cause is lost on the way: the job's last line names the
    real fault (``control/failure.py``), e.g. the OUTPUT file a full disk refused. Call before
    any dataset of the run is created: a dataset keeps the context it was created under."""
    import ray.data

    ray.data.DataContext.get_current().raise_original_map_exception = True


def writer_tasks(placement: InferencePlacement) -> int:
    """How many row-building and shard-writing tasks run at once: one per inference actor (each
    turns what one actor gives out into shards), and at least two, so that a slow write to the
    store does not hold the pool's output back."""
    return max(2, placement.max_actors)


def shard_streams() -> int:
    """Shards read at once when ``--decode-concurrency`` is unset: one per CPU of the cluster
    (a shard's stream feeds the decode tasks, which take one CPU each)."""
    import ray

    return int(ray.cluster_resources().get("CPU", 2))


def shard_block_rows(read: ReadConfig) -> int:
    """Samples per block leaving the shard-expanding stage: what a listing block of loose objects
    holds (``LISTING_BATCHES_PER_BLOCK`` decode batches), whatever the shard's size. The decode
    tasks' retry budget (``attempts.ray_task_retries``) counts on blocks no larger."""
    return read.batch_size * LISTING_BATCHES_PER_BLOCK


def expand_shards(pending, read: ReadConfig, health=None):
    """Shard rows -> sample rows (``stages/expand.py``) in blocks of :func:`shard_block_rows` rows.

    One task per shard streams it. Ray Data joins what a task yields into blocks of up to
    ``DataContext.target_max_block_size`` bytes (a whole shard of thumbnails: one block, one decode
    task per shard), so a streaming repartition after it cuts them back: decode tasks take blocks
    of the same size as over loose objects, however large a shard is (and as many decode tasks run
    as there are CPUs, even over fewer shards). The cut costs the sample bytes one more trip
    through the object store (slices of the expanded blocks, nothing re-encoded) and, on a small
    node, a few more worker processes started per run (``docs/benchmarks/shards.md``); no CPU
    per image was measured."""
    import ray.data

    from clipdiy.pipeline.stages.expand import ExpandShards

    rows = shard_block_rows(read)
    samples = pending.repartition(target_num_rows_per_block=1).map_batches(  # a shard per task
        ExpandShards(read.storage, read.input_format, rows, read.max_image_bytes,
                     read.image_column, read.id_column, health),
        batch_size=1,
        batch_format="pyarrow",
        # Waits on the store mostly (the decoding is the next stage's): no CPU reserved, a
        # bounded pool instead, so that a paused stream does not hold a CPU decode needs.
        num_cpus=0,
        # As many shards streamed at once as decode tasks may run (one per CPU by default).
        compute=ray.data.TaskPoolStrategy(size=max(2, read.concurrency or shard_streams())),
        udf_modifying_row_count=True,
    )
    return samples.repartition(target_num_rows_per_block=rows)


def build_dataset(stages: LabellingStages, pending, models: DriverModels, plan: RunPlan, placement: InferencePlacement,
                  health=None):
    """The Ray Data plan: ``pending`` (listing rows to label, a Dataset) -> decode -> predict ->
    rows -> shard stats. Each stage takes its own part of ``stages``.

    ``health``: the run's :class:`~clipdiy.pipeline.stages.health_actors.RunHealthHandles`, told of every
    read, of every actor a CUDA error poisons, and of every attempt at a decode, inference or row
    batch (the attempt ledger)."""
    import ray.data

    from clipdiy.segmentation.models.saliency import saliency_input_side

    # Imported here, not at the top: refusals before the models load stay free of torch imports.
    from clipdiy.pipeline.stages.decode import DecodeBatch
    from clipdiy.pipeline.stages.attempts import ray_task_retries
    from clipdiy.pipeline.stages.health import ACTOR_RESTARTS
    from clipdiy.pipeline.stages.inference import SegmentBatch
    from clipdiy.pipeline.stages.rows import RowContext, build_rows

    read, inference, write = stages.read, stages.inference, stages.write
    saliency_side = saliency_input_side(inference.segmenter.saliency)
    decode = DecodeBatch(
        read.storage,
        inference.segmenter.mode,
        read.max_pixels,
        read.read_attempts,
        saliency_max_side=saliency_side,
        # The method prepares its own inputs on the CPU workers (CLIP-DIY: saliency input shrunk
        # to what the backend reads).
        segmenter_config=dataclasses.replace(
            inference.segmenter, saliency=dataclasses.replace(inference.segmenter.saliency, max_side=saliency_side)
        ),
        health=health,
        max_image_bytes=read.max_image_bytes,
        max_worker_deaths=stages.max_worker_deaths,
        read_deadline_s=read.read_deadline_s,
    )
    # Finite retries of a task and restarts of an actor (Ray Data's defaults are infinite), above
    # what the run's attempt ledger needs (health.RunHealth): a process that dies on a batch is
    # retried until, after --max-worker-deaths deaths, the batch goes image by image and the image
    # that kills its process gets a worker_lost row.
    decode_retries = ray_task_retries(stages.max_worker_deaths, read.batch_size, LISTING_BATCHES_PER_BLOCK)
    inference_retries = ray_task_retries(stages.max_worker_deaths, inference.batch_size, LISTING_BATCHES_PER_BLOCK)
    context = RowContext(plan.run_id, plan.started_at, models.provenance, models.class_names)
    if read.input_format != "files":
        pending = expand_shards(pending, read, health)
    ds = map_batches_retried(
        pending,
        decode,
        batch_size=read.batch_size,
        batch_format="pyarrow",
        compute=ray.data.TaskPoolStrategy(size=read.concurrency),
        num_cpus=1,
        udf_modifying_row_count=False,
        retries={"max_retries": decode_retries},
    )
    ds = map_batches_retried(
        ds,
        SegmentBatch,
        fn_constructor_kwargs={
            "segmenter_config": inference.segmenter,
            "text_embeddings": models.text_embeddings,
            "num_threads": inference.num_threads,
            "health": health,
            "max_worker_deaths": stages.max_worker_deaths,
            "max_image_bytes_in_memory": inference.max_image_bytes_in_memory,
        },
        batch_size=inference.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(
            min_size=inference.min_actors, max_size=max(inference.min_actors, placement.max_actors)
        ),
        num_cpus=inference.cpus_per_actor,
        num_gpus=placement.gpus_per_actor,
        # The memory reservation also keeps Ray Data from fusing the decode tasks into the
        # actors (fused, an accelerator would wait on reads and JPEG decoding).
        memory=inference.memory_bytes,
        udf_modifying_row_count=False,
        # A killed or poisoned actor is restarted and its batches retried (exactly-once relies on
        # it; tests/test_pipeline_failures.py checks it), finitely (Ray Data's default: forever).
        retries={"max_restarts": max(ACTOR_RESTARTS, inference_retries), "max_task_retries": inference_retries},
    )
    # Row tasks (fused with the shard writes) retried finitely too, above what the ledger needs
    # (Ray Data's default for tasks: forever); a row batch is an inference batch.
    rows_retries = ray_task_retries(stages.max_worker_deaths, inference.batch_size, LISTING_BATCHES_PER_BLOCK)
    ds = map_batches_retried(
        ds,
        build_rows,
        fn_kwargs={"context": context, "health": health, "max_worker_deaths": stages.max_worker_deaths},
        batch_size=inference.batch_size,
        batch_format="pyarrow",
        # No CPU reserved, a bounded pool instead: Ray Data reserves each operator's minimum in
        # pipeline order, so where decode and the actors take every CPU (a small cluster, a
        # workstation) a 1-CPU writer would get none until the whole input was decoded, and a
        # first run's first shard would wait for it. Building rows and writing cost less than
        # decoding, whose CPUs they share.
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=writer_tasks(placement)),
        udf_modifying_row_count=False,
        retries={"max_retries": rows_retries},
    )
    return map_batches_retried(
        ds,
        write_shard,
        fn_kwargs={"target": write.target},
        batch_size=write.rows_per_file,
        batch_format="pyarrow",
        num_cpus=0,
        compute=ray.data.TaskPoolStrategy(size=writer_tasks(placement)),  # fused with the rows
        retries={"max_retries": rows_retries},  # the same as the rows' (fused tasks share their options)
        # One stats row per shard of up to rows_per_file label rows: no limit pushdown past it.
        udf_modifying_row_count=True,
    )
