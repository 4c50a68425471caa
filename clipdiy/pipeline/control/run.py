"""``run_labelling``: one run of the labelling job, from pre-flight checks to the run manifest.

Order of work (everything that can refuse the job does so before any image is touched):

1. the input is reachable and holds at least one image (``check_input_reachable``);
2. the models load in the driver (missing weights fail here) and the text embeddings are
   computed, once for the whole run;
3. Ray: the cluster at ``config.address`` / ``RAY_ADDRESS``, else an embedded local Ray;
   the inference pool's placement (``clipdiy.pipeline.stages.placement``): GPU actors on a cluster,
   waiting a bounded time for a GPU node, refused when the cluster cannot have one;
4. the OUTPUT lock is taken; the unfinished run is resumed, or a new run is planned;
5. planning (``planning/pending.py``): the listing streams from a Ray Data read task; when OUTPUT holds
   rows that could count, it is anti-joined with them by Ray Data's hash-partitioned joins first;
6. Ray Data: decode (CPU tasks) -> ``Segmenter.predict`` (actor pool; an actor that cannot
   load the models at its start stops the job) -> label rows (CPU tasks) -> Parquet shards
   (CPU tasks); the driver logs progress per shard;
7. the manifest is written last, the lock released, a :class:`RunSummary` returned.

Calling it (for benchmarks and tests)::

    from clipdiy.pipeline.config import LabelJobConfig
    from clipdiy.pipeline.control.run import run_labelling
    summary = run_labelling(LabelJobConfig(input="photos/", output="labels/", segmenter=...))
    print(summary.line())

When Ray is already initialised in the process (a test's module-scoped Ray), that Ray is used
and left running; an embedded Ray started here is shut down at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

from clipdiy.output_layout import OutputLayout
from clipdiy.pipeline.config import LISTING_BATCHES_PER_BLOCK, LabelJobConfig
from clipdiy.pipeline.stages.dataset import build_dataset, keep_task_exceptions
from clipdiy.pipeline.stages.driver_models import DriverModels, resolve_models
from clipdiy.pipeline.planning.incremental import ListingCounts
from clipdiy.pipeline.stages.inference import actor_start_refusals
from clipdiy.pipeline.sources.input_check import check_input_format
from clipdiy.pipeline.control.lock import LockLostError, OutputLock
from clipdiy.pipeline.planning.manifest import (
    RunPlan,
    build_manifest,
    finished_run_ids,
    plan_run,
    shard_records,
    write_manifest,
    write_run_state,
)
from clipdiy.pipeline.stages.placement import InferencePlacement, plan_placement
from clipdiy.pipeline.stages.stage_configs import InferenceConfig, LabellingStages, ReadConfig, WriteConfig
from clipdiy.pipeline.stages.writer import ShardTarget
from clipdiy.pipeline.planning.pending import Plan, PlanTarget, plan_pending, remove_plans
from clipdiy.pipeline.control.progress import Progress
from clipdiy.pipeline.control.release import free_resources, stop_actors, wait_for_release
from clipdiy.locations import Location
from clipdiy.uris import redact_document

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class RunSummary:
    """What one start of the job did. ``seen``/``ok``/``error`` count this start's rows;
    ``skipped`` counts listed images already labelled (by earlier runs or earlier attempts)."""

    run_id: str
    attempt: int
    resumed: bool
    output: Location  # OUTPUT: shown by its public form
    manifest_path: str
    listed: int
    skipped: int
    seen: int
    ok: int
    error: int
    labelling_seconds: float
    total_seconds: float

    @property
    def images_per_second(self) -> float:
        return self.seen / self.labelling_seconds if self.labelling_seconds > 0 else 0.0

    def line(self) -> str:
        return (
            f"run {self.run_id}: {self.seen} images seen, {self.ok} labelled, {self.error} errors, "
            f"{self.skipped} skipped, {self.images_per_second:.2f} images/s "
            f"({self.labelling_seconds:.1f} s labelling, {self.total_seconds:.1f} s total)"
        )


def connect_ray(config: LabelJobConfig) -> bool:
    """Connect to the cluster, or start an embedded local Ray. True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=config.local_num_cpus, include_dashboard=False)
    return True


