"""Where the heads and MLP channels of a block sit in its weights, so stage 4 can slice them out.

`ModelAdapter.width_layout(block)` returns a `WidthLayout`: one `HeadSlices` per self-attention and one
`ChannelSlices` for the MLP. `head_slices` and `feed_forward_slices` read them off diffusers'
`Attention` and `FeedForward`; adapters of fused blocks (Flux's single blocks) build their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class HeadSlices:
    """Where one attention's heads sit in its block's weights, so that whole heads can be sliced out.

    `rows`: linears whose output features are grouped by head (q, k, v and the text stream's
    projections); `norms`: normalisations spanning all heads at once (Wan's `norm_q` over
    heads * head_dim), whose linears stay at full width and whose outputs are sliced instead;
    `columns`: (linear, offset) pairs whose input features from `offset` on are the heads' outputs.
    """

    attention: nn.Module
    heads: int
    head_dim: int
    rows: tuple[nn.Linear, ...]
    norms: tuple[nn.Module, ...]
    columns: tuple[tuple[nn.Linear, int], ...]


@dataclass(frozen=True)
class ChannelSlices:
    """An MLP's hidden channels: `rows` produce them (both halves of a gated activation when `gated`),
    `columns` (linear, offset) read them; `module` maps tokens to tokens one by one (None where the
    MLP is fused with the attention output, as in single-stream blocks)."""

    hidden: int
    rows: tuple[nn.Linear, ...]
    columns: tuple[tuple[nn.Linear, int], ...]
    module: nn.Module | None
    gated: bool = False


@dataclass(frozen=True)
class WidthLayout:
    """The heads and MLP channels of one block that stage 4 may narrow."""

    attentions: tuple[HeadSlices, ...]
    mlp: ChannelSlices | None



def _spans_heads(norm: nn.Module | None, inner_dim: int) -> bool:
    """Whether `norm` normalises all heads together (its shape is heads * head_dim, not head_dim)."""
    if norm is None:
        return False
    shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)  # torch's norms, diffusers' RMSNorm
    if shape is None:
        weight = getattr(norm, "weight", None)
        return weight is not None and weight.numel() == inner_dim
    return math.prod(shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)) == inner_dim


def head_slices(attention: nn.Module, columns: tuple[tuple[nn.Linear, int], ...] | None = None) -> HeadSlices:
    """The head layout of a diffusers `Attention`; `columns` for one without its own `to_out`."""
    heads = attention.heads
    inner_dim = attention.to_q.out_features
    rows, norms = [], []
    for projection, norm in (("to_q", "norm_q"), ("to_k", "norm_k"), ("to_v", None),
                             ("add_q_proj", "norm_added_q"), ("add_k_proj", "norm_added_k"), ("add_v_proj", None)):
        linear = getattr(attention, projection, None)
        if linear is None:
            continue
        norm_module = getattr(attention, norm, None) if norm else None
        if _spans_heads(norm_module, inner_dim):
            norms.append(norm_module)
        else:
            rows.append(linear)
    if columns is None:
        columns = tuple((linear, 0) for linear in (attention.to_out[0], getattr(attention, "to_add_out", None))
                        if linear is not None)
    return HeadSlices(attention, heads, inner_dim // heads, tuple(rows), tuple(norms), columns)


def feed_forward_slices(ff: nn.Module) -> ChannelSlices:
    """A diffusers `FeedForward`: `net[0].proj` makes the hidden channels, its last linear reads them."""
    produce = ff.net[0].proj
    read = [m for m in ff.net if isinstance(m, nn.Linear)][-1]
    gated = produce.out_features == 2 * read.in_features
    return ChannelSlices(read.in_features, (produce,), ((read, 0),), ff, gated)
