"""Class text embeddings: one vector per vocabulary class, computed once and cached.

A class's embedding is the mean of the L2-normalised embeddings of all its prompts (synonyms x
templates), L2-normalised again; with the faithful single template and no synonyms that is simply
the embedding of ``"a photo of a {name}"`` (SPEC 1.5).

Cache key: (model name, weights id, model dtype, vocabulary+prompts hash). The memory cache lives
for the process; the optional disk cache (``cache_dir``, a local path or fsspec URI) holds one
safetensors file per key, so workers and re-runs skip the text forwards.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from clipdiy.segmentation.config import PromptConfig
from clipdiy.segmentation.vocabulary import Vocabulary, class_prompts, vocabulary_hash


class TextEncoder(Protocol):
    model_name: str
    weights_id: str
    encode_text: Callable[[Sequence[str]], torch.Tensor]


_MEMORY: dict[str, torch.Tensor] = {}


def class_text_embeddings(
    clip: TextEncoder,
    vocabulary: Vocabulary,
    prompts: PromptConfig,
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """C x D float32 on the CPU, L2-normalised, row c = class c of ``vocabulary``."""
    key = text_cache_key(clip, vocabulary, prompts)
    if key in _MEMORY:
        return _MEMORY[key].clone()
    path = _disk_path(cache_dir, key) if cache_dir else None
    embeddings = _read_disk(path, len(vocabulary)) if path else None
    if embeddings is None:
        embeddings = compute_class_embeddings(clip.encode_text, vocabulary, prompts)
        if path:
            _write_disk(path, embeddings)
    _MEMORY[key] = embeddings
    return embeddings.clone()


def compute_class_embeddings(
    encode_text: Callable[[Sequence[str]], torch.Tensor], vocabulary: Vocabulary, prompts: PromptConfig
) -> torch.Tensor:
    """C x D: per class, the re-normalised mean of its L2-normalised prompt embeddings (no cache)."""
    texts: list[str] = []
    owner: list[int] = []
    for index, cls in enumerate(vocabulary.classes):
        class_texts = class_prompts(cls, prompts)
        texts.extend(class_texts)
        owner.extend([index] * len(class_texts))
    prompt_embeddings = F.normalize(encode_text(texts).detach().float().cpu(), dim=-1)  # N x D
    owner_index = torch.tensor(owner)
    sums = torch.zeros(len(vocabulary), prompt_embeddings.shape[1]).index_add_(0, owner_index, prompt_embeddings)
    return F.normalize(sums, dim=-1)


def text_cache_key(clip: TextEncoder, vocabulary: Vocabulary, prompts: PromptConfig) -> str:
    """Hex key naming one set of class embeddings: model, weights, precision, vocabulary and prompts."""
    parts = (
        clip.model_name,
        clip.weights_id,
        str(getattr(clip, "dtype", "")),
        vocabulary_hash(vocabulary, prompts),
    )
    return hashlib.sha256("\x00".join(parts).encode("utf-8")).hexdigest()


def clear_memory_cache() -> None:
    _MEMORY.clear()


def _disk_path(cache_dir: str | os.PathLike, key: str) -> str:
    return f"{str(cache_dir).rstrip('/')}/text-embeddings-{key[:32]}.safetensors"


def _read_disk(path: str, num_classes: int) -> torch.Tensor | None:
    import fsspec
    from safetensors.torch import load

    fs, fs_path = fsspec.core.url_to_fs(path)
    if not fs.exists(fs_path):
        return None
    with fs.open(fs_path, "rb") as handle:
        tensors = load(handle.read())
    embeddings = tensors.get("embeddings")
    if embeddings is None or embeddings.ndim != 2 or embeddings.shape[0] != num_classes:
        raise ValueError(f"text-embedding cache file {path} is corrupt; delete it to recompute")
    return embeddings.float()


def _write_disk(path: str, embeddings: torch.Tensor) -> None:
    import fsspec
    from safetensors.torch import save

    payload = save({"embeddings": embeddings.contiguous()})
    fs, fs_path = fsspec.core.url_to_fs(path)
    fs.makedirs(fs_path.rsplit("/", 1)[0], exist_ok=True)
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(fs, LocalFileSystem):
        # write-then-rename so a concurrent reader never sees half a file
        partial = f"{fs_path}.{os.getpid()}.partial"
        with open(partial, "wb") as handle:
            handle.write(payload)
        os.replace(partial, fs_path)
    else:
        with fs.open(fs_path, "wb") as handle:
            handle.write(payload)


def query_text_embeddings(
    clip: TextEncoder,
    queries: Sequence[str],
    templates: Sequence[str],
    cache_dir: str | os.PathLike | None = None,
) -> torch.Tensor:
    """Q x D float32 on the CPU: per query word, the re-normalised mean of its L2-normalised
    template embeddings (NACLIP's text side, SPEC 8.6; every synonym is its own query).

    Cached like :func:`class_text_embeddings`, keyed by model, weights, precision, queries and
    templates.
    """
    queries, templates = list(queries), list(templates)
    if not queries or not templates:
        raise ValueError("query_text_embeddings needs at least one query and one template")
    payload = "\x00".join([clip.model_name, clip.weights_id, str(getattr(clip, "dtype", "")), "queries", *queries, "templates", *templates])
    key = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    if key in _MEMORY:
        return _MEMORY[key].clone()
    path = _disk_path(cache_dir, key) if cache_dir else None
    embeddings = _read_disk(path, len(queries)) if path else None
    if embeddings is None:
        texts = [template.format(query) for query in queries for template in templates]
        prompts = F.normalize(clip.encode_text(texts).detach().float().cpu(), dim=-1)
        embeddings = F.normalize(prompts.view(len(queries), len(templates), -1).mean(dim=1), dim=-1)
        if path:
            _write_disk(path, embeddings)
    _MEMORY[key] = embeddings
    return embeddings.clone()
