"""Nightly runs: a SIGKILLed run resumes to exactly once; re-runs label only new or changed
images; a second run on a busy OUTPUT refuses."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image, ImageOps
from pipeline_support import (
    REPO_ROOT,
    cli_args,
    job_config,
    manifests,
    read_all_rows,
    segmenter_config,
    shard_files,
    start_local_ray,
)

pytestmark = pytest.mark.slow


def copy_corpus(folder: Path, coco_images, copies: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for copy in range(copies):
        for path in coco_images:
            name = f"{copy}_{path.name}"
            shutil.copy(path, folder / name)
            names.append(name)
    return sorted(names)


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env.pop("RAY_ADDRESS", None)
    with open(log, "wb") as handle:
        # Its own session, so the test can clean up whatever the killed driver leaves behind.
        return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            pytest.fail(f"process ended (rc {process.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:] if log else ''}")


def lock_holder(output: Path) -> dict | None:
    try:
        return json.loads((output / "_LOCK.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def test_sigkill_then_resume_is_exactly_once_and_a_concurrent_run_refuses(coco_images, tiny_clip_config, tmp_path):
    corpus = tmp_path / "images"
    names = copy_corpus(corpus, coco_images, copies=4)
    output = tmp_path / "labels"
    args = cli_args(corpus, output, tiny_clip_config, "--batch-size", "1", "--decode-batch-size", "1", "--rows-per-file", "2")

    # 1. Start, let it commit a shard, SIGKILL the driver mid-run.
    first = spawn(args, tmp_path / "first.log")
    try:
        wait_for(lambda: shard_files(output), 300, "the first shard", first, tmp_path / "first.log")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        # The embedded Ray fate-shares with its driver; give its processes a moment to go.
        time.sleep(3)
    finally:
        kill_group(first)
    assert not manifests(output), "the killed run must not look finished"
    partial = len(read_all_rows(output))
    assert 0 < partial < len(names), f"the run was not killed mid-way ({partial} rows)"
    assert lock_holder(output)["pid"] == first.pid  # a dead holder's lock is left behind

    # 2. Start again: it resumes the same run (attempt 2). While it runs, a third start refuses.
    second = spawn(args, tmp_path / "second.log")
    try:
        wait_for(lambda: (lock_holder(output) or {}).get("pid") == second.pid, 300, "the resumed run's lock",
                 second, tmp_path / "second.log")
        third = subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
        assert second.poll() is None, "the resumed run ended before the concurrent start was tried"
        assert third.returncode == 2, third.stderr[-2000:]
        assert "Traceback" not in third.stderr
        assert "is in use by run" in third.stderr.strip().splitlines()[-1]
        assert second.wait(timeout=400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        kill_group(second)
    log = (tmp_path / "second.log").read_text()
    summary = [line for line in log.splitlines() if "images seen" in line]
    assert len(summary) == 1 and summary[0].startswith("label.py: run "), summary
    assert "labelled" in summary[0] and "skipped" in summary[0] and "images/s" in summary[0]

    # Exactly once: every image one row, one run, finished after two attempts.
    done = manifests(output)
    assert len(done) == 1
    (run_id, manifest), = done.items()
    assert manifest["counts"]["attempts"] == 2
    rows = read_all_rows(output).to_pylist()
    assert sorted(r["image_id"] for r in rows) == names
    assert {r["run_id"] for r in rows} == {run_id}
    assert manifest["counts"]["seen"] == len(names) == sum(s["rows"] for s in manifest["shards"])
    attempts = {Path(s["path"]).name.split("-")[1] for s in manifest["shards"]}
    assert attempts == {"001", "002"}
    assert not (output / "_LOCK.json").exists()


def test_reruns_label_only_new_and_changed_images(coco_images, tiny_clip_config, tmp_path):
    from clipdiy.pipeline.run import run_labelling

    corpus = tmp_path / "images"
    corpus.mkdir()
    for path in coco_images[:5]:
        shutil.copy(path, corpus / path.name)
    output = tmp_path / "labels"
    config = job_config(corpus, output, segmenter_config(tiny_clip_config))
    ray = start_local_ray()
    try:
        first = run_labelling(config)
        assert (first.listed, first.seen, first.skipped) == (5, 5, 0)

        for path in coco_images[5:7]:  # new images arrive
            shutil.copy(path, corpus / path.name)
        second = run_labelling(config)
        assert (second.listed, second.seen, second.skipped) == (7, 2, 5)
        assert sorted(r["image_id"] for r in read_all_rows(output, second.run_id).to_pylist()) == sorted(
            p.name for p in coco_images[5:7]
        )

        changed = corpus / coco_images[0].name  # an image is replaced by a different one
        with Image.open(changed) as image:
            ImageOps.mirror(image).save(changed, quality=90)
        third = run_labelling(config)
        assert (third.listed, third.seen, third.skipped) == (7, 1, 6)
        (row,) = read_all_rows(output, third.run_id).to_pylist()
        assert row["image_id"] == changed.name and row["source_size"] == changed.stat().st_size
    finally:
        ray.shutdown()

    assert len(manifests(output)) == 3
    rows = read_all_rows(output).to_pylist()
    assert len(rows) == 8  # 7 images, one of them in two versions
    latest = {}
    for row in sorted(rows, key=lambda r: r["run_started_at"]):
        latest[row["image_id"]] = row
    assert len(latest) == 7 and latest[changed.name]["run_id"] == third.run_id
