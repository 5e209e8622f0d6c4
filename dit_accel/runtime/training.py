"""What a technique trains in a self-distillation fine-tune (`dit_accel.finetune`).

A technique that can learn something (`Technique.trains` says what, in words) returns a `Trainable`
from `start_training()` on its applied plan: the parameters to optimise, an optional penalty its
calls add to the distillation loss (DyDiT's FLOPs-ratio constraint), the numbers a progress bar
shows, the state a checkpoint keeps, and `save`, which writes the trained file (with the model's
identity) and returns the config that reads it. The fine-tune loop knows no technique by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


def changed_fields(trained_for: dict[str, Any], now: dict[str, Any]) -> str | None:
    """How the config fields a file was `trained_for` differ from the config's `now` ("field=old (now
    new), ..."), or None when they do not."""
    changed = [f"{k}={trained_for.get(k)!r} (now {now.get(k)!r})" for k in sorted(set(trained_for) | set(now))
               if trained_for.get(k) != now.get(k)]
    return ", ".join(changed) or None


@dataclass(frozen=True)
class TrainingSettings:
    """What a fine-tune asks of every technique it trains."""

    #: rank of LoRA adapters (FlexDiT)
    lora_rank: int = 8
    #: the FLOPs-ratio constraint's weight in the loss (DyDiT's routers)
    flops_weight: float = 1.0


class Trainable:
    """One technique's trainable part, live on its transformer while the handle is applied."""

    def parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def learns_at(self, step_index: int, num_steps: int | None) -> bool:
        """Whether a call at this step trains anything (a step the plan runs dense may not)."""
        return True

    def penalty(self) -> torch.Tensor | None:
        """A loss term from the call that just ran (added to the distillation loss), or None."""
        return None

    def progress(self) -> dict[str, float]:
        """Numbers for the progress bar (e.g. the FLOPs ratio the routers give now)."""
        return {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {str(i): p.detach().clone() for i, p in enumerate(self.parameters())}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for i, parameter in enumerate(self.parameters()):
                parameter.copy_(state[str(i)])

    def save(self, directory: Path, details: dict[str, Any]) -> Any:
        """Write the trained file into `directory` (`details`: how it was trained, kept in its metadata)
        and return the config that reads it."""
        raise NotImplementedError

    def stop(self) -> None:
        """Training is over: the technique goes back to what it was before `start_training`."""
