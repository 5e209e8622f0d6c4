"""The distillation targets: the dense transformer's own calls along its sampling trajectories.

The pipeline runs dense on the user's prompts (no images needed); every transformer call is kept
with its inputs, its place in the run (step, step count, CFG branch) and its output. Those outputs
are what the accelerated transformer learns to give at the same inputs. Under several processes each
collects its share of the prompts and all of them end with every call (`gather`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..api import apply

#: the cache-context name of a call, by the branch the step context gave it
_CACHE_NAMES = {"batched": "cond_uncond", "single": "cond", "call0": "cond", "call1": "uncond"}


@dataclass
class TargetCall:
    """One dense transformer call: its positional and keyword inputs (tensors on the CPU), where it ran
    and what it returned (the model output sample, on the CPU)."""

    args: tuple
    kwargs: dict[str, Any]
    step_index: int
    num_steps: int | None
    cache_name: str
    output: torch.Tensor

    @property
    def rows(self) -> int:
        return self.output.shape[0]

    def inputs(self, rows: torch.Tensor, device: torch.device, dtype: torch.dtype) -> tuple[tuple, dict[str, Any]]:
        """The call's inputs for the samples `rows`, on `device` (floating tensors in `dtype`)."""

        def take(value):
            if not isinstance(value, torch.Tensor):
                return value
            if value.ndim and value.shape[0] == self.rows:
                value = value[rows]
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)

        return tuple(take(a) for a in self.args), {k: take(v) for k, v in self.kwargs.items()}

    def record(self) -> dict[str, Any]:
        return {"args": list(self.args), "kwargs": self.kwargs, "step_index": self.step_index,
                "num_steps": self.num_steps, "cache_name": self.cache_name, "output": self.output}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TargetCall:
        return cls(tuple(record["args"]), record["kwargs"], record["step_index"], record["num_steps"],
                   record["cache_name"], record["output"])


def _to_cpu(value: Any) -> Any:
    return value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value


def collect(pipe: Any, prompts: list[str], call_kwargs: dict[str, Any], batch_size: int, seed: int,
            on_batch: Callable[[int], None] = lambda done: None) -> list[TargetCall]:
    """Every dense transformer call of `pipe(prompt=batch, **call_kwargs)` over `prompts`, `batch_size`
    prompts at a time, each batch under its own seed (`seed` + its first prompt's index)."""
    transformer = pipe.transformer
    calls: list[tuple[tuple, dict, torch.Tensor]] = []
    inputs: list[tuple[tuple, dict]] = []

    def before(module, args, kwargs):
        inputs.append((tuple(_to_cpu(a) for a in args), {k: _to_cpu(v) for k, v in kwargs.items()}))

    def after(module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        calls.append((*inputs.pop(), _to_cpu(sample)))

    targets: list[TargetCall] = []
    hooks = [transformer.register_forward_pre_hook(before, with_kwargs=True),
             transformer.register_forward_hook(after, with_kwargs=True)]
    try:
        for start in range(0, len(prompts), batch_size):
            with apply(pipe) as handle:  # changes nothing: its step context places every call
                generator = torch.Generator("cpu").manual_seed(seed + start)
                pipe(prompt=prompts[start:start + batch_size], generator=generator, output_type="latent",
                     **call_kwargs)
                places = [(step["step"], call["num_steps"], call["branch"])
                          for step in handle.report()["steps"] for call in step["calls"]]
            for (args, kwargs, output), (step, steps, branch) in zip(calls, places, strict=True):
                targets.append(TargetCall(args, kwargs, step, steps, _CACHE_NAMES.get(branch, branch), output))
            calls.clear()
            on_batch(min(start + batch_size, len(prompts)))
    finally:
        for hook in hooks:
            hook.remove()
    return targets