def inference_placement(config: LabelJobConfig) -> InferencePlacement:
    """GPU or CPU actors and the pool's upper bound (``clipdiy.pipeline.stages.placement``); on a
    cluster, waits (bounded by ``config.gpu_wait_s``) for a GPU node. Raises GpuUnavailableError."""
    return plan_placement(
        config.device, config.gpus_per_actor, config.max_actors, config.address, config.gpu_wait_s, config.cluster_config
    )


def _list_pending(config: LabelJobConfig, layout: OutputLayout, plan: RunPlan) -> Plan:
    """The listing rows still to label, as a dataset (see ``planning.py``)."""
    target = PlanTarget(
        input_uri=config.input,
        output_uri=config.output,
        storage=config.storage,
        run_id=plan.run_id,
        attempt=plan.attempt,
        retry_errors=config.retry_errors,
        block_rows=config.decode_batch_size * LISTING_BATCHES_PER_BLOCK,
        limit=config.limit,
        listing_tasks=config.listing_tasks,
        timed_out_nights=config.timed_out_nights,
        input_format=config.input_format or "files",
    )
    earlier = [r for r in finished_run_ids(layout) if r != plan.run_id]
    return plan_pending(target, earlier, estimated_rows_per_shard=config.rows_per_file)


def labelling_stages(config: LabelJobConfig, plan: RunPlan) -> LabellingStages:
    """Each stage's own configuration, built once from the job's (see ``stages/stage_configs.py``)."""
    return LabellingStages(
        read=ReadConfig(
            storage=config.storage,
            input_format=config.input_format or "files",
            batch_size=config.decode_batch_size,
            concurrency=config.decode_concurrency,
            max_pixels=config.max_pixels,
            max_image_bytes=config.max_image_bytes,
            read_attempts=config.read_attempts,
            read_deadline_s=config.read_deadline_s,
            image_column=config.image_column,
            id_column=config.id_column,
        ),
        inference=InferenceConfig(
            segmenter=config.segmenter,
            batch_size=config.inference_batch_size,
            num_threads=config.torch_threads or max(1, int(config.cpus_per_actor)),
            cpus_per_actor=config.cpus_per_actor,
            # The memory reservation also keeps Ray Data from fusing the decode tasks into the actors.
            memory_bytes=config.actor_memory_gb * 1024**3 if config.actor_memory_gb else None,
            min_actors=config.min_actors,
            max_image_bytes_in_memory=int(config.max_image_memory_gb * 1024**3),
        ),
        write=WriteConfig(target=ShardTarget(config.output, config.storage, plan.run_id, plan.attempt),
                          rows_per_file=config.rows_per_file),
        max_worker_deaths=config.max_worker_deaths,
    )


