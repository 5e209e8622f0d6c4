"""The call state: what one transformer call computes, read and written by every stage.

It lives on the session for the duration of one call and holds the step context, the image tokens
the blocks compute (stage 2's `TokenSelection`), how many tokens the running block sees, and the work
ledger of the call, and what stage 4 narrowed. Nothing in it outlives the call.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..metrics.flops import UnitWidth, Work
from ..models.base import TokenGrid
from .context import StepContext


@dataclass(frozen=True)
class TokenSelection:
    """The image tokens the blocks compute: sorted indices per sample (B, n), or (n,) shared by the batch."""

    index: torch.Tensor
    grid: TokenGrid

    @property
    def count(self) -> int:
        return self.index.shape[-1]

    @property
    def shared(self) -> bool:
        return self.index.ndim == 1

    def coordinates(self) -> torch.Tensor:
        """(..., n, 3) frame, row, col of every present token on the call's grid."""
        rows_cols = self.grid.rows * self.grid.cols
        index = self.index
        return torch.stack([index // rows_cols, (index % rows_cols) // self.grid.cols, index % self.grid.cols], -1)


@dataclass
class CallState:
    """One transformer call: its context, the tokens its blocks compute, and its ledger."""

    ctx: StepContext
    #: image tokens the blocks compute this call (stage 2); None: all of them
    tokens: TokenSelection | None = None
    #: image tokens the block running now computes
    image_tokens: int = 0
    #: (block, unit) -> what stage 4 runs of that unit this call; absent: all of it
    widths: dict[tuple[int, str], UnitWidth] = field(default_factory=dict)
    ledger: list[Work] = field(default_factory=list)
    #: stage 0 (a step mask): the output this call returns without running; no other stage acts then
    reused_output: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.image_tokens = self.grid.num_tokens

    @property
    def grid(self) -> TokenGrid:
        return self.ctx.call.grid

    @property
    def batch(self) -> int:
        return self.ctx.call.batch_size

    @property
    def text_tokens(self) -> int:
        return self.ctx.call.text_tokens

    def placed(self, count: int) -> tuple[tuple, TokenSelection] | None:
        """Which image tokens a sequence of `count` of them holds, with a cache key: the whole grid
        (key ("grid", grid), the same in every call), this call's token set (key ("call", id)), or
        None when they cannot be placed (pooled tokens)."""
        grid = self.grid
        if count == grid.num_tokens:
            return ("grid", grid), TokenSelection(torch.arange(count), grid)
        if self.tokens is not None and self.tokens.count == count:
            return ("call", id(self.tokens)), self.tokens
        return None

    def record(self, work: Work) -> None:
        self.ledger.append(work)

    def record_overhead(self, name: str, flops: float, tokens: int = 0) -> None:
        """Work a technique spends on deciding what to skip (scoring, k-means, gathers)."""
        self.ledger.append(Work("overhead", -1, name, flops, self.batch, tokens))
