"""Keys and values that stand for groups of keys: the pooled side of proxy attention, SVG2's
compensation for the clusters it skips, and FlexDiT's pooled K/V.

A pooled key carries log(its group's size) as a logit bias, so that the softmax weighs it as the
tokens it stands for (exp(q.k_mean + log m) = m exp(q.k_mean)); where the keys carry a bias of their
own (stage 5), the group's weight is the sum of exp(bias) and the means are weighted by it.

Every sum accumulates in fp32 and is cast back once: bf16 sums of thousands of tokens saturate (a bf16
running sum of ones sticks at 256), and CUDA's bf16 `scatter_add_` rounds every atomic add. Groups that
are contiguous (SVG2's clusters after their permutation) take segment sums from one fp32 `cumsum`:
deterministic, no atomics.
"""

from __future__ import annotations

import torch


def tiled_mean(x: torch.Tensor, extent: tuple[int, int, int], proxy: tuple[int, int, int]) -> torch.Tensor:
    """(B, H, M, D) means of (B, H, N, D) grid tokens over proxy windows that tile the grid."""
    batch, heads, _, dim = x.shape
    (f, r, c), (pf, pr, pc) = extent, proxy
    tiles = x.view(batch, heads, f // pf, pf, r // pr, pr, c // pc, pc, dim)
    for axis in (7, 5, 3):  # one axis at a time, innermost first: 5x faster than one strided mean
        tiles = tiles.sum(axis, dtype=torch.float32)
    return (tiles / (pf * pr * pc)).to(x.dtype).reshape(batch, heads, -1, dim)


def pool(key: torch.Tensor, value: torch.Tensor, groups: torch.Tensor, count: int,
         key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keys, values (B, H, M, D), log-size bias (B|1, H|1, 1, M)) standing for the `count` groups of
    (B, H, N, D) keys and values that `groups` (S, N) (S = B, or 1 for all) assigns: the mean key and
    value of each group, weighted by exp(key bias) where keys carry one; an empty group gets -inf."""
    batch, heads, length, dim = key.shape
    if key_bias is None:
        top, weight = None, key.new_ones(1, 1, length, dtype=torch.float32)
    else:
        top = key_bias.float().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
        weight = (key_bias.float() - top).exp()[..., 0, :]
    rows = max(groups.shape[0], weight.shape[0])
    sizes = torch.zeros(rows, weight.shape[1], count, dtype=torch.float32, device=key.device)
    sizes.scatter_add_(-1, groups.unsqueeze(1).expand(rows, weight.shape[1], length), weight.expand(rows, -1, -1))
    index = groups.unsqueeze(1).expand(batch, heads, length)

    def total(x: torch.Tensor) -> torch.Tensor:
        x = x.float() if key_bias is None else x.float() * weight.unsqueeze(-1)
        sums = torch.zeros(batch, heads, count, x.shape[-1], dtype=torch.float32, device=key.device)
        return sums.scatter_add_(2, index.unsqueeze(-1).expand_as(x), x)

    norm = sizes.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)
    bias = sizes.log() + (0.0 if top is None else top[..., 0, :])
    return (total(key) / norm).to(key.dtype), (total(value) / norm).to(value.dtype), bias.unsqueeze(-2)


def segment_sums(x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(G, C, D) fp32 sums of the (G, N, D) rows between consecutive (G, C + 1) `offsets`, from one
    fp32 cumsum of the rows minus their mean (which keeps the running sums small, so a short segment
    far down a long sequence loses nothing to the running total's rounding)."""
    x = x.float()
    mean = x.mean(1, keepdim=True)
    running = torch.cat([x.new_zeros(x.shape[0], 1, x.shape[-1]), (x - mean).cumsum(1)], 1)
    at = lambda o: running.gather(1, o.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # noqa: E731
    return at(offsets[:, 1:]) - at(offsets[:, :-1]) + mean * offsets.diff(dim=-1).unsqueeze(-1)


def segment_pool(key: torch.Tensor, value: torch.Tensor, offsets: torch.Tensor,
                 key_bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`pool` for groups that are contiguous: (keys (G, C, D), values (G, C, Dv), log-size bias (G, C))
    of (G, N, D) keys and values cut at (G, C + 1) `offsets`, weighted by exp(`key_bias` (G, N)) where
    keys carry one; an empty group gets a zero key and value and bias -inf."""
    if key_bias is None:
        sizes = offsets.diff(dim=-1).float()
        top, weight = None, None
    else:
        top = key_bias.float().amax(-1, keepdim=True).clamp(min=torch.finfo(torch.float32).min)
        weight = (key_bias.float() - top).exp().unsqueeze(-1)  # (G, N, 1)
        sizes = segment_sums(weight, offsets)[..., 0].clamp(min=0)

    def mean(x: torch.Tensor) -> torch.Tensor:
        sums = segment_sums(x if weight is None else x.float() * weight, offsets)
        return (sums / sizes.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1)).to(x.dtype)

    bias = sizes.log() + (0.0 if top is None else top)
    return mean(key), mean(value), bias
