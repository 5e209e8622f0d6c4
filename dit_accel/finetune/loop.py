"""The distillation loop: the accelerated transformer learns the dense one's outputs at the same inputs.

Each training step draws one target call and `batch_size` of its samples from a generator seeded by
the step (every process draws the same); each process runs its share of those samples through the
plan, the loss is the mean squared error against the dense output summed over the samples and
divided by their number, plus the techniques' penalties (DyDiT's FLOPs constraint), and the gradients
are summed over the processes before the optimiser steps, so N processes take the steps one would.
The step runs under a diffusers cache context that names its place in the run, so every schedule of
the plan (densities, widths) sees the step it was recorded at. A checkpoint (the trainables, the
optimiser, the step and the time spent) is written every `checkpoint_every` steps and read back by a
fine-tune started again into the same folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks.hooks import CacheContext, _set_cache_context

from ..runtime.training import Trainable
from .targets import TargetCall, output_sample

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True)
class LoopSettings:
    steps: int | None
    minutes: float | None
    batch_size: int
    learning_rate: float
    checkpoint_every: int
    seed: int
    progress: bool


def _draw(targets: list[TargetCall], batch_size: int, seed: int) -> tuple[TargetCall, torch.Tensor]:
    """A target call and `batch_size` of its samples, drawn under `seed`."""
    generator = torch.Generator().manual_seed(seed)
    target = targets[int(torch.randint(len(targets), (1,), generator=generator))]
    rows = torch.randperm(target.rows, generator=generator)[:batch_size]
    return target, rows


class Distillation:
    """One fine-tune's optimiser, loop and checkpoints over `trainables` on `transformer`."""

    def __init__(self, transformer: torch.nn.Module, trainables: list[Trainable], targets: list[TargetCall],
                 settings: LoopSettings, accelerator: Any, out: Path, plan_text: str, flops_ratio=None):
        self.transformer, self.trainables, self.targets = transformer, trainables, targets
        self.settings, self.accelerator, self.out, self.plan_text = settings, accelerator, out, plan_text
        #: the ledger's FLOPs ratio of the last call (a callable), for the progress bar
        self.flops_ratio = flops_ratio
        self.parameters = [p for t in trainables for p in t.parameters()]
        self.optimizer = torch.optim.AdamW(self.parameters, lr=settings.learning_rate, weight_decay=0.0)
        self.step = 0
        self.seconds = 0.0
        self.losses: list[float] = []

    # -- checkpoints -------------------------------------------------------------------------------
    def _checkpoint(self) -> dict[str, Any]:
        return {"plan": self.plan_text, "step": self.step, "seconds": self.seconds, "losses": self.losses,
                "trainables": [t.state_dict() for t in self.trainables], "optimizer": self.optimizer.state_dict()}

    def save_checkpoint(self) -> None:
        if self.accelerator.is_main_process:
            path = self.out / CHECKPOINT
            torch.save(self._checkpoint(), path.with_suffix(".tmp"))
            path.with_suffix(".tmp").replace(path)

    def resume(self) -> bool:
        """Continue from the folder's checkpoint when it was written for this plan."""
        path = self.out / CHECKPOINT
        if not path.is_file():
            return False
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("plan") != self.plan_text:
            return False
        for trainable, saved in zip(self.trainables, state["trainables"], strict=True):
            trainable.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.seconds, self.losses = state["step"], state["seconds"], list(state["losses"])
        return True

    # -- training ----------------------------------------------------------------------------------
    def _done(self) -> bool:
        settings = self.settings
        if settings.steps is not None and self.step >= settings.steps:
            return True
        if settings.minutes is None:
            return False
        # every process stops at the same step: the slowest one's clock decides
        spent = self.accelerator.reduce(torch.tensor([self.seconds], device=self.accelerator.device), "max")
        return float(spent) >= settings.minutes * 60

    def train_step(self) -> float:
        """One optimiser step; the loss over every process's samples."""
        accelerator, settings = self.accelerator, self.settings
        step_seed = settings.seed * 1_000_003 + self.step
        target, rows = _draw(self.targets, settings.batch_size, step_seed)
        torch.manual_seed(step_seed)  # the same noise in every process
        mine = rows[accelerator.process_index::accelerator.num_processes]
        loss = torch.zeros((), device=accelerator.device)
        if len(mine):
            args, kwargs = target.inputs(mine, accelerator.device, next(self.transformer.parameters()).dtype)
            _set_cache_context(self.transformer, CacheContext(target.cache_name, target.step_index, target.num_steps))
            try:
                with accelerator.autocast():
                    output = output_sample(self.transformer(*args, **kwargs))
            finally:
                _set_cache_context(self.transformer, None)
            expected = target.output[mine].to(output.device, torch.float32)
            loss = (output.float() - expected).pow(2).flatten(1).mean(1).sum() / len(rows)
            for trainable in self.trainables:
                penalty = trainable.penalty()
                if penalty is not None:
                    loss = loss + penalty * len(mine) / len(rows)
        self.optimizer.zero_grad(set_to_none=False)
        if loss.requires_grad:
            loss.backward()
        if accelerator.num_processes > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.parameters]
            flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), "sum")
            for p, g in zip(self.parameters, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p)
            loss = accelerator.reduce(loss.detach(), "sum")
        self.optimizer.step()
        return float(loss.detach())

    def run(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(total=self.settings.steps, initial=self.step, desc="fine-tune", unit="step",
                   disable=not (self.settings.progress and self.accelerator.is_main_process))
        try:
            while not self._done():
                started = time.perf_counter()
                loss = self.train_step()
                self.step += 1
                self.seconds += time.perf_counter() - started
                self.losses.append(loss)
                shown = {"loss": f"{loss:.3g}"}
                if self.flops_ratio is not None:
                    shown["flops"] = f"{self.flops_ratio():.3f}"
                for trainable in self.trainables:
                    shown.update({k: f"{v:.3f}" for k, v in trainable.progress().items()})
                bar.set_postfix(shown, refresh=False)
                bar.update()
                if self.step % self.settings.checkpoint_every == 0:
                    self.save_checkpoint()
        finally:
            bar.close()
        self.save_checkpoint()
