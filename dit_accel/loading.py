"""Which model a spec names and how to load it: `tiny:<family>`, `reference:image|video`, a hub id or a
local folder. Shared by the command line and the UI; a bad spec is refused before anything loads."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

#: the reference models generate a batch of this many captions by default (batches show the speedup)
REFERENCE_BATCH = 8


class UsageError(ValueError):
    """A model or option that cannot be used; reported as one line, without a traceback."""


def default_model() -> str:
    """The trained reference model when its weights are installed: quality numbers then mean something."""
    try:
        from .testing.reference import REFERENCE_DIRS
    except ImportError:
        return "tiny:sd3"
    return "reference:image" if (REFERENCE_DIRS["image"] / "model_index.json").exists() else "tiny:sd3"


def load_model(spec: str, device: str, dtype: torch.dtype, safetensors_only: bool = False):
    """The pipeline for `spec` and the call arguments it is meant to run with (hub and local models
    load their weights from safetensors only with `safetensors_only`; never with remote code)."""
    kind, _, name = spec.partition(":")
    if kind == "tiny":
        from .testing import FAMILIES, tiny_call_kwargs, tiny_pipeline

        if name not in FAMILIES:
            raise UsageError(f"unknown tiny family {name!r}; valid: {', '.join(FAMILIES)}")
        pipe = tiny_pipeline(name).to(device)
        return (pipe if dtype == torch.float32 else pipe.to(dtype=dtype)), tiny_call_kwargs(name)
    if kind == "reference":
        from .testing.reference import reference_call_kwargs, reference_pipeline

        if name not in ("image", "video"):
            raise UsageError(f"unknown reference model {name!r}; valid: image, video")
        from .metrics import procedural

        batch = procedural.image_batch if name == "image" else procedural.video_batch
        captions = [scene.caption for scene in batch(REFERENCE_BATCH, 0)[1]]
        return reference_pipeline(name, device, dtype), reference_call_kwargs(name, prompt=captions)
    from diffusers import DiffusionPipeline

    check_model_spec(spec)
    options = {"use_safetensors": True} if safetensors_only else {}
    try:
        return DiffusionPipeline.from_pretrained(spec, torch_dtype=dtype, **options).to(device), {}
    except OSError as error:
        raise UsageError(f"cannot load {spec!r} as a diffusers pipeline: {error}") from error


def check_model_spec(spec: str) -> None:
    """A hub id or an existing local folder, said before anything is loaded."""
    kind, _, _ = spec.partition(":")
    if kind in ("tiny", "reference") or Path(spec).is_dir():
        return
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError as error:
        raise UsageError(f"model {spec!r}: no such local folder, and not a valid hub id ({error})") from None


def call_arguments(pipe: Any, defaults: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """The model's default call (without its generator and output type) overridden by `options`, keyed
    by pipeline argument; None means not given, and an argument the pipeline lacks is left out. A DiT
    pipeline's prompt is a class name (or a list of them), which becomes its class labels."""
    accepted = inspect.signature(pipe.__call__).parameters
    call = {k: v for k, v in defaults.items() if k not in ("generator", "output_type")}
    for name, value in options.items():
        if value is None:
            continue
        if name == "prompt" and "prompt" not in accepted and hasattr(pipe, "get_label_ids"):
            try:
                call["class_labels"] = pipe.get_label_ids(value if isinstance(value, list) else [value])
            except ValueError as error:
                raise UsageError(f"{type(pipe).__name__} takes a class name as prompt: {error}") from None
        elif name in accepted:
            call[name] = value
    return call
