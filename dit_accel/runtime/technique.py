"""The base class every technique derives from; the session calls these methods."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ..attention.intercept import AttentionCore
from ..metrics.flops import BlockWork
from .context import StepContext

if TYPE_CHECKING:
    from ..config import AccelerationConfig
    from .session import Session


class Technique:
    """One technique bound to one transformer. Override what the technique needs."""

    def __init__(self, config: "AccelerationConfig", session: "Session"):
        self.config = config
        self.session = session
        self.adapter = session.adapter

    def attach(self) -> None:
        """Add hooks with `self.session.hooks.add(...)`; the session removes them."""

    def on_call_start(self, ctx: StepContext) -> None:
        """Before a transformer call (after the step context is known)."""

    def on_call_end(self, ctx: StepContext, output: torch.Tensor) -> torch.Tensor:
        """After a transformer call; may replace the output (same shape)."""
        return output

    def attention_core(self) -> AttentionCore | None:
        """An SDPA replacement for the self-attentions, or None."""
        return None

    def plan_work(self, ctx: StepContext, works: list[BlockWork]) -> list[BlockWork]:
        """What each block computed in the current call, for the FLOPs report."""
        return works

    def call_stats(self, ctx: StepContext) -> dict[str, Any]:
        """Per-call numbers for `report()` (e.g. tokens computed)."""
        return {}
