"""Weights sources: local, fsspec, http(s), hub; missing weights fail fast and say which option to pass."""

from __future__ import annotations

import hashlib
import http.server
import socket
import threading
import time

import fsspec
import pytest
import torch
from model_factories import FOUND_HEAD

from clipdiy.errors import WeightsNotFoundError
from clipdiy.segmentation.config import ClipConfig, SaliencyConfig
from clipdiy.segmentation.weights import (
    CLIP_WEIGHTS,
    DINO_WEIGHTS,
    FOUND_HEAD_WEIGHTS,
    cache_path,
    load_state_dict,
    resolve_file,
    resolve_hub_file,
    sha256_file,
    weights_id,
)

FAST_S = 30.0


@pytest.fixture
def offline(monkeypatch):
    """The hub is off: HF_HUB_OFFLINE set, read at call time by clipdiy.segmentation.weights."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def online(monkeypatch):
    """Offline mode off (the suite runs with HF_HUB_OFFLINE=1); only loopback servers are used."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("CLIPDIY_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def dead_hub(online, monkeypatch):
    """The hub is 'online' but its endpoint is a closed local port: the online path, no network."""
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server over tmp_path/www; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

        def log_message(self, *args):  # keep the test output clean
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def assert_names_option(error: pytest.ExceptionInfo, field: str, flag: str) -> None:
    message = str(error.value)
    assert field in message and flag in message, message


def test_local_path_and_file_uri(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"a": torch.ones(2)}, path)
    assert resolve_file(str(path), CLIP_WEIGHTS) == path
    assert resolve_file(f"file://{path}", CLIP_WEIGHTS) == path
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_file(str(tmp_path / "missing.pt"), CLIP_WEIGHTS)
    assert "missing.pt" in str(error.value)
    assert_names_option(error, "ClipConfig.checkpoint", "--clip-checkpoint")


def test_fsspec_uri_is_copied_to_the_cache(tmp_path):
    with fsspec.open("memory://bucket/weights/head.pt", "wb") as handle:
        torch.save({"w": torch.arange(3.0)}, handle)
    local = resolve_file("memory://bucket/weights/head.pt", FOUND_HEAD_WEIGHTS, cache_dir=tmp_path)
    assert local.is_file() and tmp_path in local.parents and local.name.endswith("head.pt")
    assert torch.equal(load_state_dict(local, FOUND_HEAD_WEIGHTS)["w"], torch.arange(3.0))
    fsspec.filesystem("memory").rm("/bucket/weights/head.pt")
    assert resolve_file("memory://bucket/weights/head.pt", FOUND_HEAD_WEIGHTS, cache_dir=tmp_path) == local
    with pytest.raises(WeightsNotFoundError) as error:
        resolve_file("memory://bucket/weights/other.pt", FOUND_HEAD_WEIGHTS, cache_dir=tmp_path)
    assert_names_option(error, "SaliencyConfig.head", "--found-head")
    assert "--saliency none" in str(error.value)
    assert not list(tmp_path.rglob("*.partial"))


def test_http_download_and_fast_failures(online, tmp_path, http_server):
    root, base = http_server
    torch.save({"decoder": {"weight": torch.ones(1, 4, 1, 1), "bias": torch.zeros(1)}}, root / "head.pt")
    local = resolve_file(f"{base}/head.pt", FOUND_HEAD_WEIGHTS, cache_dir=tmp_path / "cache")
    assert local.read_bytes() == (root / "head.pt").read_bytes()
    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="HTTP 404") as error:
        resolve_file(f"{base}/absent.pt", FOUND_HEAD_WEIGHTS, cache_dir=tmp_path / "cache")
    assert_names_option(error, "SaliencyConfig.head", "--found-head")
    with pytest.raises(WeightsNotFoundError, match="could not be downloaded"):
        resolve_file(f"http://127.0.0.1:{closed_port()}/head.pt", FOUND_HEAD_WEIGHTS, cache_dir=tmp_path / "cache")
    assert time.monotonic() - start < FAST_S
    assert not list((tmp_path / "cache").rglob("*.partial"))


def test_urls_are_not_fetched_offline_but_cached_copies_are_used(offline, tmp_path, http_server):
    root, base = http_server
    (root / "head.pt").write_bytes(b"weights")
    with pytest.raises(WeightsNotFoundError, match="offline mode") as error:
        resolve_file(f"{base}/head.pt", FOUND_HEAD_WEIGHTS, cache_dir=tmp_path)
    assert_names_option(error, "SaliencyConfig.head", "--found-head")
    cached = cache_path(f"{base}/head.pt", tmp_path)
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert resolve_file(f"{base}/head.pt", FOUND_HEAD_WEIGHTS, cache_dir=tmp_path) == cached


