"""Fewer steps as a plan member (stage 0, the schedule): the simplest thing a user could do instead of
any plan, so every table and every tuned plan is measured against it.

`StepsConfig(count=11)` (plan `steps:count=11`) or `StepsConfig(ratio=0.5)` makes the pipeline's
scheduler set up that many steps instead of the call's `num_inference_steps`: the handle hands the
scheduler's `set_timesteps` arguments to `timesteps_arguments`, which rewrites the step count (and a
schedule the pipeline wrote out as `sigmas` or `timesteps`, resampled over the same range; Flux's
`linspace(1, 1/n, n)` becomes exactly the pipeline's own for the new count). Everything downstream
follows the steps that run: the step context counts them, RAS's and FlexDiT's schedules and DyDiT's
buckets are fractions of them, and a plan string's schedules are scaled to them (`plan_spec`). The
report's dense work is the call's own steps, so `flops_ratio` counts the steps not run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..config import AccelerationConfig, ConfigError, Stage, param
from ..runtime.context import asked_steps
from ..runtime.registry import register_technique
from ..runtime.search_space import SearchContext, Setting
from ..runtime.stats import Stat, StatKind
from ..runtime.technique import Technique


@dataclass(frozen=True)
class StepsConfig(AccelerationConfig):
    """Run the scheduler with fewer steps: `count` of them, or `ratio` of the call's."""

    count: int | None = param(None, "steps to run; None: ratio x the call's steps", low=1)
    ratio: float = param(0.5, "share of the call's steps to run (rounded, at least 1), where count is None",
                         low=0.0, high=1.0, low_open=True)

    name = "steps"

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.SCHEDULE})

    @classmethod
    def keep_all(cls) -> "StepsConfig":
        return cls(ratio=1.0)

    def steps_run(self, num_steps: int | None) -> int | None:
        """The steps that run when the call asks for `num_steps` (None: unknown yet)."""
        if self.count is not None or num_steps is None:
            return self.count
        return max(1, round(self.ratio * num_steps))


def _resampled(schedule: Any, count: int) -> Any:
    """`schedule` (a decreasing sequence of sigmas or timesteps, one per step) at `count` points over its
    range; `linspace(1, 1/n, n)` (the flow-matching pipelines' own) becomes `linspace(1, 1/count, count)`."""
    values = np.asarray(schedule.detach().cpu() if isinstance(schedule, torch.Tensor) else schedule, dtype=np.float64)
    n = len(values)
    if n == count:
        return schedule
    if np.allclose(values, np.linspace(1.0, 1.0 / n, n)):
        resampled = np.linspace(1.0, 1.0 / count, count)
    else:
        resampled = np.interp(np.linspace(0, n - 1, count), np.arange(n), values)
    if isinstance(schedule, torch.Tensor):
        return torch.as_tensor(resampled, dtype=schedule.dtype, device=schedule.device)
    if isinstance(schedule, np.ndarray):
        return resampled.astype(schedule.dtype)
    return [type(schedule[0])(v) if isinstance(schedule[0], int) else float(v) for v in resampled]


def search_space(context: SearchContext) -> list[Setting]:
    """Three quarters and half of the call's steps, one knob: its boldest count that still holds the target
    goes to fewer steps (a fifth fewer each time) until one fails, so `tune` finds about the fewest steps
    that hold, every plan's first competitor."""

    def setting(count: int) -> Setting:
        fewer = count - max(1, count // 5)
        return Setting(f"steps:count={count}", (StepsConfig(count=count),), knob="steps",
                       bolder=lambda: setting(fewer) if fewer >= 1 else None)

    counts = dict.fromkeys(max(1, round(context.steps * share)) for share in (0.75, 0.5))
    return [setting(count) for count in counts if count < context.steps]


@register_technique(StepsConfig, "fewer steps: run the scheduler with fewer steps than the call asks",
                    search_space=search_space)
class FewerSteps(Technique):
    rewrites_schedule = True
    stats = (Stat("steps_requested", StatKind.DETAIL), Stat("steps_run", StatKind.DETAIL))

    def __init__(self, config: StepsConfig, session):
        super().__init__(config, session)
        #: (steps the call asked for, steps that run) of the run being set up
        self._counts: tuple[int, int] | None = None

    def timesteps_arguments(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The scheduler's `set_timesteps` arguments with the step count this plan runs."""
        asked = asked_steps(arguments)
        if asked is None:
            raise ConfigError(f"{self.label}: the scheduler's set_timesteps was called without a step count")
        count = self.config.steps_run(asked)
        self._counts = (asked, count)
        rewritten = dict(arguments)
        if arguments.get("num_inference_steps") is not None:
            rewritten["num_inference_steps"] = count
        for key in ("sigmas", "timesteps"):
            if arguments.get(key) is not None:
                rewritten[key] = _resampled(arguments[key], count)
        return rewritten

    def call_stats(self, call_state) -> dict[str, Any]:
        if self._counts is None:
            return {}
        return {"steps_requested": self._counts[0], "steps_run": self._counts[1]}
