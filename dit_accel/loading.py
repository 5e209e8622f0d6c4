"""Which model a spec names and how to load it: `tiny:<family>`, `medium:<family>`, `reference:image|detail|video`,
a hub id or a local folder. Shared by the command line and the UI; a bad spec is refused before anything
loads."""

from __future__ import annotations

import inspect
import json
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
    check_model_spec(spec)
    kind, _, name = spec.partition(":")
    if kind in ("tiny", "medium"):
        from .testing import medium_call_kwargs, medium_pipeline, tiny_call_kwargs, tiny_pipeline

        build, call = (tiny_pipeline, tiny_call_kwargs) if kind == "tiny" else (medium_pipeline, medium_call_kwargs)
        pipe = build(name).to(device)
        return (pipe if dtype == torch.float32 else pipe.to(dtype=dtype)), call(name)
    if kind == "reference":
        from .metrics.suites import SUITES
        from .testing.reference import reference_call_kwargs, reference_pipeline

        captions = SUITES[name].captions(REFERENCE_BATCH, 0)
        return reference_pipeline(name, device, dtype), reference_call_kwargs(name, prompt=captions)
    from diffusers import DiffusionPipeline

    options = {"use_safetensors": True} if safetensors_only else {}
    try:
        return DiffusionPipeline.from_pretrained(spec, torch_dtype=dtype, **options).to(device), {}
    except OSError as error:
        raise UsageError(f"cannot load {spec!r} as a diffusers pipeline: {error}") from error


def check_model_spec(spec: str) -> None:
    """A known `tiny:`, `medium:` or `reference:` name, a hub id or an existing local folder, said before
    anything is loaded."""
    kind, _, name = spec.partition(":")
    if kind in ("tiny", "medium"):
        from .testing import FAMILIES, MEDIUM_FAMILIES

        families = FAMILIES if kind == "tiny" else MEDIUM_FAMILIES
        if name not in families:
            raise UsageError(f"unknown {kind} family {name!r}; valid: {', '.join(families)}")
        return
    if kind == "reference":
        from .metrics.suites import SUITES

        if name not in SUITES:
            raise UsageError(f"unknown reference model {name!r}; valid: {', '.join(SUITES)}")
        return
    if Path(spec).is_dir():
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


def read_prompts(path: Path, option: str = "--prompts") -> list[str]:
    """One prompt a line (blank lines and lines starting with # skipped), or a JSON list of strings."""
    if not path.exists() or path.is_dir():
        raise UsageError(f"{option} {path}: no such file")
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            prompts = json.loads(text)
        except json.JSONDecodeError as error:
            raise UsageError(f"{option} {path}: not a JSON list ({error})") from error
        if not all(isinstance(p, str) and p.strip() for p in prompts):
            raise UsageError(f"{option} {path}: a JSON prompt file must hold a list of non-empty strings")
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise UsageError(f"{option} {path}: no prompts")
    return prompts


def meta_transformer(model: str, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """The transformer of `model` without weights (on the meta device), for estimates: a release's config
    (`dit_accel.testing.RELEASES`: wan2.1-14b, hunyuanvideo, flux.1-dev, ...) or the transformer config of a
    hub id or a local pipeline folder (its config files only; none is downloaded when offline)."""
    from .testing import RELEASES, release_transformer

    if model in RELEASES:
        return release_transformer(model, device="meta", dtype=dtype)
    import diffusers

    try:
        index = diffusers.DiffusionPipeline.load_config(model)
        transformer_class = getattr(diffusers, index["transformer"][1])
        config = transformer_class.load_config(model, subfolder="transformer")
    except (OSError, KeyError, TypeError, AttributeError, ValueError) as error:
        raise UsageError(f"{model!r}: neither a release ({', '.join(RELEASES)}) nor a pipeline whose transformer "
                         f"config can be read ({error})") from None
    with torch.device("meta"):
        return transformer_class.from_config(config).to(dtype)
