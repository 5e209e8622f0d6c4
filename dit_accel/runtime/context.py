"""The step context: where the denoising loop is, for every hook of every technique.

A `StepTracker` is shared by all transformers of one pipeline (Wan 2.2 alternates two). It counts
steps from the calls the transformer receives, so it needs no cooperation from the scheduler: a call
with the same timestep and the same latents as the last one is another CFG branch of the same step,
any other call starts a new step (second-order schedulers such as Heun repeat a timestep with new
latents), and a run starts when the pipeline resets its scheduler (`begin_run`) or, for a bare
transformer, when the noise level goes back up.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    #: "cond" / "uncond" when the pipeline calls the transformer once per branch (Flux true-CFG, Wan,
    #: HunyuanVideo); "batched" when one call holds both halves (SD3, PixArt, DiT, CogVideoX); "single"
    #: when there is no CFG; "call<k>" for the k-th call of a step when the pipeline gives no name.
    branch: str
    call_in_step: int
    cfg_batched: bool
    call: CallInfo

    @property
    def is_first_call_of_step(self) -> bool:
        return self.call_in_step == 0


def _batch_halves_equal(latents: torch.Tensor) -> bool:
    """Batched CFG repeats the same latents for the uncond and cond halves."""
    half = latents.shape[0] // 2
    return latents.shape[0] % 2 == 0 and half > 0 and torch.equal(latents[:half], latents[half:])


class StepTracker:
    """Turns a sequence of transformer calls into (run, step, branch)."""

    def __init__(self) -> None:
        self.run_index = -1
        self.step_index = -1
        self.num_steps: int | None = None
        self._sigmas: list[float] | None = None
        self._pending: tuple[int | None, list[float] | None] | None = None
        self._last_timestep: float | None = None
        self._last_latents: torch.Tensor | None = None
        self._calls_in_step = 0

    def begin_run(self, num_steps: int | None = None, sigmas: list[float] | None = None) -> None:
        """Called when the pipeline sets up its scheduler: the next call starts step 0 of a new run."""
        self._pending = (num_steps, sigmas)

    def _same_latents(self, latents: torch.Tensor) -> bool:
        last = self._last_latents
        return latents is last or (last is not None and latents.shape == last.shape and torch.equal(latents, last))

    def on_call(self, call: CallInfo, branch_name: str | None) -> StepContext:
        timestep = float(torch.as_tensor(call.timestep).flatten()[0])
        noisier = self._last_timestep is not None and timestep > self._last_timestep
        if self._pending is not None or self._last_timestep is None or noisier:
            self.run_index += 1
            self.step_index, self._calls_in_step = 0, 0
            self.num_steps, self._sigmas = self._pending if self._pending is not None else (None, None)
            self._pending = None
        elif timestep == self._last_timestep and self._same_latents(call.latents):
            self._calls_in_step += 1
        else:
            self.step_index += 1
            self._calls_in_step = 0
        self._last_timestep, self._last_latents = timestep, call.latents

        cfg_batched = branch_name in (None, "cond_uncond") and _batch_halves_equal(call.latents)
        if branch_name in ("cond", "uncond"):
            branch = branch_name
        elif cfg_batched:
            branch = "batched"
        elif branch_name is None and self._calls_in_step == 0:
            branch = "single"
        else:
            branch = branch_name or f"call{self._calls_in_step}"
        sigma = None
        if self._sigmas is not None and self.step_index < len(self._sigmas):
            sigma = self._sigmas[self.step_index]
        return StepContext(self.run_index, self.step_index, self.num_steps, timestep, sigma, branch,
                           self._calls_in_step, cfg_batched, call)
