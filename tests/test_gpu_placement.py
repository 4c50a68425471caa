"""Where the inference actors go, without starting Ray: the GPU pool's bound from a cluster file,
the bounded wait for a GPU node, and the options that choose CPU or GPU."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipdiy.pipeline.config import JobConfigError, LabelJobConfig
from clipdiy.pipeline.stages.placement import max_gpus_in_cluster_file, wait_for_gpus

REPO_ROOT = Path(__file__).resolve().parent.parent
CLUSTER_YAML = REPO_ROOT / "ray_cluster.yaml"


def test_shipped_cluster_file_allows_eight_gpu_actors():
    # The figure for the shipped file: its spot GPU type, 8 nodes of 1 GPU each.
    assert max_gpus_in_cluster_file(CLUSTER_YAML) == 8


def test_cluster_file_bounds(tmp_path):
    config = yaml.safe_load(CLUSTER_YAML.read_text())

    def write(cfg) -> Path:
        path = tmp_path / "cluster.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return path

    no_gpu = copy.deepcopy(config)
    no_gpu["available_node_types"]["gpu_spot"]["resources"].pop("GPU")
    assert max_gpus_in_cluster_file(write(no_gpu)) == 0

    # 4 GPUs a node, at most 3 such nodes: 12.
    four = copy.deepcopy(config)
    four["available_node_types"]["gpu_spot"].update(max_workers=3, resources={"CPU": 48, "GPU": 4})
    assert max_gpus_in_cluster_file(write(four)) == 12

    # Two GPU types of 6 nodes each, but the cluster holds at most 8 workers: 8 GPUs, not 12.
    two = copy.deepcopy(config)
    two["available_node_types"]["gpu_b"] = copy.deepcopy(two["available_node_types"]["gpu_spot"])
    for name in ("gpu_spot", "gpu_b"):
        two["available_node_types"][name]["max_workers"] = 6
    assert max_gpus_in_cluster_file(write(two)) == 8


class FakeCluster:
    """Cluster resources that gain a GPU after ``joins_after`` looks; records autoscaler requests."""

    def __init__(self, joins_after: int | None):
        self.looks = 0
        self.joins_after = joins_after
        self.requests: list[list[dict]] = []

    def resources(self) -> dict:
        self.looks += 1
        joined = self.joins_after is not None and self.looks > self.joins_after
        return {"CPU": 8.0, **({"GPU": 1.0} if joined else {})}

    def request(self, bundles: list[dict]) -> None:
        self.requests.append(bundles)


def test_wait_for_gpus_asks_the_autoscaler_and_withdraws_the_request():
    cluster = FakeCluster(joins_after=3)
    assert wait_for_gpus(1.0, timeout_s=30.0, resources=cluster.resources, request=cluster.request, poll_s=0.001)
    assert cluster.requests == [[{"GPU": 1}], []]
    assert all(type(v) is int for bundle in cluster.requests[0] for v in bundle.values())  # Ray 2.52 wants ints


def test_wait_for_gpus_gives_up_after_the_timeout():
    cluster = FakeCluster(joins_after=None)
    assert not wait_for_gpus(0.5, timeout_s=0.05, resources=cluster.resources, request=cluster.request, poll_s=0.01)
    assert cluster.requests == [[{"GPU": 1}], []]
    assert cluster.looks >= 2


def test_wait_for_gpus_asks_nothing_when_a_gpu_is_there():
    cluster = FakeCluster(joins_after=0)
    assert wait_for_gpus(1.0, timeout_s=0.0, resources=cluster.resources, request=cluster.request)
    assert cluster.requests == []


def test_device_options_are_checked():
    with pytest.raises(JobConfigError, match="--device"):
        LabelJobConfig(input="in", output="out", device="tpu")
    with pytest.raises(JobConfigError, match="--device cpu contradicts --gpus-per-actor"):
        LabelJobConfig(input="in", output="out", device="cpu", gpus_per_actor=1)
    with pytest.raises(JobConfigError, match="--gpu-wait-seconds"):
        LabelJobConfig(input="in", output="out", gpu_wait_s=-1)
    assert LabelJobConfig(input="in", output="out").max_actors is None


def test_cli_rejects_an_unknown_device_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "jobs" / "label.py"), "--input", str(tmp_path), "--output",
         str(tmp_path / "out"), "--device", "tpu"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False,
    )
    assert result.returncode == 2
    assert "--device" in result.stderr and len(result.stderr.strip().splitlines()) == 1
