"""The benchmark-only free model (benchmarks/free_method.py) and the GPU check's CPU-side paths.

The free model measures the job's host side with the model taken out; it must never be reachable
from the command line. The GPU check refuses in one line without CUDA; its NACLIP part runs as a
CPU smoke run (``--device cpu --dry``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from pipeline_support import LABEL_SCRIPT, REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"


def _run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT, check=False)


@pytest.fixture()
def free_methods():
    """The free methods registered in this process for one test, and removed afterwards."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import free_method

        free_method.register()
        yield free_method
    finally:
        from clipdiy.segmentation import methods

        for entry in free_method.ENTRIES:
            methods._METHODS.pop(entry.name, None)
        sys.path.remove(str(BENCHMARKS))


def _expected_labels(height: int, width: int, classes: int) -> np.ndarray:
    """The free model's documented pattern, pixel by pixel: background; an ellipse of class 1
    (centre at 45% of the height and 35% of the width, radii 30% and 20%); a box of class C // 2
    (rows 20-60%, columns 60-90%); a band of class C - 1 over the bottom 15%."""
    out = np.zeros((height, width), np.int64)
    for y in range(height):
        for x in range(width):
            v, u = y / height, x / width
            if v >= 0.85:
                out[y, x] = classes - 1
            elif 0.2 <= v < 0.6 and 0.6 <= u < 0.9:
                out[y, x] = classes // 2
            elif ((v - 0.45) / 0.3) ** 2 + ((u - 0.35) / 0.2) ** 2 <= 1.0:
                out[y, x] = 1
    return out


def test_free_model_gives_its_fixed_labels_at_each_methods_output_size(free_methods, tiny_clip_config):
    from clipdiy.segmentation.config import SaliencyConfig, SegmenterConfig
    from clipdiy.segmentation.segmenter import create_segmenter

    rng = np.random.default_rng(0)
    photos = [rng.integers(0, 256, size=(40, 30, 3), dtype=np.uint8), rng.integers(0, 256, size=(24, 56, 3), dtype=np.uint8)]
    for method in (free_methods.FREE_NACLIP, free_methods.FREE_CLIPDIY):
        config = SegmenterConfig(method=method, vocabulary="voc", clip=tiny_clip_config,
                                 saliency=SaliencyConfig(backend="none"), device="cpu")
        results = create_segmenter(config).segment(photos)
        for photo, result in zip(photos, results):
            height, width = photo.shape[:2]
            if method == free_methods.FREE_NACLIP:  # labels decided at the original size
                expected = _expected_labels(height, width, 21)
            else:  # at 256 x 256, then nearest back to the original size (as torch's nearest)
                rows = np.minimum(np.floor(np.arange(height) * np.float32(256 / height)).astype(int), 255)
                cols = np.minimum(np.floor(np.arange(width) * np.float32(256 / width)).astype(int), 255)
                expected = _expected_labels(256, 256, 21)[rows[:, None], cols[None, :]]
            np.testing.assert_array_equal(result.label_map, expected)
            assert [m.class_id for m in result.masks()] == np.unique(expected).tolist()


def test_free_model_is_never_reachable_from_the_cli(free_methods):
    result = _run([sys.executable, str(LABEL_SCRIPT), "--input", "in", "--output", "out", "--method", free_methods.FREE_NACLIP])
    assert result.returncode == 2, result.stderr[-2000:]
    assert "invalid choice" in result.stderr and free_methods.FREE_NACLIP in result.stderr
    # The CLI's process (its module and the job it runs) knows only the built-in methods.
    probe = (f"import runpy, sys\nsys.argv = ['label.py', '--help']\n"
             f"try:\n    runpy.run_path({str(LABEL_SCRIPT)!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "import clipdiy.pipeline.control.run\nfrom clipdiy.segmentation.methods import available_methods\nprint(available_methods())")
    listed = _run([sys.executable, "-c", probe])
    assert listed.returncode == 0, listed.stderr[-2000:]
    assert listed.stdout.strip().splitlines()[-1] == "('clipdiy', 'naclip', 'trident')"  # the built-in three
    for folder in ("clipdiy", "jobs"):
        for path in (REPO_ROOT / folder).rglob("*.py"):
            assert "free_method" not in path.read_text(), path


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_check_refuses_in_one_line_without_cuda():
    for command in (["bash", str(BENCHMARKS / "gpu_check.sh")],
                    [sys.executable, str(BENCHMARKS / "gpu_naclip_check.py")],
                    [sys.executable, str(BENCHMARKS / "gpu_job_check.py"), "--free", "naclip"]):
        result = _run(command)
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert result.stdout == "", command
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and "error: no CUDA device" in lines[0], (command, result.stderr[-2000:])


@pytest.mark.slow
def test_gpu_naclip_check_smoke_run_on_cpu():
    """Every setting of the GPU check's NACLIP part runs and reports its figures (CPU, tiny CLIP)."""
    result = _run([sys.executable, str(BENCHMARKS / "gpu_naclip_check.py"), "--device", "cpu", "--dry"])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("naclip ")]
    assert [line.split()[1] for line in lines] == ["whole", "whole+pamr", "slide", "slide+pamr"]
    for line in lines:
        assert "images per forward" in line and "outside the forwards" in line and "GPU memory peak" in line
    # 4 photos of 3 sizes (two share one) in one batch: NACLIP's forwards see 4 images in all.
    assert "4 photos, 3 distinct sizes" in result.stdout
