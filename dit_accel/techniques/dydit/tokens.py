"""DyDiT's spatial dynamic tokens (SDT): each token-wise MLP runs on the tokens per sample whose input
changed most since they were last computed; the others keep their cached output.

`MLPTokens` holds, per (CFG branch, block), the MLP's full-length input and output as of each
token's last computation; `SkipTokens` is the hook on the MLP module that runs it through them. A
call whose MLP sees another token count (RAS's subsets, a FlexDiT density change) computes every
token and restarts the cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Protocol

import torch
from diffusers.hooks import ModelHook

from ...metrics.flops import UnitWidth
from ...runtime.call_state import CallState
from ...runtime.session_view import SessionView
from ...tokens import gather_tokens, scatter_tokens


class TokenSkipping(Protocol):
    """What the MLP token hook asks of its technique (DyDiT): the session and the token cache."""

    session: SessionView
    mlp_tokens: "MLPTokens"


class MLPTokens:
    """The MLP token cache of one technique, and what each block computed this call."""

    def __init__(self, token_ratio: float):
        self.token_ratio = token_ratio
        #: per (branch, block): (MLP input, MLP output) when each token was last computed
        self.cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        #: block -> fraction of its MLP tokens computed this call
        self.fractions: dict[int, float] = {}

    def begin_call(self) -> None:
        self.fractions = {}

    def end_run(self) -> None:
        self.cache.clear()

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.cache.values() for t in pair]

    def run(self, call_state: CallState, block: int, unit: str, forward: Callable[[torch.Tensor], torch.Tensor],
            hidden: torch.Tensor) -> torch.Tensor:
        """The MLP (`forward`) on the tokens per sample whose input changed most since last computed; the
        ledger records the block's `unit` at the fraction of tokens that ran."""
        batch, tokens = hidden.shape[:2]
        key = (call_state.ctx.slot, block)
        cached = self.cache.get(key)
        if cached is not None and cached[0].shape != hidden.shape:  # another token count: start again
            cached = None
        if cached is None:
            index = torch.arange(tokens, device=hidden.device)
        else:
            change = (hidden - cached[0]).float().pow(2).sum(-1)
            index = change.topk(math.ceil(self.token_ratio * tokens), dim=1).indices.sort(dim=1).values
            call_state.record_overhead("dydit token change", 3.0 * batch * tokens * hidden.shape[-1], tokens)
        fraction = index.shape[-1] / tokens
        width = call_state.widths.get((block, unit), UnitWidth())
        call_state.widths[(block, unit)] = dataclasses.replace(width, token_fraction=fraction)
        self.fractions[block] = fraction
        inputs = gather_tokens(hidden, index)
        computed = forward(inputs)
        if cached is None:
            output = scatter_tokens(computed.new_empty(*hidden.shape[:2], computed.shape[-1]), index, computed)
        else:
            hidden = scatter_tokens(cached[0], index, inputs)
            output = scatter_tokens(cached[1], index, computed)
        if self.token_ratio < 1.0:
            self.cache[key] = (hidden, output)
        return output


class SkipTokens(ModelHook):
    """The MLP runs on the tokens that changed most; the others keep their cached output."""

    def __init__(self, technique: TokenSkipping, block: int, unit: str):
        super().__init__()
        self.technique, self.block, self.unit = technique, block, unit

    def new_forward(self, module, hidden, *args, **kwargs):
        call_state = self.technique.session.call_state
        if call_state is None:
            return self.fn_ref.original_forward(hidden, *args, **kwargs)
        return self.technique.mlp_tokens.run(call_state, self.block, self.unit,
                                         lambda x: self.fn_ref.original_forward(x, *args, **kwargs), hidden)
