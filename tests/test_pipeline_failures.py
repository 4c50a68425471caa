"""Systemic failures stop the job; bad images and lost actors do not.

- every read failing (a manifest of missing objects on S3) ends the job early, exit 1, one line;
- the error budget stops a run (exit 3) and the next start resumes it to exactly once;
- a CUDA error that poisons an actor restarts it, and the images it would have failed are labelled;
- an actor killed mid-run loses no image and labels none twice;
- an image that kills its decode task, its inference actor or its row-building task every time
  costs one ``worker_lost`` row after ``--max-worker-deaths`` deaths of its batch and two on it
  alone, and the run exits 0;
- a batch whose images together do not fit is split before it runs, one that runs out of memory
  anyway is halved down to single images in the same actor, and only an image out of memory on
  its own is a ``too_large`` row.

One local Ray for the module, whose workers run ``fault_injection.install`` (faults armed per
test): a run stopped early gives its CPUs back before it returns, so the next run in the same
2-CPU Ray gets them.
"""

from __future__ import annotations

import pytest
from fault_injection import runtime_env, set_device_memory, set_fault, set_killers
from pipeline_support import (
    cli_args,
    copy_images,
    job_config,
    label_main,
    local_ray,
    manifests,
    read_all_rows,
    segmenter_config,
    shard_files,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fault_spec(tmp_path_factory):
    return tmp_path_factory.mktemp("faults") / "fault.json"


@pytest.fixture(scope="module")
def ray_with_faults(s3_server, fault_spec):
    """A 2-CPU local Ray, started after ``s3_server`` set the dummy credentials (workers inherit them)."""
    with local_ray(runtime_env=runtime_env(fault_spec)) as ray:
        yield ray


def _cpus_all_free(ray) -> bool:
    """Every CPU of the Ray is free: no actor or task of a stopped run still holds one."""
    return ray.available_resources().get("CPU", 0.0) == ray.cluster_resources()["CPU"]


def _exactly_once(output, names, run_id=None):
    ids = read_all_rows(output, run_id).column("image_id").to_pylist()
    assert sorted(ids) == sorted(names), "every image exactly once"


def test_reads_failing_for_every_object_end_the_job_early(ray_with_faults, s3_server, s3_bucket, tiny_clip_config,
                                                         tmp_path, capsys):
    total = 400
    manifest = "".join(f"s3://{s3_bucket}/gone/{i:04d}.jpg\n" for i in range(total))
    s3_server.put_bytes(s3_bucket, "manifest.txt", manifest.encode())
    output = tmp_path / "labels"
    args = cli_args(f"s3://{s3_bucket}/manifest.txt", output, tiny_clip_config,
                    "--endpoint-url", s3_server.endpoint_url, "--stop-after-failed-reads", "40",
                    "--decode-batch-size", "4", "--batch-size", "4", "--rows-per-file", "10")[2:]
    assert label_main(args) == 1
    assert _cpus_all_free(ray_with_faults), "the stopped run's inference actor still holds its CPU"
    message = capsys.readouterr().err.strip().splitlines()[-1]
    # Whichever rule sees it first: 40 failed reads in a row, or most reads finding nothing.
    assert message.startswith(("label.py: error: reading the input failed for the last",
                               "label.py: error: most reads find nothing")), message
    assert "do not exist" in message
    written = read_all_rows(output).num_rows if shard_files(output) else 0
    assert written <= 100, f"{written} of {total} missing objects were written as error rows"
    assert not manifests(output)  # the run is unfinished: the next start resumes it

    # Issue 26 finding 11: a night where most reads find nothing is systemic however it starts;
    # started again, the run stops again (most reads find nothing) and none of the missing
    # objects becomes a not_found answer that later nights would trust.
    assert label_main(args) == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("label.py: error: ") and ("most reads find nothing" in message
                                                        or "reading the input failed for the last" in message)
    if shard_files(output):
        assert "not_found" not in set(read_all_rows(output).column("error_kind").to_pylist())
    assert not manifests(output)


def test_the_error_budget_stops_the_run_and_the_next_start_resumes(ray_with_faults, coco_images, tiny_clip_config,
                                                                   tmp_path, capsys):
    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "corpus"
    good = copy_images(corpus, coco_images, 4)
    bad = [f"a_bad_{i}.jpg" for i in range(8)]  # listed first: the first shards are all errors
    for name in bad:
        (corpus / name).write_text("not an image")
    output = tmp_path / "labels"
    args = cli_args(corpus, output, tiny_clip_config, "--decode-batch-size", "4", "--batch-size", "4",
                    "--rows-per-file", "4", "--error-window", "4", "--max-error-rate", "0.5")[2:]
    assert label_main(args) == 3
    assert _cpus_all_free(ray_with_faults), "the stopped run's inference actor still holds its CPU"
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error budget exceeded" in message and "mostly not_image" in message and "start again" in message
    assert not manifests(output)

    summary = run_labelling(job_config(corpus, output, segmenter_config(tiny_clip_config), rows_per_file=4,
                                       max_error_rate=1.0))
    assert summary.resumed
    _exactly_once(output, good + bad, summary.run_id)
    counts = manifests(output)[summary.run_id]["counts"]
    assert (counts["seen"], counts["ok"], counts["error"]) == (12, 4, 8)


def test_a_poisoned_actor_is_restarted_and_its_images_labelled(ray_with_faults, fault_spec, coco_images,
                                                              tiny_clip_config, tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    names = copy_images(tmp_path / "corpus", coco_images, 8)
    marker = tmp_path / "poisoned"
    set_fault(fault_spec, "cuda", names[1], marker)
    summary = run_labelling(job_config(tmp_path / "corpus", tmp_path / "labels", segmenter_config(tiny_clip_config)))
    assert marker.exists(), "the fault was injected"
    assert (summary.seen, summary.ok, summary.error) == (8, 8, 0)
    _exactly_once(tmp_path / "labels", names)


def test_an_actor_killed_mid_run_loses_no_image(ray_with_faults, fault_spec, coco_images, tiny_clip_config, tmp_path):
    from clipdiy.pipeline.control.run import run_labelling

    names = copy_images(tmp_path / "corpus", coco_images, 8)
    marker = tmp_path / "killed"
    set_fault(fault_spec, "kill", names[5], marker)
    summary = run_labelling(job_config(tmp_path / "corpus", tmp_path / "labels", segmenter_config(tiny_clip_config),
                                       rows_per_file=2))
    assert marker.exists(), "the actor was killed"
    assert (summary.seen, summary.ok, summary.error) == (8, 8, 0)
    _exactly_once(tmp_path / "labels", names)


def test_an_image_that_kills_its_process_costs_one_worker_lost_row(ray_with_faults, fault_spec, coco_images,
                                                                  tiny_clip_config, tmp_path):
    corpus = tmp_path / "corpus"
    names = copy_images(corpus, coco_images, 8)
    killed_in_decode, killed_in_inference, killed_in_rows = names[2], names[5], names[7]
    set_killers(fault_spec, decode=killed_in_decode, inference=killed_in_inference, rows=killed_in_rows)
    output = tmp_path / "labels"
    args = cli_args(corpus, output, tiny_clip_config, "--decode-batch-size", "4", "--batch-size", "4",
                    "--rows-per-file", "4", "--max-worker-deaths", "1")[2:]
    try:
        assert label_main(args) == 0
    finally:
        fault_spec.write_text("{}")  # disarmed for the module's later tests
    rows = {r["image_id"]: r for r in read_all_rows(output).to_pylist()}
    _exactly_once(output, names)
    killed = (killed_in_decode, killed_in_inference, killed_in_rows)
    for name in killed:
        assert (rows[name]["status"], rows[name]["error_kind"]) == ("error", "worker_lost"), rows[name]["error"]
        # One death on the whole batch (--max-worker-deaths 1), two on the image alone.
        assert "died 2 times working on this image alone" in rows[name]["error"], rows[name]["error"]
    assert all(rows[n]["status"] == "ok" for n in names if n not in killed)
    (run,) = manifests(output).values()
    assert (run["counts"]["ok"], run["counts"]["error"]) == (5, 3)


def test_a_batch_that_does_not_fit_falls_back_to_its_images(ray_with_faults, fault_spec, coco_images,
                                                            tiny_clip_config, tmp_path):
    import json

    from PIL import Image

    from clipdiy.pipeline.control.run import run_labelling

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    # An estimate of 100,000 bytes a pixel (as a large photo's, in whole GB): 1.92 GB for a
    # 160 x 120 photo, 4.32 GB for the 240 x 180 one.
    sizes = {"big.png": (240, 180), **{f"s{i}.png": (160, 120) for i in range(6)}}
    for (name, size), source in zip(sorted(sizes.items()), coco_images):
        with Image.open(source) as photo:
            photo.convert("RGB").resize(size).save(corpus / name)
    bound = 5 * 10**9  # two small photos fit, not three; the big one alone fits
    log = tmp_path / "device.jsonl"
    # One small photo fits the device, not two, nor the big one.
    set_device_memory(fault_spec, capacity=3 * 10**9, log=log, bytes_per_pixel=100_000)
    try:
        summary = run_labelling(job_config(corpus, tmp_path / "labels", segmenter_config(tiny_clip_config),
                                           max_image_memory_gb=bound / 1024**3))
    finally:
        fault_spec.write_text("{}")
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    # Split before it runs: no call ever held images whose estimates exceed the bound together.
    assert all(c["images"] == 1 or c["bytes"] <= bound for c in calls), calls
    assert any(c["raised"] and c["images"] == 2 for c in calls), "a pair ran out of memory and was halved"
    rows = {r["image_id"]: r for r in read_all_rows(tmp_path / "labels").to_pylist()}
    _exactly_once(tmp_path / "labels", sorted(sizes))
    assert (rows["big.png"]["status"], rows["big.png"]["error_kind"]) == ("error", "too_large")
    assert "ran out of memory on its own" in rows["big.png"]["error"]
    assert all(rows[n]["status"] == "ok" for n in sizes if n != "big.png")
    assert (summary.ok, summary.error) == (6, 1)