def test_default_pretrained_clip_offline_fails_fast_and_says_what_to_pass(offline, tmp_path):
    import open_clip  # noqa: F401  (import time is not what is measured: a loaded CI box takes ~15 s)

    from clipdiy.segmentation.models.clip import create_clip_model

    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as error:
        create_clip_model(ClipConfig(cache_dir=str(tmp_path)))  # ViT-B-32 / laion2b_s34b_b79k
    elapsed = time.monotonic() - start
    assert elapsed < FAST_S
    message = str(error.value)
    assert "ViT-B-32" in message and "laion2b_s34b_b79k" in message and "HF_HUB_OFFLINE" in message
    assert_names_option(error, "ClipConfig.checkpoint", "--clip-checkpoint")


def test_default_pretrained_clip_unreachable_hub_fails_fast(dead_hub, tmp_path):
    import open_clip  # noqa: F401  (import time is not what is measured: a loaded CI box takes ~15 s)

    from clipdiy.segmentation.models.clip import create_clip_model

    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="unreachable") as error:
        create_clip_model(ClipConfig(cache_dir=str(tmp_path)))
    assert time.monotonic() - start < FAST_S
    assert_names_option(error, "ClipConfig.checkpoint", "--clip-checkpoint")


def test_default_dino_offline_fails_fast(offline):
    import timm  # noqa: F401  (import time is not what is measured)

    from clipdiy.segmentation.models.saliency import create_saliency_model

    start = time.monotonic()
    with pytest.raises(WeightsNotFoundError) as error:
        create_saliency_model(SaliencyConfig(head=str(FOUND_HEAD)))
    assert time.monotonic() - start < FAST_S
    assert "vit_small_patch8_224.dino" in str(error.value)
    assert_names_option(error, "SaliencyConfig.backbone_checkpoint", "--dino-checkpoint")
    assert "--saliency none" in str(error.value)


def test_missing_found_head_fails_fast(tmp_path):
    from clipdiy.segmentation.models.saliency import create_saliency_model

    with pytest.raises(WeightsNotFoundError) as error:
        create_saliency_model(SaliencyConfig(head=str(tmp_path / "found_decoder.pt")))
    assert_names_option(error, "SaliencyConfig.head", "--found-head")
    assert "--saliency none" in str(error.value)


def test_hub_file_found_in_the_local_cache(offline, tmp_path):
    """A file already in the Hugging Face cache is used offline (local_files_only first)."""
    repo = "someone/weights"
    snapshot = tmp_path / "models--someone--weights" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").write_bytes(b"not read here")
    (tmp_path / "models--someone--weights" / "refs").mkdir()
    (tmp_path / "models--someone--weights" / "refs" / "main").write_text("0" * 40)
    found = resolve_hub_file(repo, ("model.safetensors", "pytorch_model.bin"), DINO_WEIGHTS, "x", cache_dir=tmp_path)
    assert found == snapshot / "model.safetensors"
    with pytest.raises(WeightsNotFoundError, match="HF_HUB_OFFLINE"):
        resolve_hub_file(repo, ("other.bin",), DINO_WEIGHTS, "x", cache_dir=tmp_path)


def test_load_state_dict_formats_and_garbage(tmp_path):
    state = {"layer.weight": torch.randn(2, 2), "layer.bias": torch.zeros(2)}
    torch.save(state, tmp_path / "plain.pt")
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "wrapped.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("plain.pt", "wrapped.pt", "ddp.pt", "w.safetensors"):
        loaded = load_state_dict(tmp_path / name, CLIP_WEIGHTS)
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), name

    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    with pytest.raises(WeightsNotFoundError, match="not a readable checkpoint"):
        load_state_dict(tmp_path / "garbage.pt", CLIP_WEIGHTS)
    torch.save({"weight": torch.ones(1), "note": "text"}, tmp_path / "mixed.pt")
    with pytest.raises(WeightsNotFoundError, match="state dict of tensors"):
        load_state_dict(tmp_path / "mixed.pt", CLIP_WEIGHTS)


class _Payload:  # a pickled object that weights_only loading must refuse to build
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"x": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsNotFoundError, match="not a readable checkpoint"):
        load_state_dict(tmp_path / "evil.pt", DINO_WEIGHTS)


def test_sha256_and_weights_id(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(b"clipdiy" * 1000)
    digest = hashlib.sha256(b"clipdiy" * 1000).hexdigest()
    assert sha256_file(path) == digest
    assert weights_id(path) == f"sha256:{digest[:16]}"
    path.write_bytes(b"changed")  # a rewritten file is hashed again
    assert sha256_file(path) == hashlib.sha256(b"changed").hexdigest()
