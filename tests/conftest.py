"""Fixtures shared by the whole suite: the repository's test data and checkpoints of random-init models."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests import helper modules (model_factories, reference_clipdiy, ...) from this folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_paths import COCO_SAMPLE, FOUND_HEAD, REPO_ROOT  # noqa: E402

# Nothing in the suite may reach a model hub: make any attempt fail at once.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Property tests (Hypothesis): seeded and bounded, so a CI run is repeatable and its time known.
# A test that drives Ray or a whole job sets a smaller max_examples with @settings of its own.
from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "clipdiy",
    derandomize=True,
    deadline=None,
    max_examples=60,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "clipdiy"))


@pytest.fixture(scope="session")
def coco_sample() -> Path:
    """The 32 real COCO val2017 photos and their instances.json."""
    if not COCO_SAMPLE.is_dir():
        pytest.fail(f"the repository's test data is missing at {COCO_SAMPLE}")
    return COCO_SAMPLE


@pytest.fixture(scope="session")
def coco_images(coco_sample: Path) -> list[Path]:
    return sorted((coco_sample / "images").glob("*.jpg"))


@pytest.fixture(scope="session")
def vitb32_clip_config(tmp_path_factory):
    """ClipConfig of a random-init, discriminative ViT-B-32 saved as a local checkpoint."""
    from model_factories import make_clip_config

    return make_clip_config(tmp_path_factory.mktemp("clip-vitb32"), arch="ViT-B-32")


@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory):
    """ClipConfig of a tiny random-init CLIP (fast pipeline tests)."""
    from model_factories import make_clip_config

    return make_clip_config(tmp_path_factory.mktemp("clip-tiny"), arch="tiny")


@pytest.fixture(scope="session")
def found_saliency_config(tmp_path_factory):
    """SaliencyConfig of a random-init ViT-S/8 checkpoint plus the real FOUND head."""
    from model_factories import make_saliency_config

    return make_saliency_config(tmp_path_factory.mktemp("found"))

# The moto S3 server fixtures (s3_server, s3_bucket) for storage and pipeline tests.
pytest_plugins = ["s3_server"]


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process with pytest's verdict once the session is over, skipping interpreter teardown.

    CI once saw a run whose every test passed exit with SIGSEGV (139) after the summary line, during
    the interpreter's own teardown, where native libraries the suite loads in this one process
    (Ray's core worker and its gRPC threads, torch's thread pools, Arrow) tear down in an order
    none of them controls. The suite's result is pytest's exit status, decided by then; a crash in
    teardown is not a test's outcome. Ray is shut down in order first (a test that left it running
    would otherwise leave it to ``atexit``); then the ``atexit`` functions run (pytest's own
    removal of its temporary folders' locks among them, so old folders are still cleaned up), the
    streams are flushed, and the process ends with that status without the module teardown.
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    session = getattr(config, "_clipdiy_session", None)
    if session is None:
        return  # no session ran to its end (a usage error, say): the normal exit
    import atexit

    atexit._run_exitfuncs()  # what a normal exit runs first; each unregisters as it runs
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session):
    config = session.config
    config._clipdiy_session = session
