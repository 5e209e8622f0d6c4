"""What one block can narrow, and the hooks that run it narrower (stage 4).

A `Part` is the heads of one attention or the channel groups of one MLP, with the linears whose
rows or columns they own and the norms spanning all heads (`parts_of`, from the adapter's
`width_layout`). The hooks ask the technique for the running call's slices: `SlicedLinear` runs
`F.linear` on the kept rows or columns (an output linear plus the learned routers' correction, where
they carry one), `SlicedNorm` keeps the running heads' features after a norm
over all heads, `HeadCount` sets the attention's `heads` while its processor runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn

from ...models.width import ChannelSlices, HeadSlices
from ...runtime.session_view import SessionView


class Narrowing(Protocol):
    """What the width hooks ask of their technique (DyDiT): the running bucket's slices, and scoring."""

    session: SessionView
    scores: Any

    def kept(self, part: "Part") -> torch.Tensor: ...

    def whole(self, part: "Part") -> bool: ...

    def features(self, part: "Part", device: torch.device) -> torch.Tensor: ...

    def sliced(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def score(self, linear: nn.Linear, x: torch.Tensor) -> None: ...

    def corrected(self, linear: nn.Linear, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor: ...


def group_channels(hidden: int, groups: int) -> list[torch.Tensor]:
    return list(torch.arange(hidden).tensor_split(groups))


@dataclass
class Part:
    """Heads of one attention or channel groups of one MLP: the features each unit owns."""

    key: str
    block: int
    units: list[torch.Tensor]
    #: linears whose output features are these units' (for a gated MLP: both halves)
    rows: list[nn.Linear]
    columns: list[tuple[nn.Linear, int]]
    norms: list[nn.Module]
    gated_hidden: int = 0
    attention: nn.Module | None = None

    @property
    def width(self) -> int:
        return sum(len(u) for u in self.units)

    def features(self, kept: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.units[int(u)] for u in kept])

    def weight_gram(self) -> torch.Tensor:
        """The data-free stand-in for a calibration: a diagonal Gram matrix of each unit's mean row
        norm times its mean column norm, squared (units assumed uncorrelated), on the CPU where
        `select_units` works. Weights without data (the meta device, for an estimate) rank every unit
        alike: which units are kept does not change how many, nor the bytes."""
        if any(linear.weight.is_meta for linear in self.rows + [linear for linear, _ in self.columns]):
            return torch.eye(len(self.units))
        scores = []
        for features in self.units:
            rows = [linear.weight.detach()[features].float().norm() for linear in self.rows]
            columns = [linear.weight.detach()[:, offset + features].float().norm() for linear, offset in self.columns]
            scores.append((torch.stack(rows).mean() if rows else torch.tensor(1.0)) * torch.stack(columns).mean())
        return torch.diag(torch.stack(scores).cpu() ** 2)


def parts_of(block: int, attentions: tuple[HeadSlices, ...], mlp: ChannelSlices | None) -> list[Part]:
    parts = []
    for a, heads in enumerate(attentions):
        units = [torch.arange(h * heads.head_dim, (h + 1) * heads.head_dim) for h in range(heads.heads)]
        parts.append(Part(f"block{block}.attention{a}", block, units, list(heads.rows), list(heads.columns),
                          list(heads.norms), attention=heads.attention))
    if mlp is not None:
        groups = group_channels(mlp.hidden, attentions[0].heads if attentions else 1)
        parts.append(Part(f"block{block}.mlp", block, groups, list(mlp.rows), list(mlp.columns), [],
                          gated_hidden=mlp.hidden if mlp.gated else 0))
    return parts


class SlicedLinear(ModelHook):
    """A linear that runs on the running bucket's rows or columns of its weight."""

    def __init__(self, technique: Narrowing, linear: nn.Linear):
        super().__init__()
        self.technique, self.linear = technique, linear

    def new_forward(self, module, x):
        if self.technique.session.call_state is None:
            return self.fn_ref.original_forward(x)
        weight, bias = self.technique.sliced(module)
        if self.technique.scores is not None:
            self.technique.score(module, x)
        return self.technique.corrected(module, x, F.linear(x, weight, bias))


class SlicedNorm(ModelHook):
    """A normalisation over all heads: normalise at full width, keep the running heads' features (all
    of them: nothing to select)."""

    def __init__(self, technique: Narrowing, part: Part):
        super().__init__()
        self.technique, self.part = technique, part

    def post_forward(self, module, output):
        if self.technique.session.call_state is None or self.technique.whole(self.part):
            return output
        return output.index_select(-1, self.technique.features(self.part, output.device))


class HeadCount(ModelHook):
    """The attention's processor reshapes by `heads`: the running bucket's count while it runs."""

    def __init__(self, technique: Narrowing, part: Part):
        super().__init__()
        self.technique, self.part = technique, part

    def new_forward(self, module, *args, **kwargs):
        if self.technique.session.call_state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        full = module.heads
        module.heads = len(self.technique.kept(self.part))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            module.heads = full
