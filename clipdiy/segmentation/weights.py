"""Where model weights come from: the one place that turns a weights source into a local file.

A source is a local path, an fsspec URI (``s3://``, ``gs://``, ...; copied into a local cache), an
http(s) URL (downloaded into the cache with short timeouts) or a Hugging Face hub file (the local
hub cache first, then the hub with short timeouts; ``HF_HUB_OFFLINE`` is respected and then the
network is never tried; ``CLIPDIY_OFFLINE`` does the same and both also stop http(s) downloads).
Anything missing or undownloadable raises
:class:`~clipdiy.errors.WeightsNotFoundError` within seconds, naming what is missing and the
option that supplies it (config field and command-line flag). Nothing ever falls back to random
weights.

Checkpoints are read with ``torch.load(weights_only=True)`` or safetensors, never unpickled.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from clipdiy.errors import WeightsNotFoundError

#: Seconds to wait for a connection or a read when downloading (per socket operation).
DOWNLOAD_TIMEOUT_S = 10.0
#: Seconds to wait for the hub's metadata request.
HUB_ETAG_TIMEOUT_S = 5.0

_TRUE = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class WeightsOption:
    """What a weights file is for and how a user supplies it."""

    what: str
    config_field: str
    cli_flag: str
    hint: str = ""

    def missing(self, detail: str) -> WeightsNotFoundError:
        """The error to raise when these weights cannot be had; ``detail`` says what was tried."""
        message = (
            f"{self.what} not found: {detail}. Pass a local path or URI with {self.config_field} ({self.cli_flag})"
        )
        if self.hint:
            message += f"; {self.hint}"
        return WeightsNotFoundError(message + ".")


_NO_SALIENCY = "or run without saliency with SaliencyConfig.backend='none' (--saliency none)"
CLIP_WEIGHTS = WeightsOption("CLIP weights", "ClipConfig.checkpoint", "--clip-checkpoint")
DINO_WEIGHTS = WeightsOption(
    "DINO backbone weights", "SaliencyConfig.backbone_checkpoint", "--dino-checkpoint", _NO_SALIENCY
)
FOUND_HEAD_WEIGHTS = WeightsOption("FOUND head weights", "SaliencyConfig.head", "--found-head", _NO_SALIENCY)
TRIDENT_DINO_WEIGHTS = WeightsOption(
    "Trident's DINO ViT-B/16 weights (timm vit_base_patch16_224.dino)", "TridentConfig.dino_checkpoint", "--trident-dino-checkpoint"
)
TRIDENT_SAM_WEIGHTS = WeightsOption(
    "Trident's SAM ViT-B weights (sam_vit_b_01ec64.pth)", "TridentConfig.sam_checkpoint", "--sam-checkpoint"
)


def default_cache_dir() -> Path:
    """``$CLIPDIY_CACHE``, else ``$XDG_CACHE_HOME/clipdiy``, else ``~/.cache/clipdiy``."""
    if os.environ.get("CLIPDIY_CACHE"):
        return Path(os.environ["CLIPDIY_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipdiy"


def offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` or ``CLIPDIY_OFFLINE`` is set: no hub or http(s) download is tried.

    Read at call time, not import time, so tests and users can flip it.
    """
    from huggingface_hub import constants

    flags = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "CLIPDIY_OFFLINE"))
    return any(flag in _TRUE for flag in flags) or bool(constants.HF_HUB_OFFLINE)


