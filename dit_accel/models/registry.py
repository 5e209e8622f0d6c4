"""Which adapter serves which transformer: the registry keyed by transformer class, and how the
transformers of a pipeline are found (`pipeline_transformers`, under `torch.compile` wrappers too)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import ModelAdapter


class UnsupportedModelError(TypeError):
    """Raised for a transformer no adapter knows."""


_REGISTRY: dict[type[nn.Module], type[ModelAdapter]] = {}


def _unwrap(module: nn.Module) -> nn.Module:
    """The model under `torch.compile`'s wrapper (hooks go on the real modules)."""
    return getattr(module, "_orig_mod", module)


def pipeline_transformers(target: Any) -> tuple[list[nn.Module], Any | None]:
    """The transformers of a diffusers pipeline (`transformer`, and Wan 2.2's `transformer_2`) and the
    pipeline, or a bare transformer and None; `torch.compile`'s wrappers unwrapped."""
    if isinstance(target, nn.Module):
        return [_unwrap(target)], None
    if not hasattr(target, "components"):
        raise TypeError(f"dit_accel.apply expects a diffusers pipeline or a transformer model, got {type(target).__name__}")
    transformer = getattr(target, "transformer", None)
    if transformer is None:
        raise TypeError(
            f"{type(target).__name__} has no `transformer` component: dit-accel accelerates diffusion-transformer "
            "pipelines (SD3, Flux, PixArt, DiT, Wan, HunyuanVideo, CogVideoX), not UNet ones"
        )
    second = getattr(target, "transformer_2", None)
    return [_unwrap(transformer)] + ([_unwrap(second)] if second is not None else []), target


def register_adapter(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make `adapter_cls` the adapter of its `transformer_class`."""
    _REGISTRY[adapter_cls.transformer_class] = adapter_cls
    return adapter_cls


def supported_families() -> list[str]:
    return sorted({cls.family for cls in _REGISTRY.values()})


def adapter_for(transformer: nn.Module) -> ModelAdapter:
    """The adapter of `transformer`, found by its class (subclasses included)."""
    for klass in type(transformer).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass](transformer)
    names = ", ".join(f"{cls.transformer_class.__name__} ({cls.family})" for cls in _REGISTRY.values())
    raise UnsupportedModelError(
        f"dit-accel has no adapter for {type(transformer).__name__}. Supported transformers: {names}."
    )
