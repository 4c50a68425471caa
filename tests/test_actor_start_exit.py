"""An inference actor that cannot load the models stops the job; its exit status says whether
this start did work: 2 when no shard was written yet (refused before any work), 1 when shards
were (failed mid-run: start again to resume), as --help and docs/job/failures.md document.

Unit level: ``run._label`` consumes a stand-in for the shard-stats dataset that yields some shard
stats and then fails the way Ray reports an actor whose constructor raised; the CLI's own
``_refuse`` turns the error into the exit status and the one line on stderr.
"""

from __future__ import annotations

import pyarrow as pa
import pytest
from pipeline_support import job_config, load_label_job, segmenter_config

from clipdiy.errors import ActorStartError
from clipdiy.pipeline.control import run
from clipdiy.pipeline.stages.inference import ACTOR_START_REFUSED
from clipdiy.segmentation.config import ClipConfig

REFUSAL = "CLIP weights not found: /mnt/weights/clip.pt does not exist on this node (set --clip-checkpoint)"


class _ShardStats:
    """``shards`` shard-stats batches of 4 rows, then the refusal of an actor started late (a
    node that joined without the weights), as Ray's actor-died error carries it."""

    def __init__(self, shards: int):
        self.shards = shards

    def iter_batches(self, **_options):
        for index in range(self.shards):
            yield pa.table({"path": [f"runs/r/part-{index:05d}.parquet"], "rows": [4], "ok": [4], "error": [0],
                            "bytes": [1000], "error_kinds": ["{}"]})
        raise RuntimeError(
            "The actor died because of an error raised in its creation task, "
            f"ray::MapWorker(MapBatches(SegmentBatch)).__init__(): {ACTOR_START_REFUSED}{REFUSAL}\nTraceback (...)"
        )


class _Health:
    """The run's health actors' handles, as far as a run stopped at its start uses them."""

    def kill(self) -> None:
        pass


_PLAN = run.RunPlan(run_id="r1", attempt=1, started_at=None, resumed=False)


class _Lock:
    def check(self) -> None:
        """The lock is held throughout."""


@pytest.mark.parametrize("shards_before,exit_status", [(0, 2), (2, 1)])
def test_actor_start_failure_exits_2_before_any_shard_and_1_after(shards_before, exit_status, monkeypatch, capsys):
    import ray

    from clipdiy.pipeline.stages import health_actors

    monkeypatch.setattr(run, "build_dataset", lambda config, *args, health: _ShardStats(shards_before))
    monkeypatch.setattr(health_actors, "start_run_health", lambda stop_after_failed_reads, first_attempt: _Health())
    monkeypatch.setattr(ray, "kill", lambda actor: None)
    monkeypatch.setattr(run, "free_resources", dict)
    monkeypatch.setattr(run, "stop_actors", lambda health: None)
    monkeypatch.setattr(run, "wait_for_release", lambda *args: True)
    config = job_config("photos/", "labels/", segmenter_config(ClipConfig(model="ViT-B-16", checkpoint="x.pt")))
    written: dict[str, dict] = {}
    progress = run.Progress(None, interval=3600.0)  # not started: no progress thread

    with pytest.raises(ActorStartError) as raised:
        run._label(run.labelling_stages(config, _PLAN), (), written, progress, _Lock(), first_attempt=True,
                   stop_after_failed_reads=config.stop_after_failed_reads, max_error_rate=config.max_error_rate,
                   error_window=config.error_window)

    assert len(written) == shards_before
    assert load_label_job()._refuse(raised.value) == exit_status
    line = capsys.readouterr().err.strip()
    assert len(line.splitlines()) == 1
    assert line.startswith(f"label.py: error: {REFUSAL}")
    if exit_status == 1:
        assert f"after {4 * shards_before} images" in line and "start again to resume" in line
    else:
        assert line == f"label.py: error: {REFUSAL}"
