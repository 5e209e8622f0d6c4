"""The step context: where the denoising loop is, for every hook of every technique.

A `StepTracker` is shared by all transformers of one pipeline (Wan 2.2 alternates two). It places
each call by the scheduler's own position: diffusers schedulers count the evaluations they took in
`step_index` (a second-order scheduler such as Heun takes two per step, at repeated timesteps), so
every call between two `scheduler.step()`s belongs to one step of the schedule, whatever their batch
(batched or two-call CFG, skip-layer guidance's third call). A scheduler without `step_index` (DDIM)
is placed by where the call's timestep sits in its timesteps. A diffusers `CacheContext` with a
step index, step count or sigma wins over both. A run starts when the pipeline resets its scheduler
(`begin_run`) or the position goes back. The step count and sigmas of a run come from the scheduler
at the run's first call, from its begin index on, so img2img (`strength < 1`) counts the steps it
really runs.

A bare transformer (no scheduler) counts on its own: a call at the timestep of the previous call
with the same latents tensor is another branch of that step, any other call starts a new step, and
a noisier call starts a new run. The tracker keeps no tensor of the caller's (a weak reference).
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..models.base import CallInfo


@dataclass(frozen=True)
class StepContext:
    """What one transformer call knows about the loop around it."""

    run_index: int
    step_index: int
    num_steps: int | None
    timestep: float
    sigma: float | None
    #: "cond" / "uncond" when the pipeline names its calls (Flux true-CFG, Wan, HunyuanVideo); "batched"
    #: when one call holds both CFG halves (SD3, PixArt, DiT, CogVideoX); "single" for the only call of
    #: a step without CFG; "call<k>" for the k-th unnamed call of a step
    branch: str
    call_in_step: int
    #: the batch holds the uncond half then the cond half of the same samples
    cfg_batched: bool
    call: CallInfo
    #: the steps the pipeline asked its scheduler for, where a stage-0 plan runs another count (fewer
    #: steps); else None
    requested_steps: int | None = None

    @property
    def is_first_call_of_step(self) -> bool:
        return self.call_in_step == 0

    @property
    def slot(self) -> str:
        """The same branch at every step: its cache-context name, or its position among the step's calls
        (what a technique keys its per-branch state by; `branch` may change once a run's batched-CFG
        guess is revised)."""
        unnamed = self.branch in ("batched", "single") or self.branch.startswith("call")
        return f"call{self.call_in_step}" if unnamed else self.branch

    @property
    def cache_name(self) -> str:
        """The diffusers cache-context name this call would get from a pipeline that opens one."""
        if self.branch == "batched":
            return "cond_uncond"
        if self.branch in ("single", "call0"):
            return "cond"
        return "uncond" if self.branch == "call1" else self.branch

    def without_tensors(self) -> StepContext:
        """This context less its call's timestep and latents tensors, for what outlives the call (the
        ledger's records)."""
        return dataclasses.replace(self, call=dataclasses.replace(self.call, timestep=None, latents=None))


class SchedulerClock:
    """Reads a pipeline's scheduler (looked up at every call, so a scheduler swapped after `apply()` is
    read too): the schedule of a run, and which evaluation of it a call belongs to."""

    def __init__(self, scheduler_of: Callable[[], Any]):
        self._scheduler_of = scheduler_of
        self._begin = 0
        self._last = 0

    def _timesteps(self, scheduler: Any) -> list[float] | None:
        timesteps = getattr(scheduler, "timesteps", None)
        return None if timesteps is None else [float(t) for t in timesteps]

    def schedule(self, timestep: float) -> tuple[int | None, list[float] | None]:
        """(steps, sigmas) of the run that starts at a call with `timestep`: from the scheduler's begin
        index (img2img), else from where `timestep` sits in its timesteps."""
        scheduler = self._scheduler_of()
        values = self._timesteps(scheduler)
        self._begin = self._last = 0
        if values is None:
            return None, None
        begin = getattr(scheduler, "begin_index", None)
        self._begin = begin if begin is not None else (_find(values, timestep, 0) or 0)
        sigmas = getattr(scheduler, "sigmas", None)
        steps = len(values) - self._begin
        return steps, None if sigmas is None else [float(s) for s in sigmas[self._begin:self._begin + steps]]

    def position(self, timestep: float) -> int | None:
        """The run-relative index of the evaluation a call at `timestep` belongs to (None: unknown)."""
        scheduler = self._scheduler_of()
        if scheduler is None:
            return None
        if hasattr(type(scheduler), "step_index") or hasattr(scheduler, "_step_index"):
            taken = getattr(scheduler, "step_index", None)
            self._last = 0 if taken is None else taken - self._begin
            return self._last
        values = self._timesteps(scheduler)
        found = None if values is None else _find(values, timestep, self._begin + self._last)
        if found is None:
            return None
        self._last = found - self._begin
        return self._last


def _find(values: list[float], timestep: float, start: int) -> int | None:
    return next((i for i in range(start, len(values))
                 if abs(values[i] - timestep) <= 1e-3 * max(1.0, abs(values[i]))), None)


