"""DyDiT's spatial dynamic tokens (SDT): each token-wise MLP runs on the tokens per sample whose input
changed most since they were last computed; the others keep their cached output.

How far a token's input moved is read off a sketch, not the input itself: a fixed random projection
of the MLP input to `SKETCH_DIM` dimensions, scaled 1/sqrt(SKETCH_DIM), keeps squared distances on
average (Johnson-Lindenstrauss) at a sliver of the input's bytes. `MLPTokens` holds, per (CFG branch,
block), the sketch (fp32) and the MLP output (in `DyDiTConfig.token_cache`'s form, `StoredTensor`) as
of each token's last computation; `SkipTokens` is the hook on the MLP module that runs it through
them. A call whose MLP sees another token count (RAS's subsets, a FlexDiT density change) computes
every token and restarts the cache.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Callable, Protocol

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ...metrics.flops import UnitWidth
from ...models.base import ModelAdapter
from ...models.width import ChannelSlices
from ...runtime.call_state import CallState
from ...runtime.session_view import SessionView
from ...runtime.storage import StateStorage, StoredTensor
from ...tokens import gather_tokens, scatter_tokens

#: columns of the random projection a token's MLP input is sketched by
SKETCH_DIM = 64
_SKETCH_SEED = 0


def sketch_projection(hidden: int, device: torch.device) -> torch.Tensor:
    """The (hidden, SKETCH_DIM) fp32 projection: the same seeded draw on every device and run."""
    generator = torch.Generator().manual_seed(_SKETCH_SEED)
    return (torch.randn(hidden, SKETCH_DIM, generator=generator) / math.sqrt(SKETCH_DIM)).to(device)


@dataclasses.dataclass(frozen=True)
class TokenMLP:
    """A block's token-wise MLP: the module hooked, the block's child holding it (the ledger's unit),
    its output width, and whether it runs on the text and image tokens together (CogVideoX)."""

    module: nn.Module
    unit: str
    out_features: int
    joint: bool

    @classmethod
    def of(cls, adapter: ModelAdapter, block: nn.Module, mlp: ChannelSlices) -> TokenMLP:
        names = {module: name for name, module in block.named_modules()}
        read, _ = mlp.columns[0]
        joint = adapter.linear_streams(block).get(names[read]) == "joint"
        return cls(mlp.module, names[mlp.module].split(".")[0], read.out_features, joint)


class TokenRunner(Protocol):
    """How a technique runs a token-wise MLP: `MLPTokens` (the cache), or with routers `RoutedTokens`
    (inference) and `TrainedTokens` (fine-tuning), both in routers.py."""

    fractions: dict[int, float]

    def begin_call(self, call_state: CallState) -> None: ...

    def end_run(self) -> None: ...

    def nbytes(self) -> int: ...

    def run(self, call_state: CallState, block: int, unit: str, forward: Callable[[torch.Tensor], torch.Tensor],
            hidden: torch.Tensor) -> torch.Tensor: ...


class TokenSkipping(Protocol):
    """What the MLP token hook asks of its technique (DyDiT): the session and how to run the MLP."""

    session: SessionView
    mlp_tokens: TokenRunner


@dataclasses.dataclass
class CachedTokens:
    """One (CFG branch, block): the sketch of each token's MLP input and its MLP output, as of when
    the token was last computed."""

    sketch: torch.Tensor
    output: StoredTensor


class MLPTokens:
    """The MLP token cache of one technique, and what each block computed this call."""

    def __init__(self, token_ratio: float, storage: StateStorage, blocks: list[int]):
        self.token_ratio, self.storage = token_ratio, storage
        #: the MLP block run after each one, whose cached output a "host" cache fetches meanwhile
        self._following = dict(itertools.pairwise(blocks))
        self._first = blocks[0] if blocks else None
        self.cache: dict[tuple[str, int], CachedTokens] = {}
        #: per (hidden size, device): the sketch projection
        self._projections: dict[tuple[int, torch.device], torch.Tensor] = {}
        #: block -> fraction of its MLP tokens computed this call
        self.fractions: dict[int, float] = {}

    def begin_call(self, call_state: CallState) -> None:
        self.fractions = {}
        self._prefetch(call_state.ctx.slot, self._first)

    def end_run(self) -> None:
        self.cache.clear()
        self._projections.clear()

    def nbytes(self) -> int:
        return sum(c.sketch.numel() * c.sketch.element_size() + c.output.nbytes() for c in self.cache.values())

    def _prefetch(self, slot: str, block: int | None) -> None:
        cached = self.cache.get((slot, block))
        if cached is not None:
            cached.output.prefetch()

    def _sketch(self, hidden: torch.Tensor) -> torch.Tensor:
        key = (hidden.shape[-1], hidden.device)
        if key not in self._projections:
            self._projections[key] = sketch_projection(*key)
        return hidden.float() @ self._projections[key]

    def run(self, call_state: CallState, block: int, unit: str, forward: Callable[[torch.Tensor], torch.Tensor],
            hidden: torch.Tensor) -> torch.Tensor:
        """The MLP (`forward`) on the tokens per sample whose input sketch moved most since last computed;
        the ledger records the block's `unit` at the fraction of tokens that ran."""
        batch, tokens, channels = hidden.shape
        slot = call_state.ctx.slot
        self._prefetch(slot, self._following.get(block))
        sketch = self._sketch(hidden)
        call_state.record_overhead("dydit token sketch", 2.0 * batch * tokens * channels * SKETCH_DIM, tokens)
        cached = self.cache.get((slot, block))
        if cached is not None and cached.sketch.shape != sketch.shape:  # another token count: start again
            cached = None
        if cached is None:
            output = forward(hidden)
            self.cache[(slot, block)] = CachedTokens(sketch, StoredTensor(output, self.storage))
            record_fraction(call_state, block, unit, 1.0, self.fractions)
            return output
        change = (sketch - cached.sketch).pow(2).sum(-1)
        call_state.record_overhead("dydit token change", 3.0 * batch * tokens * SKETCH_DIM, tokens)
        index = change.topk(math.ceil(self.token_ratio * tokens), dim=1).indices.sort(dim=1).values
        record_fraction(call_state, block, unit, index.shape[-1] / tokens, self.fractions)
        computed = forward(gather_tokens(hidden, index))
        output = scatter_tokens(cached.output.load(), index, computed)
        cached.output.save(output)
        cached.sketch = scatter_tokens(cached.sketch, index, gather_tokens(sketch, index))
        return output



def record_fraction(call_state: CallState, block: int, unit: str, fraction: float, fractions: dict[int, float]) -> None:
    """The ledger records the block's MLP `unit` at `fraction` of its tokens (`fractions`: the call's, by block)."""
    width = call_state.widths.get((block, unit), UnitWidth())
    call_state.widths[(block, unit)] = dataclasses.replace(width, token_fraction=fraction)
    fractions[block] = fraction


class SkipTokens(ModelHook):
    """The MLP runs on some of its tokens (the technique's `mlp_tokens` choose which and fill in the others)."""

    def __init__(self, technique: TokenSkipping, block: int, unit: str):
        super().__init__()
        self.technique, self.block, self.unit = technique, block, unit

    @torch.compiler.disable  # its cache bookkeeping is Python; a compiled block breaks its graph here
    def new_forward(self, module, hidden, *args, **kwargs):
        call_state = self.technique.session.call_state
        if call_state is None:
            return self.fn_ref.original_forward(hidden, *args, **kwargs)
        return self.technique.mlp_tokens.run(call_state, self.block, self.unit,
                                             lambda x: self.fn_ref.original_forward(x, *args, **kwargs), hidden)
