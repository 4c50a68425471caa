"""The labelling job against a multi-node ``ray.cluster_utils.Cluster`` (the job given the
cluster's address, as under ``ray job submit``): GPU actors by default, even when the GPU node
joins only after the job started; CPU actors when asked; a GPU request the cluster cannot meet
ends the job with one line within the bounded wait; an actor that cannot load the weights
stops the job with the weights error (exit 2, nothing written).

The GPU node only declares ``{"GPU": 1}`` (no CUDA here): its actors run their models on CPU."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import threading

import pytest
from pipeline_support import copy_images, job_config, read_all_rows, segmenter_config

pytestmark = pytest.mark.slow


@pytest.fixture
def cpu_head_cluster():
    """A head node with 2 CPUs and no GPU; tests add the worker nodes they need."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def images(coco_images, tmp_path):
    copy_images(tmp_path / "images", coco_images, 3)
    return tmp_path / "images"


def _segment_actor_nodes() -> set[str]:
    """Node ids of the job's inference actors (Ray Data names them after the UDF)."""
    from ray._private.state import state

    return {a["Address"]["NodeID"] for a in state.actor_table(None).values() if "SegmentBatch" in a["ActorClassName"]}


class _Seen(logging.Handler):
    """Sets ``event`` when a log record's message contains ``text``."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text
        self.event = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.event.set()


def test_gpu_actors_by_default_when_the_gpu_node_joins_after_the_start(cpu_head_cluster, images, tiny_clip_config, tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    waiting = _Seen("waiting up to")
    placement_logger = logging.getLogger("clipdiy.pipeline.stages.placement")
    placement_logger.addHandler(waiting)
    placement_logger.setLevel(logging.INFO)
    config = job_config(images, tmp_path / "labels", segmenter_config(tiny_clip_config),
                        address=cpu_head_cluster.address, max_actors=None, gpu_wait_s=240.0)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = run_labelling(config)
        except BaseException as error:  # noqa: BLE001 - reported by the assertions below
            outcome["error"] = error

    job = threading.Thread(target=run)
    job.start()
    try:
        # The job asks for a GPU although the cluster has none yet (an autoscaler would start one).
        assert waiting.event.wait(timeout=180), "the job did not wait for a GPU node"
        gpu_node = cpu_head_cluster.add_node(num_cpus=1, num_gpus=1)
        job.join(timeout=600)
    finally:
        placement_logger.removeHandler(waiting)
    assert not job.is_alive()
    assert "error" not in outcome, outcome.get("error")
    summary = outcome["summary"]
    assert (summary.seen, summary.ok, summary.error) == (3, 3, 0)
    assert len(read_all_rows(tmp_path / "labels")) == 3
    # The head has CPUs to spare: only a GPU request puts every inference actor on the GPU node.
    assert _segment_actor_nodes() == {gpu_node.node_id}


def test_device_cpu_needs_no_gpu(cpu_head_cluster, images, tiny_clip_config, tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    # No GPU anywhere and a zero wait: an actor that asked for a GPU could never start.
    config = job_config(images, tmp_path / "labels", segmenter_config(tiny_clip_config),
                        address=cpu_head_cluster.address, device="cpu", max_actors=None, gpu_wait_s=0.0)
    summary = run_labelling(config)
    assert (summary.seen, summary.ok, summary.error) == (3, 3, 0)
    head = {n["NodeID"] for n in __import__("ray").nodes()}
    assert _segment_actor_nodes() <= head and _segment_actor_nodes()


def test_impossible_gpu_request_ends_with_one_line_within_the_wait(cpu_head_cluster, images, tiny_clip_config, tmp_path):
    import time

    from clipdiy.errors import GpuUnavailableError
    from clipdiy.pipeline.control.run import run_labelling

    config = job_config(images, tmp_path / "labels", segmenter_config(tiny_clip_config),
                        address=cpu_head_cluster.address, max_actors=None, gpu_wait_s=3.0)
    started = time.monotonic()
    with pytest.raises(GpuUnavailableError) as raised:
        run_labelling(config)
    assert time.monotonic() - started < 120  # bounded: the wait, not forever
    message = str(raised.value)
    assert len(message.splitlines()) == 1
    assert "within 3 s" in message and "--gpu-wait-seconds" in message and "--device cpu" in message
    assert not list((tmp_path / "labels").glob("runs/*/part-*.parquet"))


def test_cluster_file_without_gpu_type_is_refused_at_once(cpu_head_cluster, images, tiny_clip_config, tmp_path):
    import yaml
    from test_gpu_placement import CLUSTER_YAML

    from clipdiy.errors import GpuUnavailableError
    from clipdiy.pipeline.control.run import run_labelling

    cluster_file = yaml.safe_load(CLUSTER_YAML.read_text())
    cluster_file["available_node_types"]["gpu_spot"]["resources"].pop("GPU")
    path = tmp_path / "cpu-only.yaml"
    path.write_text(yaml.safe_dump(cluster_file))
    # A wait far beyond the test's timeout: only the refusal without waiting lets it pass.
    config = job_config(images, tmp_path / "labels", segmenter_config(tiny_clip_config),
                        address=cpu_head_cluster.address, max_actors=None, gpu_wait_s=100_000.0,
                        cluster_config=str(path))
    with pytest.raises(GpuUnavailableError, match="no GPU node type.*--device cpu"):
        run_labelling(config)


def test_actor_that_cannot_load_the_weights_stops_the_job(cpu_head_cluster, images, tiny_clip_config, tmp_path,
                                                         monkeypatch, capsys):
    from pipeline_support import cli_args, label_main

    from clipdiy.pipeline.control import run

    # The driver loads the checkpoint (resolve_models), then it vanishes before the inference
    # actors start: a node without the weights, seen from the actor that must load them there.
    checkpoint = tmp_path / "weights" / "clip.pt"
    checkpoint.parent.mkdir()
    shutil.copy(tiny_clip_config.checkpoint, checkpoint)
    resolve_models = run.resolve_models

    def resolve_then_remove(segmenter_config):
        models = resolve_models(segmenter_config)
        checkpoint.unlink()
        return models

    monkeypatch.setattr(run, "resolve_models", resolve_then_remove)
    clip = dataclasses.replace(tiny_clip_config, checkpoint=str(checkpoint))
    output = tmp_path / "labels"
    args = cli_args(images, output, clip, "--address", cpu_head_cluster.address, "--device", "cpu")[2:]
    assert label_main(args) == 2  # refused before any work (docs/job/failures.md, --help)
    assert not checkpoint.exists()
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("label.py: error: CLIP weights not found")
    assert "--clip-checkpoint" in message and str(checkpoint) in message
    assert not list(output.glob("runs/*/part-*.parquet"))  # no rows, error rows included