def _label(
    stages: LabellingStages, dataset_args: tuple, written: dict, progress: Progress, lock: OutputLock,
    *, first_attempt: bool, stop_after_failed_reads: int, max_error_rate: float, error_window: int,
) -> None:
    """Run the dataset, consuming its shard stats: progress, the error budget, the lock.

    ``first_attempt``: this is the run's first start (missing objects then count towards the
    failed-reads streak until one read succeeds; see :class:`~clipdiy.pipeline.stages.health.RunHealth`).

    Raises :class:`~clipdiy.errors.RunFailedError` (reads broken run-wide, with the health
    actor's one-line reason) or :class:`~clipdiy.errors.ErrorBudgetExceededError`; either way the
    shards written so far stay and the next start resumes. An inference actor that cannot load
    the models raises :class:`~clipdiy.errors.ActorStartError`: exit status 2 when this start
    wrote no shard yet, 1 when it did (failed mid-run).
    """
    import ray

    from clipdiy.errors import (
        ActorStartError,
        ClipdiyError,
        ErrorBudgetExceededError,
        OutputWriteError,
        RunFailedError,
    )
    from clipdiy.pipeline.control.failure import one_line, root_cause
    from clipdiy.pipeline.stages.health import ErrorBudget
    from clipdiy.pipeline.stages.health_actors import start_run_health
    from clipdiy.pipeline.stages.writer import MANIFEST_SHARD_FIELDS

    free_before = free_resources()
    health = start_run_health(stop_after_failed_reads, first_attempt=first_attempt)
    budget = ErrorBudget(max_error_rate, error_window)
    stats = build_dataset(stages, *dataset_args, health=health)
    batches = iter(stats.iter_batches(batch_size=None, batch_format="pyarrow"))
    over_budget = None
    finished = False
    stopped_by: BaseException | None = None
    try:
        with actor_start_refusals():
            for batch in batches:
                for record in batch.to_pylist():
                    written[record["path"]] = {k: record[k] for k in MANIFEST_SHARD_FIELDS}
                    progress.add(record)
                    over_budget = over_budget or budget.add(record["rows"], json.loads(record["error_kinds"] or "{}"))
                lock.check()
                if over_budget:
                    break
            else:
                finished = True
                verdict = ray.get(health.finish.remote())  # every read of a small corpus failed?
                if verdict is not None:
                    raise RunFailedError(verdict)
                for name in health.restarted():  # each said so when it happened; once more, at the end
                    logger.warning("the run's health actor (%s) was restarted during the run: its counts were lost",
                                   name)
    except ActorStartError as error:
        stopped_by = error
        if not written:
            raise  # nothing written by this start: refused before any work (exit 2)
        raise ActorStartError(
            f"{error}; stopped after {progress.rows} images, start again to resume", after_work=True
        ) from error
    except ClipdiyError as error:
        stopped_by = error
        root = root_cause(error)
        if isinstance(root, OutputWriteError):  # a task's write: its Ray wrapper is no message
            raise RunFailedError(f"{one_line(str(root))}; stopped after {progress.rows} images, "
                                 f"start again to resume") from error
        raise
    except Exception as error:
        try:
            verdict = ray.get(health.verdict.remote(), timeout=60)
        except Exception:  # noqa: BLE001 - the dataset's own error (raised below) is the one to report
            verdict = None
        stopped_by = error
        if verdict is not None:
            raise RunFailedError(verdict) from error
        raise
    finally:
        batches.close()  # stops the streaming execution when we leave early
        if not finished:
            # Ray Data lets a stopped execution's actors go only when the last reference to their
            # handles does (the stopping error holds some): end them, then wait (bounded) until
            # their CPUs are free, so that the next run in this Ray gets them.
            stop_actors(health)
        health.kill()
        if not finished:
            del batches, stats
            wait_for_release(free_before, stopped_by)
        del stopped_by
    if over_budget:
        raise ErrorBudgetExceededError(
            f"{over_budget}; stopped after {progress.rows} images, start again to resume "
            f"(--max-error-rate, --error-window)"
        )


def run_labelling(config: LabelJobConfig, *, on_lock_lost: Callable[[LockLostError], None] | None = None) -> RunSummary:
    """Run (or resume) the labelling job described by ``config``; see the module docstring.

    ``on_lock_lost`` is called (from a daemon thread) if this run loses the OUTPUT lock while
    working; the CLI exits 1 there. Without it the run raises
    :class:`~clipdiy.pipeline.control.lock.LockLostError` after the shard being written.

    Raises before any work: :class:`~clipdiy.errors.InputError` (unreachable or empty input),
    :class:`~clipdiy.errors.WeightsNotFoundError`, :class:`~clipdiy.errors.VocabularyError`,
    :class:`~clipdiy.pipeline.control.lock.OutputLockedError`, :class:`~clipdiy.pipeline.planning.manifest.RunConflictError`.
    """
    started = time.monotonic()
    config.validate()
    # The format (files, webdataset, parquet) is fixed before the run: detected once, recorded.
    config = dataclasses.replace(config, input_format=check_input_format(config.input, config.storage, config.input_format))
    layout = OutputLayout.open(config.output, config.storage)
    layout.ensure_dir(layout.root)
    lock = OutputLock(layout, config.run_id or "starting", stale_after_s=config.lock_stale_after_s,
                      heartbeat_s=config.heartbeat_s, on_lost=on_lock_lost)
    with lock:
        models = resolve_models(config.segmenter)
        started_ray = connect_ray(config)
        try:
            return _run_locked(config, layout, lock, models, started)
        finally:
            if started_ray:
                import ray

                ray.shutdown()


