"""LoRA adapters (peft) on chosen linears of a transformer, as a technique fine-tunes and loads them.

`LoraAdapters.inject` puts peft's LoRA layers on the named `nn.Linear`s (under one adapter name of
dit-accel's own) for training; `unload` puts every original linear back and restores the
`requires_grad` flags and attributes peft changed, so the model is as it was, bit for bit. Trained
adapters run merged (`MergedAdapters`, `MergedLinear`): a hook on each target linear uses a copy of its
weight plus B A, so inference costs what the plain linear does and the model is never changed. The file (`save_adapters` /
`load_adapters`) is safetensors: the adapters' weights, with the transformer's identity
(`models/identity.py`: refused for another checkpoint), the rank, and the config they were trained for.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn

from ..config import ConfigError
from ..models.identity import load_for_model, save_for_model

#: safetensors metadata "format" of an adapters file
ADAPTERS_FORMAT = "dit-accel lora adapters 1"
#: peft's adapter name for dit-accel's adapters
ADAPTER_NAME = "dit_accel"


def _peft():
    try:
        import peft
    except ImportError as error:
        raise ConfigError("LoRA adapters need peft: pip install 'dit-accel[finetune]'") from error
    return peft


def _linears(transformer: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The linears adapters go on, by name; a `ConfigError` for one that is not a plain `nn.Linear`."""
    linears = {name: transformer.get_submodule(name) for name in targets}
    for name, linear in linears.items():
        if type(linear) is not nn.Linear:
            raise ConfigError(f"LoRA adapters go on nn.Linear layers; {name} is a {type(linear).__name__} (a LoRA "
                              "loaded already? fuse it first: pipe.fuse_lora())")
    return linears


class LoraAdapters:
    """LoRA layers on `targets` (qualified names of `nn.Linear`s in `transformer`)."""

    def __init__(self, transformer: nn.Module, targets: list[str], rank: int):
        self.transformer, self.targets, self.rank = transformer, sorted(targets), rank
        self._requires_grad: dict[str, bool] = {}
        self._had_config = False
        #: the adapters' parameters, once injected
        self.parameters: list[nn.Parameter] = []
        #: whether the adapters run (`enable`)
        self.enabled = True

    def inject(self) -> None:
        """Wrap every target in a LoRA layer (B = 0: the model's output is unchanged)."""
        peft = _peft()
        _linears(self.transformer, self.targets)
        self._requires_grad = {name: p.requires_grad for name, p in self.transformer.named_parameters()}
        self._had_config = "peft_config" in vars(self.transformer)
        config = peft.LoraConfig(r=self.rank, lora_alpha=self.rank, target_modules=self.targets)
        peft.inject_adapter_in_model(config, self.transformer, adapter_name=ADAPTER_NAME)
        self.parameters = [p for name, p in self.transformer.named_parameters() if f".{ADAPTER_NAME}." in name]

    def enable(self, enabled: bool) -> None:
        """Run the adapters (`enabled`: trainable) or the plain linears."""
        if enabled != self.enabled:
            for name in self.targets:
                self.transformer.get_submodule(name).enable_adapters(enabled)
            self.enabled = enabled

    def state(self) -> dict[str, torch.Tensor]:
        """The adapters' weights: "<target>.lora_A" / "<target>.lora_B"."""
        state = {}
        for name in self.targets:
            layer = self.transformer.get_submodule(name)
            state[f"{name}.lora_A"] = layer.lora_A[ADAPTER_NAME].weight.detach()
            state[f"{name}.lora_B"] = layer.lora_B[ADAPTER_NAME].weight.detach()
        return state

    def unload(self) -> None:
        """Every target back to its own linear, flags and attributes as before `inject`."""
        for name in self.targets:
            parent_name, _, attribute = name.rpartition(".")
            parent = self.transformer.get_submodule(parent_name) if parent_name else self.transformer
            layer = getattr(parent, attribute)
            base = getattr(layer, "base_layer", None)
            if base is not None:
                setattr(parent, attribute, base)
        if not self._had_config:
            vars(self.transformer).pop("peft_config", None)
        else:
            self.transformer.peft_config.pop(ADAPTER_NAME, None)
        for name, parameter in self.transformer.named_parameters():
            if name in self._requires_grad:
                parameter.requires_grad_(self._requires_grad[name])
        self.parameters = []


class MergedAdapters:
    """Trained adapters as inference runs them: per target linear a copy of its weight plus B A (the model's
    own weight is never written), which `MergedLinear` uses while `active`: a linear's cost, no LoRA layers."""

    def __init__(self, transformer: nn.Module, state: dict[str, torch.Tensor]):
        self.linears = _linears(transformer, adapter_targets(state))
        #: per target, B A in fp32 on the CPU
        self.deltas = {name: state[f"{name}.lora_B"].float() @ state[f"{name}.lora_A"].float() for name in self.linears}
        self._merged: dict[str, torch.Tensor] = {}
        #: whether this call runs the merged weights (the steps that pool)
        self.active = False

    def weight(self, name: str, linear: nn.Linear) -> torch.Tensor:
        """The merged weight of target `name`, made once per device and dtype of the linear's weight."""
        merged = self._merged.get(name)
        weight = linear.weight
        if merged is None or merged.device != weight.device or merged.dtype != weight.dtype:
            delta = self.deltas[name].to(weight.device)
            merged = self._merged[name] = (weight.detach().float() + delta).to(weight.dtype)
        return merged

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._merged.values())

    def weight_elements(self) -> int:
        return sum(linear.weight.numel() for linear in self.linears.values())


class MergedLinear(ModelHook):
    """A target linear on its merged weight while the adapters are active, else as it is."""

    def __init__(self, adapters: MergedAdapters, name: str):
        super().__init__()
        self.adapters, self.name = adapters, name

    def new_forward(self, module, x):
        if not self.adapters.active:
            return self.fn_ref.original_forward(x)
        return F.linear(x, self.adapters.weight(self.name, module), module.bias)


def save_adapters(path: str | Path, adapters: LoraAdapters, identity: dict[str, str], trained_for: dict[str, Any],
                  details: dict[str, Any]) -> None:
    """Write `adapters` with the transformer's `identity` (taken before the LoRA layers went on) and the
    config fields they were `trained_for`."""
    save_for_model(path, adapters.state(), identity, ADAPTERS_FORMAT, rank=str(adapters.rank),
                   trained_for=json.dumps(trained_for, sort_keys=True), details=json.dumps(details))


def load_adapters(path: str | Path, transformer: nn.Module, what: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(weights, metadata) of an adapters file, refused with a `ConfigError` for another model (`what`
    names the config field, for the messages)."""
    state, metadata = load_for_model(path, transformer, ADAPTERS_FORMAT, f"{what} {str(path)!r}")
    return state, {**metadata, "trained_for": json.loads(metadata["trained_for"])}


def adapter_targets(state: dict[str, torch.Tensor]) -> list[str]:
    """The linears a file's weights go on."""
    return sorted({key.rsplit(".", 1)[0] for key in state})
