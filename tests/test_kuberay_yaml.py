"""kuberay_cronjob.yaml: a KubeRay RayCronJob (ray.io/v1) whose fields are the ones KubeRay's
types define, running the documented nightly entrypoint (docs/operations/cluster.md) on the cluster shape of ray_cluster.yaml."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MANIFEST = REPO_ROOT / "kuberay_cronjob.yaml"

# Field names from KubeRay's Go types (ray-operator/apis/ray/v1: RayCronJobSpec, RayJobSpec,
# RayClusterSpec, HeadGroupSpec, WorkerGroupSpec), as of KubeRay 1.6/1.7.
CRONJOB_SPEC = {"schedule", "jobTemplate", "suspend", "timeZone"}
RAYJOB_SPEC = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
               "clusterSelector", "submitterConfig", "managedBy", "deletionPolicy", "entrypoint", "runtimeEnvYAML",
               "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
               "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend"}
CLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec", "workerGroupSpecs",
                "headServiceAnnotations", "suspend", "managedBy", "gcsFaultToleranceOptions", "authOptions"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template", "numOfHosts",
                "scaleStrategy", "suspend", "idleTimeoutSeconds"}


@pytest.fixture
def manifest() -> dict:
    documents = list(yaml.safe_load_all(MANIFEST.read_text()))
    assert len(documents) == 1
    return documents[0]


def _gpus(group: dict) -> int:
    container = group["template"]["spec"]["containers"][0]
    return int(container["resources"].get("limits", {}).get("nvidia.com/gpu", 0))


def test_kind_and_fields_are_kuberays(manifest):
    assert manifest["apiVersion"] == "ray.io/v1" and manifest["kind"] == "RayCronJob"
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", manifest["metadata"]["name"])
    spec = manifest["spec"]
    assert set(spec) <= CRONJOB_SPEC and {"schedule", "jobTemplate"} <= set(spec)
    assert len(spec["schedule"].split()) == 5
    job = spec["jobTemplate"]
    assert set(job) <= RAYJOB_SPEC
    cluster = job["rayClusterSpec"]
    assert set(cluster) <= CLUSTER_SPEC
    assert set(cluster["headGroupSpec"]) <= HEAD_GROUP
    for group in cluster["workerGroupSpecs"]:
        assert set(group) <= WORKER_GROUP
    assert cluster["enableInTreeAutoscaling"] is True


def test_same_entrypoint_as_the_documented_cron_line(manifest):
    page = (REPO_ROOT / "docs" / "operations" / "cluster.md").read_text()
    cron = next(line for line in page.splitlines() if line.startswith("0 2 * * *") and "jobs/label.py" in line)
    cron_command = shlex.split(cron.split(" -- ", 1)[1])
    command = shlex.split(manifest["spec"]["jobTemplate"]["entrypoint"])
    assert command[:len(cron_command)] == cron_command
    # The only addition: the pool's bound, which KubeRay's autoscaler does not report to Ray.
    assert command[len(cron_command):] == ["--max-actors", "8"]


def test_cluster_shape_matches_ray_cluster_yaml(manifest):
    cluster_file = yaml.safe_load((REPO_ROOT / "ray_cluster.yaml").read_text())
    gpu_type = cluster_file["available_node_types"]["gpu_spot"]
    cluster = manifest["spec"]["jobTemplate"]["rayClusterSpec"]
    assert _gpus(cluster["headGroupSpec"]) == 0
    (gpu_group,) = [g for g in cluster["workerGroupSpecs"] if _gpus(g) > 0]
    assert gpu_group["minReplicas"] == gpu_type["min_workers"] == 0
    assert gpu_group["maxReplicas"] == gpu_type["max_workers"]
    assert _gpus(gpu_group) == gpu_type["resources"]["GPU"]
    command = shlex.split(manifest["spec"]["jobTemplate"]["entrypoint"])
    assert int(command[command.index("--max-actors") + 1]) == gpu_group["maxReplicas"] * _gpus(gpu_group)
    # The head image's Ray is the one the cluster file installs.
    pinned = re.search(r"ray\[[^\]]*\]==([\w.]+)", " ".join(cluster_file["setup_commands"])).group(1)
    assert cluster["rayVersion"] == pinned


def test_no_credentials_in_the_manifest():
    text = MANIFEST.read_text().lower()
    for word in ("aws_access_key_id", "aws_secret_access_key", "secretkeyref", "password"):
        assert word not in text
