"""Faults of the output side, injected through the real job (issue 26, section 2).

- OUTPUT's file system fills up mid-run (a small tmpfs, filled when a decode task reaches a
  given image), or turns read-only mid-run (the tmpfs remounted ``ro``): the job stops with exit
  1 and a last line that names the cause and where (``[Errno 28] No space left on device`` and
  the OUTPUT path), with no terminal colour codes and no Ray wrapper as the message; nothing a
  reader would take as finished is left (no run manifest); with the space back, the next start
  resumes and every image has exactly one row;
- (write tasks killed at generated points are in ``test_job_invariants.py``, with the invariants.)

One local Ray for the module, whose workers run ``fault_injection.install``. The tmpfs needs root
(``mount -t tmpfs``); where it cannot be mounted the two file-system tests are skipped, saying so.
"""

from __future__ import annotations

import re
import subprocess

import pytest
from fault_injection import fill_file_system, runtime_env, set_output_fault
from pipeline_support import (
    cli_args,
    copy_images,
    label_main,
    local_ray,
    manifests,
    read_all_rows,
)

pytestmark = pytest.mark.slow

IMAGES = 8
JOB_OPTIONS = ("--decode-batch-size", "2", "--batch-size", "2", "--rows-per-file", "2", "--stop-after-failed-reads", "1000")


@pytest.fixture(scope="module")
def fault_spec(tmp_path_factory):
    return tmp_path_factory.mktemp("output-faults") / "fault.json"


@pytest.fixture(scope="module")
def ray_with_faults(fault_spec):
    with local_ray(runtime_env=runtime_env(fault_spec)) as ray:
        yield ray


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, coco_images):
    folder = tmp_path_factory.mktemp("corpus") / "photos"
    return folder, copy_images(folder, coco_images, IMAGES)


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 4 MiB tmpfs (OUTPUT's file system), unmounted after the test; skips without root."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip() or mounted.returncode}): needs root")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def _last_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    return lines[-1] if lines else ""


def _stops_loudly(status: int, line: str, cause: str, output) -> None:
    assert status == 1, line
    assert line.startswith("label.py: error: "), line
    assert cause in line, f"the cause is not in the last line: {line}"
    assert str(output) in line, f"the last line does not say where: {line}"
    assert "\x1b" not in line and not re.search(r"\[\d+m", line), f"terminal colour codes: {line!r}"
    assert "RayTaskError" not in line and "ray::" not in line and "MapBatches" not in line, line


def _exactly_once(output, names) -> None:
    ids = read_all_rows(output).column("image_id").to_pylist()
    assert sorted(ids) == sorted(names), "every image exactly once"
    (manifest,) = manifests(output).values()
    assert manifest["counts"]["seen"] == len(names)


@pytest.mark.parametrize("fault", ["fill", "readonly"])
def test_output_filling_up_or_turning_read_only_stops_loudly_and_the_next_start_resumes(
        fault, ray_with_faults, fault_spec, corpus, small_tmpfs, tiny_clip_config, tmp_path, capsys):
    folder, names = corpus
    output = small_tmpfs / "labels"
    set_output_fault(fault_spec, fault, names[IMAGES // 2], small_tmpfs, tmp_path / "fired")
    args = cli_args(folder, output, tiny_clip_config, *JOB_OPTIONS)[2:]
    status = label_main(args)
    assert (tmp_path / "fired").exists(), "the fault was injected"
    cause = "[Errno 28] No space left on device" if fault == "fill" else "[Errno 30] Read-only file system"
    _stops_loudly(status, _last_line(capsys), cause, output)
    assert not manifests(output), "a stopped run left a run manifest: readers would take it as finished"

    # The space comes back (the operator frees it, remounts read-write): the next start resumes.
    fault_spec.write_text("{}")
    if fault == "fill":
        for filler in small_tmpfs.glob("filler*.bin"):
            filler.unlink()
    else:
        subprocess.run(["mount", "-o", "remount,rw", str(small_tmpfs)], check=True)
    assert label_main(args) == 0, capsys.readouterr().err[-3000:]
    _exactly_once(output, names)


def test_fill_file_system_fills_it(small_tmpfs):
    fill_file_system(str(small_tmpfs))
    with pytest.raises(OSError, match="No space left"):
        (small_tmpfs / "one-more").write_bytes(b"\0" * 8192)
