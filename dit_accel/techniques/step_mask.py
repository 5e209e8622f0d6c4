"""A step mask as a plan member (stage 0, the schedule): compute the transformer only at chosen steps
and reuse each branch's last output at the others (cache-dit's static "steps computation mask").

The schedule runs every step; a masked step's call returns the output of the same CFG branch at the
last computed step, before any block or any other technique runs (the other techniques see only the
computed steps, and the ledger records nothing for a masked call, so its dense work counts as
skipped). `StepMaskConfig()` computes the first `first` steps, the last `last` and every `every`-th
between; `compute_steps` names them instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import ModelHook

from ..config import AccelerationConfig, ConfigError, Stage, param
from ..runtime.call_state import CallState
from ..runtime.registry import register_technique
from ..runtime.search_space import SearchContext, Setting
from ..runtime.stats import Stat, StatKind
from ..runtime.technique import Technique


@dataclass(frozen=True)
class StepMaskConfig(AccelerationConfig):
    """Which steps compute the transformer; the others reuse the last computed output."""

    every: int = param(2, "compute every every-th step between the first and the last ones", low=1)
    first: int = param(2, "steps computed at the start (the noisiest change most)", low=1)
    last: int = param(1, "steps computed at the end", low=0)
    compute_steps: tuple[int, ...] = param((), "the steps to compute (0-based), instead of every/first/last; "
                                                "step 0 is always computed", low=0)

    name = "stepmask"

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.SCHEDULE})

    @classmethod
    def keep_all(cls) -> "StepMaskConfig":
        return cls(every=1)

    def computes(self, step: int, num_steps: int | None) -> bool:
        """Whether `step` of `num_steps` computes the transformer (every step when the count is unknown)."""
        if step == 0:
            return True
        if self.compute_steps:
            return step in self.compute_steps
        if num_steps is None or step < self.first or step >= num_steps - self.last:
            return True
        return (step - self.first) % self.every == 0


def search_space(context: SearchContext) -> list[Setting]:
    """Every 2nd and every 3rd step after a short warm-up, as cache-dit's static masks."""
    first = max(1, math.ceil(context.steps * 0.1))
    return [Setting(f"stepmask:every={every},first={first}", (StepMaskConfig(every=every, first=first),))
            for every in (2, 3)]


class _ReuseOutput(ModelHook):
    """Outermost on the transformer: a masked call returns the branch's last output without running."""

    def __init__(self, technique: "StepMask"):
        super().__init__()
        self.technique = technique

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        call_state = self.technique.session.call_state
        reused = None if call_state is None else call_state.reused_output
        if reused is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return _as_output(reused, kwargs.get("return_dict", True))


def _as_output(sample: torch.Tensor, return_dict: bool) -> Any:
    from diffusers.models.modeling_outputs import Transformer2DModelOutput

    return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)


@register_technique(StepMaskConfig, "step mask: compute the transformer at chosen steps, reuse its output at "
                    "the others", search_space=search_space)
class StepMask(Technique):
    stats = (Stat("step_computed", StatKind.VALUE),)

    def __init__(self, config: StepMaskConfig, session):
        super().__init__(config, session)
        #: each branch's last computed output (the model's output, after every other technique's end_call)
        self.outputs: dict[str, torch.Tensor] = {}

    def attach(self) -> None:
        if self.config.compute_steps and 0 not in self.config.compute_steps:
            raise ConfigError(f"{self.label}: compute_steps must include step 0 (nothing to reuse before it)")
        self.session.hooks.add(self.session.transformer, _ReuseOutput(self), "step_mask")

    def begin_call(self, call_state: CallState) -> None:
        ctx = call_state.ctx
        last = self.outputs.get(ctx.slot)
        if not self.config.computes(ctx.step_index, ctx.num_steps) and last is not None \
                and last.shape[0] == ctx.call.batch_size:
            call_state.reused_output = last

    def end_call(self, call_state: CallState, output: torch.Tensor) -> torch.Tensor:
        if call_state.reused_output is None:
            self.outputs[call_state.ctx.slot] = output
        return output

    def end_run(self) -> None:
        self.outputs.clear()

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.outputs.values())

    def call_stats(self, call_state: CallState) -> dict[str, Any]:
        return {"step_computed": float(call_state.reused_output is None)}
