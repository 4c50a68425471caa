"""Saliency backends behind one interface (:class:`SaliencyModel`), created by name from a registry.

A new backend is a module that defines a :class:`SaliencyModel` and registers a factory
``(config, device, dtype) -> SaliencyModel`` with :func:`register_saliency_backend`; the segmenter
only ever calls :func:`create_saliency_model`. Built in: ``found`` (SPEC 2) and ``none``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clipdiy.segmentation.config import MIN_SALIENCY_SIDE, SaliencyConfig
from clipdiy.segmentation.models.saliency.base import SaliencyModel

SaliencyFactory = Callable[[SaliencyConfig, torch.device, "torch.dtype | None"], SaliencyModel]

_BACKENDS: dict[str, SaliencyFactory] = {}
_NEEDS_PIXELS: dict[str, bool] = {}


def register_saliency_backend(name: str, *, needs_pixels: bool = True) -> Callable[[SaliencyFactory], SaliencyFactory]:
    """Decorator: register ``factory(config, device, dtype)`` as saliency backend ``name``.

    ``needs_pixels``: the models it makes read the image (see ``SaliencyModel.needs_pixels``).
    """

    def register(factory: SaliencyFactory) -> SaliencyFactory:
        if name in _BACKENDS and _BACKENDS[name] is not factory:
            raise ValueError(f"saliency backend {name!r} is already registered")
        _BACKENDS[name] = factory
        _NEEDS_PIXELS[name] = needs_pixels
        return factory

    return register


def saliency_input_side(config: SaliencyConfig) -> int | None:
    """The longer side to prepare saliency inputs at, for CPU workers that have no model.

    ``config.max_side`` (``None``: full resolution); the smallest allowed side for a backend
    that does not read pixels, so that a pipeline does not ship full-resolution images for it.
    """
    if not _NEEDS_PIXELS.get(config.backend, True):
        return MIN_SALIENCY_SIDE
    return config.max_side


def available_saliency_backends() -> tuple[str, ...]:
    return tuple(sorted(_BACKENDS))


def create_saliency_model(
    config: SaliencyConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> SaliencyModel:
    """The saliency backend ``config.backend`` names, weights loaded, frozen, on ``device`` (default CPU).

    ``dtype``: precision of the backbone (``None``: float32); maps come back as float in [0, 1].
    """
    factory = _BACKENDS.get(config.backend)
    if factory is None:
        raise ValueError(
            f"unknown saliency backend {config.backend!r}; available: {', '.join(available_saliency_backends())}"
        )
    model = factory(config, torch.device(device or "cpu"), dtype)
    return model.eval().requires_grad_(False)


# Built-in backends register themselves on import.
from clipdiy.segmentation.models.saliency import found as _found  # noqa: F401
from clipdiy.segmentation.models.saliency import none as _none  # noqa: F401

__all__ = [
    "SaliencyModel",
    "available_saliency_backends",
    "create_saliency_model",
    "register_saliency_backend",
    "saliency_input_side",
]
