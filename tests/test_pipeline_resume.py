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
    copy_images,
    job_config,
    manifests,
    read_all_rows,
    segmenter_config,
    shard_files,
    start_local_ray,
)


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


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


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


@pytest.mark.slow
def test_sigkill_then_resume_is_exactly_once_and_a_concurrent_run_refuses(coco_images, tiny_clip_config, tmp_path):
    from clipdiy.pipeline.control.lock import OutputLockedError
    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "images"
    names = copy_corpus(corpus, coco_images, copies=1)
    output = tmp_path / "labels"
    args = cli_args(corpus, output, tiny_clip_config, "--batch-size", "1", "--decode-batch-size", "1", "--rows-per-file", "2")

    # 1. Start, let it commit a shard, SIGKILL the driver mid-run.
    first = spawn(args, tmp_path / "first.log")
    try:
        wait_for(lambda: shard_files(output), 300, "the first shard", first, tmp_path / "first.log")
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
        # The embedded Ray fate-shares with its driver: wait until its processes are gone (what
        # lingers past the bound is killed below).
        deadline = time.monotonic() + 10
        while group_alive(first.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        kill_group(first)
    assert not manifests(output), "the killed run must not look finished"
    partial = len(read_all_rows(output))
    assert 0 < partial < len(names), f"the run was not killed mid-way ({partial} rows)"
    assert lock_holder(output)["pid"] == first.pid  # a dead holder's lock is left behind

    # 2. Start again: it resumes the same run (attempt 2). While it runs, another start refuses.
    second = spawn(args, tmp_path / "second.log")
    try:
        wait_for(lambda: (lock_holder(output) or {}).get("pid") == second.pid, 300, "the resumed run's lock",
                 second, tmp_path / "second.log")
        config = job_config(corpus, output, segmenter_config(tiny_clip_config))
        started = time.monotonic()
        with pytest.raises(OutputLockedError, match="is in use by run"):
            run_labelling(config)
        assert time.monotonic() - started < 30
        assert second.poll() is None, "the resumed run ended before the concurrent start was tried"
        assert second.wait(timeout=600) == 0, (tmp_path / "second.log").read_text()[-3000:]
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


@pytest.mark.slow
def test_reruns_label_only_new_and_changed_images(coco_images, tiny_clip_config, tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "images"
    copy_images(corpus, coco_images, 5)
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


def test_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.control.lock import OutputLock, OutputLockedError

    layout = OutputLayout.open(str(tmp_path / "labels"))
    layout.ensure_dir(layout.root)
    holder = OutputLock(layout, "run-a", stale_after_s=60, heartbeat_s=0.2)
    holder.acquire()
    try:
        with pytest.raises(OutputLockedError, match="in use by run run-a"):
            OutputLock(layout, "run-b", stale_after_s=60, heartbeat_s=0.2).acquire()
        first_beat = lock_holder(Path(layout.root))["heartbeat_at"]
        wait_for(lambda: lock_holder(Path(layout.root))["heartbeat_at"] > first_beat, 5, "a lock heartbeat")
    finally:
        holder.release()
    assert lock_holder(Path(layout.root)) is None

    dead = subprocess.Popen(["true"])
    dead.wait()
    (Path(layout.root) / "_LOCK.json").write_text(json.dumps(
        {"run_id": "killed", "host": os.uname().nodename, "pid": dead.pid, "token": "x",
         "acquired_at": time.time(), "heartbeat_at": time.time()}
    ))
    taker = OutputLock(layout, "run-c", stale_after_s=60, heartbeat_s=0.2, takeover_grace_s=0)
    taker.acquire()
    assert lock_holder(Path(layout.root))["run_id"] == "run-c"
    taker.release()

    # A lock whose heartbeat stopped long ago (a driver on another host) is stale too.
    (Path(layout.root) / "_LOCK.json").write_text(json.dumps(
        {"run_id": "gone", "host": "elsewhere", "pid": 1, "token": "y",
         "acquired_at": time.time() - 999, "heartbeat_at": time.time() - 999}
    ))
    with OutputLock(layout, "run-d", stale_after_s=60, heartbeat_s=0.2, takeover_grace_s=0):
        assert lock_holder(Path(layout.root))["run_id"] == "run-d"


def test_two_runs_racing_for_a_free_object_store_output_cannot_both_win(s3_server, s3_bucket):
    """S3: the lock is created with a conditional write, so the run that loses the race refuses
    even when it saw no lock a moment before (no pause needed to notice)."""
    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.control.lock import OutputLock, OutputLockedError

    layout = OutputLayout.open(f"s3://{s3_bucket}/labels", s3_server.options)
    winner = OutputLock(layout, "run-a", stale_after_s=60, heartbeat_s=1, settle_s=0)
    loser = OutputLock(layout, "run-b", stale_after_s=60, heartbeat_s=1, settle_s=0)
    looked = []
    real_read = loser.store.read

    def read_after_the_race():  # the loser looked before the winner wrote
        looked.append(True)
        return None if len(looked) == 1 else real_read()

    loser.store.read = read_after_the_race
    winner.acquire()
    try:
        with pytest.raises(OutputLockedError, match="in use by run run-a.*took the lock first"):
            loser.acquire()
        assert looked
        assert layout.read_json(layout.lock_path())["token"] == winner.info.token
    finally:
        winner.release()
    assert layout.read_json(layout.lock_path()) is None
    with OutputLock(layout, "run-c", stale_after_s=60, heartbeat_s=1, settle_s=0):
        assert layout.read_json(layout.lock_path())["run_id"] == "run-c"


def test_listing_blocks_cut_the_first_limit_sources_in_listing_order():
    """(The anti-join and retry rules are tested on the Ray Data planning in test_planning.py.)"""
    import datetime as dt

    from clipdiy.pipeline.planning.incremental import LISTING_SCHEMA, listing_blocks
    from clipdiy.pipeline.sources.objects import SourceObject

    when = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)
    sources = [SourceObject(f"file:///in/{i}.jpg", f"{i}.jpg", 100 + i, None, when) for i in range(10)]
    blocks = list(listing_blocks(iter(sources), block_rows=3, limit=8))
    assert [block.num_rows for block in blocks] == [3, 3, 2]
    assert [i for block in blocks for i in block.column("image_id").to_pylist()] == [f"{i}.jpg" for i in range(8)]
    assert all(block.schema.equals(LISTING_SCHEMA) for block in blocks)
    assert blocks[0].column("source_mtime")[0].as_py() == when


def test_run_planning_resumes_the_unfinished_run_and_refuses_conflicts(tmp_path):
    from clipdiy.output_layout import OutputLayout
    from clipdiy.pipeline.planning.manifest import RunConflictError, plan_run, write_run_state

    layout = OutputLayout.open(str(tmp_path / "labels"))
    fingerprint = {"input": "in/", "model": {"clip_weights": "sha256:1"}}
    first = plan_run(layout, None, fingerprint)
    assert (first.attempt, first.resumed) == (1, False)
    write_run_state(layout, first, fingerprint, {"limit": None})

    again = plan_run(layout, None, fingerprint)  # killed before its manifest: resume it
    assert (again.run_id, again.attempt, again.resumed, again.started_at) == (first.run_id, 2, True, first.started_at)
    with pytest.raises(RunConflictError, match=r"different model\.clip_weights;"):
        plan_run(layout, None, {"input": "in/", "model": {"clip_weights": "sha256:2"}})
    # An option added since the run started, left unset, is no difference (resume after an upgrade).
    upgraded = {"input": "in/", "model": {"clip_weights": "sha256:1", "saliency_max_side": None}}
    assert plan_run(layout, None, upgraded).run_id == first.run_id
    with pytest.raises(RunConflictError, match=r"different input, model\.saliency_max_side;"):
        plan_run(layout, None, {"input": "other/", "model": {"clip_weights": "sha256:1", "saliency_max_side": 1024}})
    with pytest.raises(RunConflictError, match=f"unfinished run {first.run_id}"):
        plan_run(layout, "another-run", fingerprint)

    (Path(layout.run_dir(first.run_id)) / "_MANIFEST.json").write_text("{}")
    with pytest.raises(RunConflictError, match="already finished"):
        plan_run(layout, first.run_id, fingerprint)
    fresh = plan_run(layout, None, fingerprint)
    assert fresh.run_id != first.run_id and fresh.attempt == 1


@pytest.mark.slow
def test_later_runs_do_not_read_a_missing_object_again_and_retry_all_errors_on_request(coco_images, tiny_clip_config,
                                                                                       tmp_path):
    """A manifest entry whose object does not exist gets a not_found row, and later runs do not
    read it again (a text manifest knows no version: only retry_errors="all" does); an image over
    --max-pixels (too_large) is labelled again only with retry_errors="all"."""
    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "images"
    corpus.mkdir()
    with Image.open(coco_images[0]) as image:
        image.convert("RGB").resize((160, 120)).save(corpus / "small.jpg", quality=95)
        late_image = image.convert("RGB").resize((120, 160))
    shutil.copy(coco_images[1], corpus / "big.jpg")  # 640 x 4xx: over the 100k-pixel guard below
    manifest = corpus / "manifest.txt"
    manifest.write_text("small.jpg\nbig.jpg\nlate.jpg\n")
    output = tmp_path / "labels"

    def run(**overrides):
        return run_labelling(job_config(manifest, output, segmenter_config(tiny_clip_config), **overrides))

    def latest_rows() -> dict[str, dict]:
        latest = {}
        for row in sorted(read_all_rows(output).to_pylist(), key=lambda r: r["run_started_at"]):
            latest[row["image_id"]] = row
        return latest

    ray = start_local_ray()
    try:
        first = run(max_pixels=100_000)
        assert (first.listed, first.seen, first.ok) == (3, 3, 1)
        kinds = {i: r["error_kind"] for i, r in latest_rows().items()}
        assert kinds == {"small.jpg": None, "big.jpg": "too_large", "late.jpg": "not_found"}
        late_row = latest_rows()["late.jpg"]  # the row names its object by uri; the error says what failed
        assert late_row["uri"].endswith("late.jpg") and "FileNotFoundError" in late_row["error"]

        late_image.save(corpus / "late.jpg", quality=95)  # the object arrives after all
        second = run(max_pixels=100_000)  # default (transient): a missing object is an answer
        assert (second.listed, second.skipped, second.seen) == (3, 3, 0)

        assert run(max_pixels=1_000_000, retry_errors="none").seen == 0  # too_large stays an error
        fourth = run(max_pixels=1_000_000, retry_errors="all")  # after raising the guard
        assert (fourth.seen, fourth.ok) == (2, 2)
        assert manifests(output)[fourth.run_id]["counts"]["retried"] == 2
        assert run(max_pixels=1_000_000).seen == 0  # nothing left to do
    finally:
        ray.shutdown()
    latest = latest_rows()
    assert {i: r["status"] for i, r in latest.items()} == {"small.jpg": "ok", "big.jpg": "ok", "late.jpg": "ok"}
    assert len(read_all_rows(output)) == 5  # 3 first rows, then big.jpg and late.jpg once more


@pytest.mark.slow
def test_an_object_overwritten_between_two_attempts_is_labelled_once_in_the_run(coco_images, tiny_clip_config, tmp_path):
    """Issue 11 item 5: this run's earlier attempts count by image id alone, so a resumed run
    never holds two rows for one image; earlier finished runs still count by source version."""
    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "images"
    copy_images(corpus, coco_images, 3)
    output = tmp_path / "labels"
    config = job_config(corpus, output, segmenter_config(tiny_clip_config))
    ray = start_local_ray()
    try:
        first = run_labelling(config)
        # The driver died after the last shard, before the manifest: the run is unfinished.
        (output / "runs" / first.run_id / "_MANIFEST.json").unlink()
        overwritten = corpus / coco_images[0].name
        with Image.open(overwritten) as image:
            ImageOps.mirror(image).save(overwritten, quality=90)
        (corpus / coco_images[3].name).write_bytes(coco_images[3].read_bytes())  # and a new image arrives
        resumed = run_labelling(config)
        assert (resumed.run_id, resumed.attempt) == (first.run_id, 2)
        assert (resumed.listed, resumed.seen, resumed.skipped) == (4, 1, 3)
        rows = read_all_rows(output).to_pylist()
        assert sorted(r["image_id"] for r in rows) == sorted(p.name for p in coco_images[:4])

        # A later run still labels the overwritten object again (a new version for a new run).
        later = run_labelling(config)
        assert (later.listed, later.seen) == (4, 1)
        (row,) = read_all_rows(output, later.run_id).to_pylist()
        assert row["image_id"] == overwritten.name and row["source_size"] == overwritten.stat().st_size
    finally:
        ray.shutdown()