def resolve_file(source: str, option: WeightsOption, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local file holding the weights ``source`` names (path, fsspec URI or http(s) URL)."""
    if not source:
        raise option.missing("no source given")
    protocol, _, rest = source.partition("://")
    if not rest or protocol == "file":
        path = Path(rest if protocol == "file" else source).expanduser()
        if not path.is_file():
            raise option.missing(f"no file at {path}")
        return path
    target = cache_path(source, cache_dir)
    if target.is_file():
        return target
    if protocol in ("http", "https") and offline():
        raise option.missing(f"{source} is not in the cache ({target}) and offline mode is on (HF_HUB_OFFLINE)")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        if protocol in ("http", "https"):
            _download_url(source, partial, option)
        else:
            _copy_fsspec(source, partial, option)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target


def resolve_hub_file(
    repo_id: str,
    filenames: tuple[str, ...],
    option: WeightsOption,
    description: str,
    cache_dir: str | os.PathLike | None = None,
    revision: str | None = None,
) -> Path:
    """The first of ``filenames`` in hub repo ``repo_id``: from the local hub cache, else downloaded.

    ``description`` names the model for the error message (e.g. ``ViT-B-32 / laion2b_s34b_b79k``).
    """
    from huggingface_hub import hf_hub_download, hf_hub_url
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = str(cache_dir) if cache_dir else None
    for filename in filenames:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache, local_files_only=True))
        except LocalEntryNotFoundError:
            continue
    where = f"{description} (hub repo {repo_id}, file {' or '.join(filenames)})"
    if offline():
        raise option.missing(f"{where} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE)")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    errors = []
    for filename in filenames:
        # One quick probe without retries: hf_hub_download retries a dead network with backoff for
        # tens of seconds, and users must hear "not found" within seconds.
        url = hf_hub_url(repo_id, filename, revision=revision, endpoint=endpoint)
        status = _probe(url, option, where)
        if status is not None:
            errors.append(f"{filename}: HTTP {status}")
            continue
        try:
            return Path(
                hf_hub_download(
                    repo_id,
                    filename,
                    revision=revision,
                    cache_dir=cache,
                    etag_timeout=HUB_ETAG_TIMEOUT_S,
                    endpoint=endpoint,
                )
            )
        except Exception as error:  # auth, hub outage, disk: reported with the cause, never swallowed
            raise option.missing(f"{where} could not be downloaded ({type(error).__name__}: {error})") from error
    raise option.missing(f"{where} is not cached locally and not on the hub ({'; '.join(errors)})")


def _probe(url: str, option: WeightsOption, where: str) -> int | None:
    """None when ``url`` answers a HEAD request with success; the HTTP status of a refusal.

    Raises the option's missing-weights error at once when the host cannot be reached.
    """
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "clipdiy"})
    try:
        with urllib.request.urlopen(request, timeout=HUB_ETAG_TIMEOUT_S):
            return None
    except urllib.error.HTTPError as error:
        return error.code
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise option.missing(
            f"{where} is not in the local Hugging Face cache and the hub is unreachable ({error}); "
            "set HF_HUB_OFFLINE=1 to skip the hub"
        ) from error


def load_state_dict(path: str | os.PathLike, option: WeightsOption) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` file or a torch checkpoint (``weights_only=True``).

    A checkpoint may be a plain state dict or wrap one as ``{"state_dict": ...}``; a ``module.``
    prefix (DataParallel/DDP) is stripped.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise option.missing(f"{path} is not a readable checkpoint ({type(error).__name__}: {error})") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise option.missing(f"{path} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 hex digest of a file (memoised per path, size and mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_CACHE:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        _SHA_CACHE[key] = digest.hexdigest()
    return _SHA_CACHE[key]


def weights_id(path: str | os.PathLike) -> str:
    """A short provenance id of a weights file: ``sha256:<first 16 hex digits>``."""
    return f"sha256:{sha256_file(path)[:16]}"


def cache_path(source: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where a copy of a remote ``source`` lives in the cache (``cache_dir`` or :func:`default_cache_dir`)."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    name = source.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0] or "weights"
    key = hashlib.sha256(source.encode("utf-8")).hexdigest()[:16]
    return root / "weights" / f"{key}-{name}"


def _download_url(url: str, target: Path, option: WeightsOption) -> None:
    request = urllib.request.Request(url, headers={"User-Agent": "clipdiy"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response, open(target, "wb") as out:
            shutil.copyfileobj(response, out, length=1 << 20)
    except urllib.error.HTTPError as error:
        raise option.missing(f"{url} answered HTTP {error.code}") from error
    except (urllib.error.URLError, TimeoutError, OSError) as error:
        raise option.missing(f"{url} could not be downloaded ({error})") from error


def _copy_fsspec(uri: str, target: Path, option: WeightsOption) -> None:
    import fsspec

    try:
        with fsspec.open(uri, "rb") as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out, length=1 << 20)
    except FileNotFoundError as error:
        raise option.missing(f"no object at {uri}") from error
    except (ImportError, ValueError) as error:
        raise option.missing(f"cannot open {uri} ({type(error).__name__}: {error})") from error
    except Exception as error:  # credentials, network, permissions: reported with the cause
        raise option.missing(f"{uri} could not be copied ({type(error).__name__}: {error})") from error
