"""The step context: where the denoising loop is, for every hook of every technique.

A `StepTracker` is shared by all transformers of one pipeline (Wan 2.2 alternates two). It counts
steps from the calls the transformer receives, so it needs no cooperation from the scheduler: a call
with the same timestep and the same latents as the last one is another branch of the same step (CFG,
skip-layer guidance), any other call starts a new step (second-order schedulers such as Heun repeat
a timestep with new latents, and each scheduler timestep is a step), and a run starts when the
pipeline resets its scheduler (`begin_run`) or, for a bare transformer, when the noise level goes
back up. Where the pipeline passes diffusers' `CacheContext` with a step index, step count or sigma,
those win. The step count and sigmas of a run come from the scheduler at the run's first call, from
its begin index on, so img2img (`strength < 1`) counts the steps it really runs.

The tracker keeps no tensor of the caller's: it remembers the last latents by a weak reference and
a 64-value fingerprint.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..models.base import CallInfo

#: (num_steps, sigmas) of the run that starts at a call with this timestep
Schedule = Callable[[float], tuple[int | None, list[float] | None]]


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


def _fingerprint(latents: torch.Tensor) -> torch.Tensor:
    flat = latents.detach().reshape(-1)
    stride = max(1, flat.numel() // 64)
    return flat[::stride][:64].float().cpu()


def _halves_equal(latents: torch.Tensor) -> bool:
    half = latents.shape[0] // 2
    return latents.shape[0] % 2 == 0 and half > 0 and torch.equal(latents[:half], latents[half:])


class StepTracker:
    """Turns a sequence of transformer calls into (run, step, branch)."""

    def __init__(self, schedule: Schedule | None = None, cfg_hint: Callable[[], bool | None] | None = None):
        #: the pipeline's scheduler, read at a run's first call
        self._schedule = schedule
        #: the pipeline's own "does this call batch CFG" when it says so (None: not known)
        self._cfg_hint = cfg_hint
        self.run_index = -1
        self.step_index = -1
        self.num_steps: int | None = None
        self._sigmas: list[float] | None = None
        self._pending = False
        self._last_timestep: float | None = None
        self._last_latents: weakref.ref | None = None
        self._last_fingerprint: torch.Tensor | None = None
        self._calls_in_step = 0
        #: this run's batched-CFG verdict: revised to False once a call's halves differ
        self._cfg_batched: bool | None = None

    def begin_run(self) -> None:
        """Called when the pipeline sets up its scheduler: the next call starts step 0 of a new run."""
        self._pending = True

    def end_run(self) -> None:
        """The pipeline call is over: forget the last latents."""
        self._last_latents = None
        self._last_fingerprint = None

    def _same_latents(self, latents: torch.Tensor, fingerprint: torch.Tensor) -> bool:
        if self._last_latents is not None and self._last_latents() is latents:
            return True
        return self._last_fingerprint is not None and torch.equal(fingerprint, self._last_fingerprint)

    def _batched(self, latents: torch.Tensor, named: bool) -> bool:
        if named:
            return False
        hint = self._cfg_hint() if self._cfg_hint is not None else None
        if hint is not None:
            return hint and latents.shape[0] % 2 == 0
        if self._cfg_batched is None or self._cfg_batched:
            self._cfg_batched = _halves_equal(latents)
        return self._cfg_batched

    def on_call(self, call: CallInfo, cache_context: Any | None) -> StepContext:
        """The step context of a call; `cache_context` is the diffusers `CacheContext` the pipeline opened."""
        timestep = float(call.timestep.reshape(-1)[0])
        fingerprint = _fingerprint(call.latents)
        noisier = self._last_timestep is not None and timestep > self._last_timestep
        if self._pending or self._last_timestep is None or noisier:
            self.run_index += 1
            self.step_index, self._calls_in_step, self._cfg_batched = 0, 0, None
            self.num_steps, self._sigmas = self._schedule(timestep) if self._schedule else (None, None)
            self._pending = False
        elif timestep == self._last_timestep and self._same_latents(call.latents, fingerprint):
            self._calls_in_step += 1
        else:
            self.step_index += 1
            self._calls_in_step = 0
        self._last_timestep = timestep
        self._last_latents = weakref.ref(call.latents)
        self._last_fingerprint = fingerprint

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
        sigma = self._sigmas[step_index] if self._sigmas is not None and step_index < len(self._sigmas) else None
        given_step = getattr(cache_context, "step_index", None)
        if given_step is not None:
            step_index = int(given_step)
            num_steps = getattr(cache_context, "num_inference_steps", None) or num_steps
            given_sigma = getattr(cache_context, "sigma", None)
            sigma = sigma if given_sigma is None else given_sigma
        return StepContext(self.run_index, step_index, num_steps, timestep, sigma, branch, self._calls_in_step,
                           cfg_batched, call)