def _run_locked(
    config: LabelJobConfig, layout: OutputLayout, lock: OutputLock, models: DriverModels, started: float
) -> RunSummary:
    placement = inference_placement(config)
    # Redacted as recorded in _RUN.json, so a resume compares like with like.
    fingerprint = redact_document({"input": config.input.public, "model": dataclasses.asdict(models.provenance)})
    plan = plan_run(layout, config.run_id, fingerprint)
    lock.info.run_id = plan.run_id
    options = config.describe()
    write_run_state(layout, plan, fingerprint, options)
    logger.info(
        "run %s (attempt %d%s): %s -> %s, %g GPU(s) per actor, up to %d actors (%s)",
        plan.run_id, plan.attempt, ", resuming" if plan.resumed else "", config.input, layout.uri,
        placement.gpus_per_actor, max(config.min_actors, placement.max_actors), placement.max_source,
    )

    keep_task_exceptions()
    listing_started = time.monotonic()
    pending = _list_pending(config, layout, plan)
    counts = pending.counts
    listing_seconds = time.monotonic() - listing_started
    if counts is None:
        logger.info("nothing labelled in %s yet: the listing streams into the labelling", layout.uri)
    elif config.input_format not in (None, "files"):
        # Shard inputs are planned per shard: these counts are shards, not samples.
        logger.info(
            "listed %d shards: %d labelled whole by earlier runs, %d to read (%d of them to retry some samples, "
            "--retry-errors %s)",
            counts.listed, counts.skipped, counts.todo, counts.retried, config.retry_errors,
        )
    else:
        logger.info(
            "listed %d images: %d labelled by earlier runs, %d by earlier attempts of this run, %d to label "
            "(%d of them earlier errors retried, --retry-errors %s)",
            counts.listed, counts.skipped, counts.resumed, counts.todo, counts.retried, config.retry_errors,
        )

    labelling_started = time.monotonic()
    written: dict[str, dict] = {}
    with Progress(counts.todo if counts else None, config.heartbeat_s) as progress:
        if pending.dataset is not None:
            _label(labelling_stages(config, plan), (pending.dataset, models, plan, placement), written, progress, lock,
                   first_attempt=plan.attempt == 1, stop_after_failed_reads=config.stop_after_failed_reads,
                   max_error_rate=config.max_error_rate, error_window=config.error_window)
    labelling_seconds = time.monotonic() - labelling_started
    lock.check()
    remove_plans(layout, plan.run_id)
    if counts is None:  # the listing streamed: every listed image was labelled by this start
        counts = ListingCounts(listed=sum(r["rows"] for r in written.values()))

    # Earlier attempts' shards are counted by Ray tasks, not read one by one here.
    shards = shard_records(layout, plan.run_id, written, storage=config.storage, tasks=config.listing_tasks)
    run_rows = sum(s["rows"] for s in shards)
    run_ok = sum(s["ok"] for s in shards)
    seen = sum(r["rows"] for r in written.values())
    ok = sum(r["ok"] for r in written.values())
    manifest = build_manifest(
        plan=plan,
        input_uri=config.input.public,
        options=options,
        vocabulary={
            "name": models.provenance.vocabulary_name,
            "hash": models.provenance.vocabulary_hash,
            "class_names": list(models.class_names),
        },
        # seen/ok/error: rows of this run over all its attempts; skipped: labelled by other runs;
        # retried: images of this start whose error rows in earlier runs are labelled again.
        counts={
            "listed": counts.listed,
            "skipped": counts.skipped,
            "retried": counts.retried,
            "seen": run_rows,
            "ok": run_ok,
            "error": run_rows - run_ok,
            "attempts": plan.attempt,
        },
        shards=shards,
        timings={
            "listing": round(listing_seconds, 3),
            "labelling": round(labelling_seconds, 3),
            "total": round(time.monotonic() - started, 3),
            "images_per_second": round(seen / labelling_seconds, 4) if labelling_seconds > 0 else 0.0,
        },
    )
    manifest_path = write_manifest(layout, manifest)
    summary = RunSummary(
        run_id=plan.run_id,
        attempt=plan.attempt,
        resumed=plan.resumed,
        output=config.output,
        manifest_path=manifest_path,
        listed=counts.listed,
        skipped=counts.skipped + counts.resumed,
        seen=seen,
        ok=ok,
        error=seen - ok,
        labelling_seconds=labelling_seconds,
        total_seconds=time.monotonic() - started,
    )
    return summary
