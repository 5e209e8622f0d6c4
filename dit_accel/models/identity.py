"""Which model a file was made for: its class, a hash of its config and a fingerprint of its weights.

Calibration files (DyDiT's head and channel scores), fine-tuned files (LoRA adapters, routers) and
tuned plans hold numbers that only mean something for one checkpoint; another checkpoint of the same architecture has the same class and
config but other weights, so the fingerprint samples the weights themselves (a few values of every
tensor, with its name and shape), which is cheap enough to check at every load.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from ..config import ConfigError

#: values sampled from each tensor for the weight fingerprint
_SAMPLES = 16


def _config_hash(module: nn.Module) -> str:
    config = dict(getattr(module, "config", {}) or {})
    text = json.dumps({k: v for k, v in config.items() if not k.startswith("_")}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _weights_fingerprint(module: nn.Module) -> str:
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in sorted(module.state_dict().items()):  # by name: wrappers may re-register modules
            flat = tensor.detach().reshape(-1)
            stride = max(1, flat.numel() // _SAMPLES)
            sample = flat[::stride][:_SAMPLES].to("cpu", torch.float32)
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def model_identity(module: nn.Module) -> dict[str, str]:
    """{"model_class", "config_hash", "weights"}: strings, as safetensors metadata and plan files hold them."""
    cls = type(module)
    return {"model_class": f"{cls.__module__}.{cls.__qualname__}", "config_hash": _config_hash(module),
            "weights": _weights_fingerprint(module)}


def identity_mismatch(expected: dict[str, str], module: nn.Module) -> str | None:
    """Why a file made for `expected` does not fit `module` (None when it does)."""
    actual = model_identity(module)
    for key, what in (("model_class", "another model class"), ("config_hash", "another configuration"),
                      ("weights", "other weights (another checkpoint of this architecture)")):
        if expected.get(key) != actual[key]:
            return f"it was made for {what}: {expected.get(key)!r}, this transformer has {actual[key]!r}"
    return None


def save_for_model(path: str, tensors: dict[str, torch.Tensor], identity: dict[str, str], file_format: str,
                   **metadata: str) -> None:
    """Write `tensors` (as fp32) to a safetensors file marked `file_format`, with the `identity` of the
    transformer they were made for and string `metadata`."""
    from safetensors.torch import save_file

    save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": file_format, **identity, **metadata})


def load_for_model(path: str, module: nn.Module, file_format: str, what: str
                   ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file `save_for_model` wrote, refused with a `ConfigError` (`what` names the
    file in the message) when it is no such file or was made for another model than `module`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # safetensors raises its own error types for a file that is not one
        raise ConfigError(f"{what} is not a safetensors file: {error}") from error
    if metadata.get("format") != file_format:
        raise ConfigError(f"{what} is not a {file_format} file")
    mismatch = identity_mismatch(metadata, module)
    if mismatch is not None:
        raise ConfigError(f"{what} does not fit this transformer: {mismatch}")
    return tensors, metadata
