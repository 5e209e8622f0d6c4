"""Keys and values that stand for groups of keys: the pooled side of proxy attention, SVG2's
compensation for the clusters it skips, and FlexDiT's pooled K/V.

A pooled key carries log(its group's size) as a logit bias, so that the softmax weighs it as the
tokens it stands for (exp(q.k_mean + log m) = m exp(q.k_mean)); where the keys carry a bias of their
own (stage 5), the group's weight is the sum of exp(bias) and the means are weighted by it.
"""

from __future__ import annotations

import torch


def tiled_mean(x: torch.Tensor, extent: tuple[int, int, int], proxy: tuple[int, int, int]) -> torch.Tensor:
    """(B, H, M, D) means of (B, H, N, D) grid tokens over proxy windows that tile the grid."""
    batch, heads, _, dim = x.shape
    (f, r, c), (pf, pr, pc) = extent, proxy
    tiles = x.view(batch, heads, f // pf, pf, r // pr, pr, c // pc, pc, dim)
    for axis in (7, 5, 3):  # one axis at a time, innermost first: 5x faster than one strided mean
        tiles = tiles.sum(axis)
    return (tiles / (pf * pr * pc)).reshape(batch, heads, -1, dim)


def pool(key: torch.Tensor, value: torch.Tensor, groups: torch.Tensor, count: int,
         key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values (B, H, M, D), log-size bias (B|1, H|1, 1, M)) standing for the `count` groups of
    (B, H, N, D) keys and values that `groups` (S, N) (S = B, or 1 for all) assigns: the mean key and
    value of each group, weighted by exp(key bias) where keys carry one; an empty group gets -inf."""
    batch, heads, length, dim = key.shape
    if key_bias is None:
        top, weight = None, key.new_ones(1, 1, length)
    else:
        top = key_bias.float().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
        weight = (key_bias.float() - top).exp()[..., 0, :]
    rows = max(groups.shape[0], weight.shape[0])
    sizes = torch.zeros(rows, weight.shape[1], count, dtype=torch.float32, device=key.device)
    sizes.scatter_add_(-1, groups.unsqueeze(1).expand(rows, weight.shape[1], length),
                       weight.float().expand(rows, -1, -1))
    index = groups.unsqueeze(1).expand(batch, heads, length)
    if key_bias is not None:
        weighted = weight.to(key.dtype).unsqueeze(-1)
        key, value = key * weighted, value * weighted
    total_k = key.new_zeros(batch, heads, count, dim).scatter_add_(2, index.unsqueeze(-1).expand_as(key), key)
    total_v = value.new_zeros(batch, heads, count, value.shape[-1]).scatter_add_(
        2, index.unsqueeze(-1).expand_as(value), value)
    norm = sizes.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1).to(key.dtype)
    bias = sizes.log() + (0.0 if top is None else top[..., 0, :])
    return total_k / norm, total_v / norm, bias.unsqueeze(-2)
