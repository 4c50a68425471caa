"""A real job submission: `ray start --head` on loopback, `ray job submit --working-dir .` of
jobs/label.py, status SUCCEEDED, the output checked, the cluster stopped afterwards.

The head runs as `ray start --head --block` in a session of its own, and teardown ends exactly
that process tree (SIGTERM, then SIGKILL of what is left in the session). `ray stop` is not
used: it stops every Ray on the machine, including other test runs sharing it. Every port is
a free one, the job server listens on 127.0.0.1 only, and token authentication (Ray's default)
uses a token made for this test (RAY_AUTH_TOKEN), not the user's ~/.ray/auth_token.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"
HEAD_PORTS = ("port", "dashboard-port", "ray-client-server-port", "dashboard-agent-listen-port",
              "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port",
              "node-manager-port", "object-manager-port")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RayHead:
    address: str  # the job server, http://127.0.0.1:<dashboard port>
    env: dict[str, str]  # what a client needs: the auth mode and token
    log: Path

    def job_info(self, submission_id: str) -> dict:
        """The job server's record of a job (GET /api/jobs/<id>), e.g. its ``status``."""
        request = urllib.request.Request(f"{self.address}/api/jobs/{submission_id}",
                                         headers={"Authorization": f"Bearer {self.env['RAY_AUTH_TOKEN']}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def ray(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], capture_output=True, text=True, timeout=timeout,
                              env=self.env, cwd=REPO_ROOT, check=False)


def _session_processes(sid: int) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # /proc/<pid>/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid:
            pids.append(int(entry.name))
    return pids


def _stop_head(proc: subprocess.Popen) -> None:
    """End the `ray start --block` process and everything it started (its session)."""
    sid = proc.pid  # start_new_session=True: the head's pid is its session id
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # ray start --block shuts its node down on SIGTERM
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    deadline = time.monotonic() + 5  # stragglers (idle workers) get a moment, then SIGKILL
    while _session_processes(sid) and time.monotonic() < deadline:
        time.sleep(0.5)
    for pid in _session_processes(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_for_job_server(address: str, token: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    request = urllib.request.Request(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    pytest.fail(f"the job server did not answer within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})
    ports = {name: free_port() for name in HEAD_PORTS}
    # Ray's unix sockets live under --temp-dir: keep its path short.
    temp_dir = tempfile.mkdtemp(prefix="rayjs-", dir="/tmp")
    log = tmp_path_factory.mktemp("ray-head") / "ray-start.log"
    command = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
               "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--temp-dir={temp_dir}",
               "--disable-usage-stats", *(f"--{name}={port}" for name, port in ports.items())]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{ports['dashboard-port']}"
        _wait_for_job_server(address, token, proc, log, timeout=240)
        yield RayHead(address=address, env=env, log=log)
    finally:
        _stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_label_job(ray_head, coco_images, tiny_clip_config, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in coco_images[:3]:
        shutil.copy(path, images / path.name)
    output = tmp_path / "labels"
    submission_id = f"clipdiy-test-{uuid.uuid4().hex[:12]}"
    label_args = ["--input", str(images), "--output", str(output), "--vocabulary", "voc",
                  "--clip-model", tiny_clip_config.model, "--clip-checkpoint", tiny_clip_config.checkpoint,
                  "--clip-model-config", tiny_clip_config.model_config, "--saliency", "none",
                  "--batch-size", "2", "--crop-batch-size", "128", "--decode-batch-size", "2",
                  "--rows-per-file", "2", "--decode-concurrency", "1", "--log-every", "2",
                  # The head declares no GPU: on a cluster GPU actors are the default.
                  "--device", "cpu"]

    submitted = ray_head.ray("job", "submit", "--address", ray_head.address, "--submission-id", submission_id,
                             "--working-dir", ".", "--", "python", "jobs/label.py", *label_args, timeout=600)
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, logs[-4000:]
    assert "label.py: run " in logs and "3 images seen, 3 labelled, 0 errors" in logs, logs[-4000:]

    assert ray_head.job_info(submission_id)["status"] == "SUCCEEDED"
    job_logs = ray_head.ray("job", "logs", "--address", ray_head.address, submission_id, timeout=120)
    assert "3 images seen" in job_logs.stdout

    shards = sorted(output.glob("runs/*/part-*.parquet"))
    manifests = sorted(output.glob("runs/*/_MANIFEST.json"))
    assert len(manifests) == 1 and len(shards) == 2
    rows = [row for shard in shards for row in pq.read_table(shard).to_pylist()]
    assert sorted(r["image_id"] for r in rows) == sorted(p.name for p in coco_images[:3])
    assert all(r["status"] == "ok" and r["masks"] for r in rows)


def test_ray_job_submit_without_a_gpu_fails_in_one_line(ray_head, coco_images, tiny_clip_config, tmp_path):
    """Under `ray job submit` (RAY_ADDRESS set) the job asks for GPU actors by default; a cluster
    where no GPU node joins within --gpu-wait-seconds fails the job with one line, not a hang."""
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(coco_images[0], images / coco_images[0].name)
    submission_id = f"clipdiy-test-{uuid.uuid4().hex[:12]}"
    label_args = ["--input", str(images), "--output", str(tmp_path / "labels"), "--vocabulary", "voc",
                  "--clip-model", tiny_clip_config.model, "--clip-checkpoint", tiny_clip_config.checkpoint,
                  "--clip-model-config", tiny_clip_config.model_config, "--saliency", "none",
                  "--gpu-wait-seconds", "2"]
    submitted = ray_head.ray("job", "submit", "--address", ray_head.address, "--submission-id", submission_id,
                             "--working-dir", ".", "--", "python", "jobs/label.py", *label_args, timeout=600)
    logs = submitted.stdout + submitted.stderr
    assert submitted.returncode != 0, logs[-4000:]
    assert ray_head.job_info(submission_id)["status"] == "FAILED"
    # The job's one error line (the CLI shows the job's last logs twice: streamed and on failure).
    errors = sorted({line for line in logs.splitlines() if line.startswith("label.py: error:")})
    assert len(errors) == 1, logs[-4000:]
    assert "no GPU node joined the cluster within 2 s" in errors[0] and "--device cpu" in errors[0]
    assert not list((tmp_path / "labels").glob("runs/*/part-*.parquet"))
