"""Shared test helpers: run a tiny pipeline deterministically and compare outputs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dit_accel.config import AccelerationConfig
from dit_accel.runtime.technique import Technique
from dit_accel.testing import tiny_call_kwargs


def run(pipe, family: str, **overrides) -> torch.Tensor:
    """One call of `pipe` with the family's default tiny arguments; the output as a tensor."""
    out = pipe(**tiny_call_kwargs(family, **overrides))
    images = out.frames if hasattr(out, "frames") else out.images
    return torch.as_tensor(images).float()


def model_state(module: torch.nn.Module) -> dict:
    """Everything apply() may touch: module identities, instance forwards, hook registries, processors."""
    state = {
        "modules": {name: id(m) for name, m in module.named_modules()},
        "forwards": sorted(name for name, m in module.named_modules() if "forward" in m.__dict__),
        "registries": sorted(name for name, m in module.named_modules() if hasattr(m, "_diffusers_hook")),
    }
    if hasattr(module, "attn_processors"):
        state["processors"] = {name: id(p) for name, p in module.attn_processors.items()}
    return state


class RecordingTechnique(Technique):
    """Records the step context of every call; changes nothing."""

    def on_call_start(self, ctx):
        self.config.seen.append(ctx)


@dataclass
class RecordingConfig(AccelerationConfig):
    """A no-op technique that lets tests read the step context."""

    seen: list = None
    name = "record"

    def __post_init__(self):
        self.seen = [] if self.seen is None else self.seen

    @classmethod
    def keep_all(cls):
        return cls()

    def build(self, session):
        return RecordingTechnique(self, session)


class AttentionRecorderTechnique(Technique):
    """An attention core that records the sequence lengths it sees, then runs the rest of the chain."""

    def attention_core(self):
        def record(call, query, key, value, next_sdpa, **kwargs):
            ctx = self.session.context
            image = call.image_slice(query.shape[2])
            self.config.seen.append({"step": ctx.step_index, "branch": ctx.branch, "block": call.block_index,
                                     "queries": query.shape[2], "keys": key.shape[2],
                                     "image_queries": image.stop - image.start, "batch": query.shape[0]})
            return next_sdpa(query, key, value, **kwargs)

        return record


@dataclass
class AttentionRecorderConfig(RecordingConfig):
    """Records q/k lengths of every self-attention; put it after the technique under test."""

    name = "attention-recorder"

    def build(self, session):
        return AttentionRecorderTechnique(self, session)
