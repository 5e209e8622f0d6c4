"""The distillation targets: the dense transformer's own calls along its sampling trajectories.

The pipeline runs dense on the user's prompts (no images needed); every transformer call is kept
with its inputs, its place in the run (step, step count, CFG branch) and its output. Those outputs
are what the accelerated transformer learns to give at the same inputs. Under several processes each
collects its share of the prompts and all of them end with every call (`gather`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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


def output_sample(result: Any) -> torch.Tensor:
    """The model output sample of a transformer call's result (a tuple or an output object)."""
    return result[0] if isinstance(result, tuple) else result.sample


def collect(pipe: Any, prompts: list[str], call_kwargs: dict[str, Any], seed: int) -> list[TargetCall]:
    """Every dense transformer call of one `pipe(prompt=prompts, **call_kwargs)` run under `seed`."""
    transformer = pipe.transformer
    calls: list[tuple[tuple, dict, torch.Tensor]] = []
    inputs: list[tuple[tuple, dict]] = []

    def before(module, args, kwargs):
        inputs.append((tuple(_to_cpu(a) for a in args), {k: _to_cpu(v) for k, v in kwargs.items()}))

    def after(module, args, kwargs, output):
        calls.append((*inputs.pop(), _to_cpu(output_sample(output))))

    hooks = [transformer.register_forward_pre_hook(before, with_kwargs=True),
             transformer.register_forward_hook(after, with_kwargs=True)]
    try:
        with apply(pipe) as handle:  # changes nothing: its step context places every call
            pipe(prompt=prompts, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
                 **call_kwargs)
            places = [(step["step"], call["num_steps"], call["branch"])
                      for step in handle.report()["steps"] for call in step["calls"]]
    finally:
        for hook in hooks:
            hook.remove()
    return [TargetCall(args, kwargs, step, steps, _CACHE_NAMES.get(branch, branch), output)
            for (args, kwargs, output), (step, steps, branch) in zip(calls, places, strict=True)]
