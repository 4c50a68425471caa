"""``jobs/label.py`` refuses bad requests in one line, with a non-zero exit, before any work."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from pipeline_support import LABEL_SCRIPT, REPO_ROOT, cli_args

OPTIONS = [
    "--input", "--output", "--limit", "--run-id", "--endpoint-url", "--anon", "--profile", "--vocabulary",
    "--clip-model", "--clip-pretrained", "--clip-checkpoint", "--clip-model-config", "--saliency",
    "--dino-model", "--dino-checkpoint", "--found-head", "--mode", "--prompt-ensemble", "--article",
    "--batch-size", "--crop-batch-size", "--gpus-per-actor", "--min-actors", "--max-actors",
    "--decode-concurrency", "--rows-per-file", "--address", "--saliency-max-side", "--retry-errors",
]


def run_cli(args: list[str], timeout: float = 180, **extra_env: str) -> tuple[subprocess.CompletedProcess, float]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", **extra_env)
    env.pop("RAY_ADDRESS", None)
    started = time.monotonic()
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT, check=False)
    return result, time.monotonic() - started


def assert_refused(result: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, no Ray started, and exactly one error line naming the problem."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Ray instance" not in result.stderr, "Ray was started before the refusal"
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-2000:]
    assert result.stderr.rstrip().splitlines()[-1] == errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


@pytest.fixture()
def one_image(tmp_path, coco_images):
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(coco_images[0], folder / "one.jpg")
    return folder


def test_help_explains_every_option():
    result, seconds = run_cli([sys.executable, str(LABEL_SCRIPT), "--help"])
    assert result.returncode == 0
    for option in OPTIONS:
        assert option in result.stdout, option
    assert "ray job submit" not in result.stderr
    assert seconds < 30


def test_bad_option_and_bad_value(tmp_path):
    result, _ = run_cli([sys.executable, str(LABEL_SCRIPT), "--input", "x", "--output", "y", "--no-such-flag"])
    assert_refused(result, "--no-such-flag")
    result, _ = run_cli([sys.executable, str(LABEL_SCRIPT), "--input", "x", "--output", "y", "--batch-size", "0"])
    assert_refused(result, "--batch-size")
    result, _ = run_cli([sys.executable, str(LABEL_SCRIPT), "--input", "x", "--output", "y", "--mode", "sideways"])
    assert_refused(result, "--mode")
    result, _ = run_cli([sys.executable, str(LABEL_SCRIPT), "--input", "x", "--output", "y", "--saliency-max-side", "8"])
    assert_refused(result, "--saliency-max-side")
    result, _ = run_cli([sys.executable, str(LABEL_SCRIPT), "--output", "y"])
    assert_refused(result, "--input")


def test_empty_and_unreachable_input(tmp_path, tiny_clip_config):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    result, _ = run_cli(cli_args(empty, tmp_path / "out", tiny_clip_config))
    assert_refused(result, "no images")

    result, _ = run_cli(cli_args(tmp_path / "does-not-exist", tmp_path / "out", tiny_clip_config))
    assert_refused(result, "does not exist")

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    unreachable_args = cli_args("s3://bucket/photos/", tmp_path / "out", tiny_clip_config,
                             "--endpoint-url", f"http://127.0.0.1:{port}")
    # Credentials are present (fake): the store itself does not answer.
    result, seconds = run_cli(unreachable_args, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test")
    assert_refused(result, "s3://bucket/photos/", "unreachable")
    assert seconds < 120


def test_missing_weights(tmp_path, one_image, tiny_clip_config):
    args = cli_args(one_image, tmp_path / "out", tiny_clip_config)
    missing = args[: args.index("--clip-checkpoint") + 1] + [str(tmp_path / "nope.pt")] + args[args.index("--clip-checkpoint") + 2 :]
    result, _ = run_cli(missing)
    assert_refused(result, "nope.pt")

    result, _ = run_cli(args + ["--saliency", "found", "--dino-checkpoint", str(tmp_path / "no-dino.pt"),
                                "--found-head", str(tmp_path / "no-head.pt")])
    assert_refused(result)
    assert not list((tmp_path / "out").glob("runs/*/part-*.parquet"))
