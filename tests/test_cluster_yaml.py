"""ray_cluster.yaml: Ray's own cluster-config preparation and schema validation accept it
(offline), and it describes the cluster the job needs."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "ray_cluster.yaml"


@pytest.fixture
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_accepts_the_cluster_config(config):
    prepared = prepare_config(copy.deepcopy(config))  # what `ray up` does before the cloud calls
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"


def test_ray_validation_would_catch_a_broken_config(config):
    # Guards the test above against validating nothing.
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu_spot"]["resources"]["GPU"] = "one"
    with pytest.raises(Exception, match="integer"):
        validate_config(prepare_config(broken))
    broken = copy.deepcopy(config)
    broken["head_node_type"] = "nope"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(broken))


def test_cpu_head_and_autoscaling_spot_gpu_workers(config):
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert "InstanceMarketOptions" not in head["node_config"]
    gpu = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU")]
    assert gpu, "no GPU worker type"
    for worker in gpu:
        assert worker["min_workers"] < worker["max_workers"] <= config["max_workers"]
        assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"


def test_nodes_install_this_project_with_the_same_ray(config):
    mounts = config["file_mounts"]
    remote = next(r for r, local in mounts.items() if local == ".")
    setup = " ; ".join(config["setup_commands"])
    assert re.search(rf"pip install (-e )?{re.escape(remote)}\b", setup)
    pinned = re.search(r"ray\[[^\]]*\]==([\w.]+)", setup)
    assert pinned and pinned.group(1) == ray.__version__
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in " ".join(config["head_start_ray_commands"])


def test_no_credentials_in_the_file():
    text = CLUSTER_YAML.read_text().lower()
    for word in ("aws_access_key_id", "aws_secret_access_key", "aws_credentials", "secret"):
        assert word not in text


@pytest.mark.slow
def test_declared_resources_match_what_ray_detects_for_the_instance_types(config, monkeypatch, tmp_path):
    """Ray's AWS provider looks the instance types up in EC2 (moto's offline catalogue here):
    they exist, and the CPU/GPU counts declared for the autoscaler are the real ones."""
    from moto import mock_aws
    from ray.autoscaler._private.aws.node_provider import AWSNodeProvider

    for key, value in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_EC2_METADATA_DISABLED": "true", "HOME": str(tmp_path),
                       "AWS_CONFIG_FILE": str(tmp_path / "none"),
                       "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none")}.items():
        monkeypatch.setenv(key, value)
    undeclared = copy.deepcopy(config)
    for node_type in undeclared["available_node_types"].values():
        node_type.pop("resources")
    with mock_aws():
        detected = AWSNodeProvider.fillout_available_node_types_resources(prepare_config(undeclared))
    validate_config(detected)
    for name, node_type in config["available_node_types"].items():
        found = detected["available_node_types"][name]["resources"]
        for resource in ("CPU", "GPU"):
            assert node_type["resources"].get(resource, 0) == found.get(resource, 0), (name, resource)