def _halves_equal(latents: torch.Tensor) -> bool:
    half = latents.shape[0] // 2
    return latents.shape[0] % 2 == 0 and half > 0 and torch.equal(latents[:half], latents[half:])


class StepTracker:
    """Turns a sequence of transformer calls into (run, step, branch)."""

    def __init__(self, clock: SchedulerClock | None = None, cfg_hint: Callable[[], bool | None] | None = None):
        #: the pipeline's scheduler (None for a bare transformer)
        self._clock = clock
        #: the pipeline's own "does this call batch CFG" when it says so (None: not known)
        self._cfg_hint = cfg_hint
        self.run_index = -1
        self.step_index = -1
        self.num_steps: int | None = None
        self._sigmas: list[float] | None = None
        self._pending = False
        self._last_timestep: float | None = None
        self._last_latents: weakref.ref | None = None
        self._calls_in_step = 0
        #: the batch size of the step's first call: a call of another size (skip-layer guidance's cond-only
        #: call beside a batched CFG call) is its own branch
        self._step_batch = 0
        #: this run's batched-CFG verdict: revised to False once a call's halves differ
        self._cfg_batched: bool | None = None
        #: the step count the pipeline asked for, where the plan runs another (`begin_run`)
        self._requested_steps: int | None = None

    def guided(self) -> bool | None:
        """Whether the running pipeline call runs CFG, where the pipeline says so (None: not known)."""
        return self._cfg_hint() if self._cfg_hint is not None else None

    def begin_run(self, requested_steps: int | None = None) -> None:
        """Called when the pipeline sets up its scheduler: the next call starts step 0 of a new run;
        `requested_steps`: the count the pipeline asked for, where the plan's schedule stage runs another."""
        self._pending = True
        self._requested_steps = requested_steps

    def end_run(self) -> None:
        """The pipeline call is over: forget the last latents."""
        self._last_latents = None

    def _batched(self, latents: torch.Tensor, named: bool) -> bool:
        if self._calls_in_step == 0:
            self._step_batch = latents.shape[0]
        if named or latents.shape[0] != self._step_batch:
            return False
        hint = self._cfg_hint() if self._cfg_hint is not None else None
        if hint is not None:
            return hint and latents.shape[0] % 2 == 0
        if self._cfg_batched is None or self._cfg_batched:
            self._cfg_batched = _halves_equal(latents)
        return self._cfg_batched

    def _place(self, timestep: float, latents: torch.Tensor, cache_context: Any | None) -> None:
        """Advance (run, step, call in step) to this call."""
        given = getattr(cache_context, "step_index", None)
        position = int(given) if given is not None else (
            self._clock.position(timestep) if self._clock is not None else None)
        if position is not None:
            new_run = self._pending or self._last_timestep is None or position < self.step_index
            same_step = position == self.step_index
        else:
            new_run = self._pending or self._last_timestep is None or timestep > self._last_timestep
            same_latents = self._last_latents is not None and self._last_latents() is latents
            same_step = timestep == self._last_timestep and same_latents
        if new_run:
            self.run_index += 1
            self._calls_in_step, self._cfg_batched, self._pending = 0, None, False
            self.num_steps, self._sigmas = self._clock.schedule(timestep) if self._clock else (None, None)
            if self._clock is not None and given is None:  # the clock's origin is the run's begin index now
                position = self._clock.position(timestep)
            self.step_index = position or 0
        elif same_step:
            self._calls_in_step += 1
        else:
            self.step_index = self.step_index + 1 if position is None else position
            self._calls_in_step = 0
        self._last_timestep = timestep
        self._last_latents = weakref.ref(latents)

    def on_call(self, call: CallInfo, cache_context: Any | None) -> StepContext:
        """The step context of a call; `cache_context` is the diffusers `CacheContext` the pipeline opened."""
        timestep = float(call.timestep.reshape(-1)[0])
        self._place(timestep, call.latents, cache_context)
        name = getattr(cache_context, "name", None)
        named = name not in (None, "cond_uncond")
        cfg_batched = self._batched(call.latents, named)
        if named:
            branch = name
        elif cfg_batched:
            branch = "batched"
        elif self._calls_in_step == 0 and name is None:
            branch = "single"
        else:
            branch = f"call{self._calls_in_step}"
        step_index, num_steps = self.step_index, self.num_steps
        sigma = self._sigmas[step_index] if self._sigmas is not None and 0 <= step_index < len(self._sigmas) else None
        if getattr(cache_context, "sigma", None) is not None:
            sigma = float(cache_context.sigma)
        if getattr(cache_context, "num_inference_steps", None) is not None:
            num_steps = int(cache_context.num_inference_steps)
        return StepContext(self.run_index, step_index, num_steps, timestep, sigma, branch, self._calls_in_step,
                           cfg_batched, call, self._requested_steps)


def asked_steps(arguments: dict[str, Any]) -> int | None:
    """The step count a scheduler's `set_timesteps(**arguments)` sets up: the length of the `sigmas` or
    `timesteps` given, else `num_inference_steps`."""
    schedule = next((arguments[k] for k in ("sigmas", "timesteps") if arguments.get(k) is not None), None)
    count = len(schedule) if schedule is not None else arguments.get("num_inference_steps")
    return None if count is None else int(count)
