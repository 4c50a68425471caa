"""Each stage of the Ray Data plan gets its own part of the job's options (stages/stage_configs.py),
as the flags set them: the plan is built against a recording stand-in of a Dataset (no Ray)."""

from __future__ import annotations

import datetime as dt

from clipdiy.locations import Location
from clipdiy.pipeline.config import LISTING_BATCHES_PER_BLOCK
from clipdiy.pipeline.control import run
from clipdiy.pipeline.planning.manifest import RunPlan
from clipdiy.pipeline.stages.dataset import build_dataset
from clipdiy.pipeline.stages.placement import InferencePlacement
from clipdiy.segmentation.config import ClipConfig
from tests.pipeline_support import job_config, segmenter_config


class _Recorder:
    """What build_dataset asks of a Dataset, in order: (the stage's callable, its options)."""

    def __init__(self):
        self.calls = []

    def map_batches(self, fn, **options):
        self.calls.append((fn, options))
        return self

    def repartition(self, **options):
        self.calls.append(("repartition", options))
        return self


class _Models:
    text_embeddings, provenance, class_names = None, None, ("cat",)


def test_each_stage_takes_its_own_options_from_the_flags():
    config = job_config(
        "s3://AKIAX:SECRETpass@bucket/shards/", "s3://bucket/labels/",
        segmenter_config(ClipConfig(model="ViT-B-16", checkpoint="x.pt")),
        input_format="webdataset", decode_batch_size=5, decode_concurrency=3, inference_batch_size=6, rows_per_file=7,
        max_image_bytes=12345, read_deadline_s=9.0, image_column="jpg", cpus_per_actor=2.0, actor_memory_gb=1.5,
        max_image_memory_gb=2.0,
    )
    plan = RunPlan(run_id="run-1", attempt=2, started_at=dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc), resumed=True)
    recorder = _Recorder()
    build_dataset(run.labelling_stages(config, plan), recorder, _Models(), plan,
                  InferencePlacement(gpus_per_actor=0.0, max_actors=4, on_cluster=False, max_source="test"))

    (_, shards), (expand, expanding), (_, samples), (decode, decoding), (_, inferring), (_, rows), (_, writing) = (
        recorder.calls)
    assert shards == {"target_num_rows_per_block": 1}
    # Samples leave the shard reader in blocks of what a listing block of loose objects holds.
    assert samples == {"target_num_rows_per_block": 5 * LISTING_BATCHES_PER_BLOCK}
    assert (expand.input_format, expand.block_rows, expand.max_image_bytes, expand.image_column) == (
        "webdataset", 5 * LISTING_BATCHES_PER_BLOCK, 12345, "jpg")
    assert expanding["compute"].size == 3
    assert (decode.max_image_bytes, decode.read_deadline_s) == (12345, 9.0)
    assert decoding["batch_size"] == 5 and decoding["compute"].size == 3 and decoding["max_retries"] > 0
    assert inferring["batch_size"] == 6 and inferring["num_cpus"] == 2.0
    assert inferring["memory"] == 1.5 * 1024**3 and inferring["compute"].max_size == 4
    assert inferring["fn_constructor_kwargs"]["num_threads"] == 2
    assert inferring["fn_constructor_kwargs"]["max_image_bytes_in_memory"] == 2 * 1024**3
    assert rows["batch_size"] == 6
    target = writing["fn_kwargs"]["target"]
    assert writing["batch_size"] == 7 and (target.run_id, target.attempt) == ("run-1", 2)
    assert target.output == Location("s3://bucket/labels/")
