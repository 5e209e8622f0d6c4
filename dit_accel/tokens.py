"""Token tensor operations: select, replace and pool image tokens along a token dimension.

The ground floor of dit-accel (torch only): adapters use these to gather and pool block inputs, the
runtime's stages 2 and 3 to gather, scatter and unpool, techniques for their own token subsets. An
index or a grouping is (n,) shared by the batch or (B, n) per sample.
"""

from __future__ import annotations

import torch


def _flat_rows(index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Row numbers in a (batch * length, ...) view of the tokens `index` selects, (B, n) or (n,)."""
    offsets = torch.arange(batch, device=index.device).mul_(length).unsqueeze(1)
    return (offsets + (index if index.ndim == 2 else index.unsqueeze(0))).reshape(-1)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Select `index` along the token dimension `dim`: (n,) shared by the batch or (B, n) per sample.

    A per-sample index on a batch-shared table (batch 1, e.g. rotary rows) gives a per-sample table.
    """
    if index.ndim == 1:
        return tokens.index_select(dim, index)
    batch, kept = index.shape
    if tokens.shape[0] != batch:
        tokens = tokens.expand(batch, *tokens.shape[1:])
    if dim == 1:
        rows = tokens.reshape(batch * tokens.shape[1], *tokens.shape[2:])
        return rows.index_select(0, _flat_rows(index, batch, tokens.shape[1])).view(batch, kept, *tokens.shape[2:])
    view = [1] * tokens.ndim
    view[0], view[dim] = batch, kept
    target = list(tokens.shape)
    target[dim] = kept
    return tokens.gather(dim, index.reshape(view).expand(target))


def scatter_tokens(full: torch.Tensor, index: torch.Tensor, part: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Return a copy of `full` whose rows `index` along `dim` are replaced by `part`."""
    part = part.to(full.dtype)
    if index.ndim == 1:
        return full.index_copy(dim, index, part)
    if dim == 1:
        batch, length = full.shape[:2]
        rows = full.clone(memory_format=torch.contiguous_format).view(batch * length, *full.shape[2:])
        rows.index_copy_(0, _flat_rows(index, batch, length), part.reshape(-1, *full.shape[2:]))
        return rows.view(full.shape)
    view = [1] * full.ndim
    view[0], view[dim] = index.shape[0], index.shape[1]
    return full.scatter(dim, index.reshape(view).expand_as(part), part)


def pool_tokens(tokens: torch.Tensor, groups: torch.Tensor, count: int, dim: int = 1) -> torch.Tensor:
    """The mean token of each of `count` groups along `dim`; `groups` gives every token's group, (n,)
    shared by the batch or (B, n) per sample (on a batch-shared table, batch 1, a per-sample table).
    Every group must have a member. Sums in fp32 (a bf16 sum stops growing at 256 times what it adds:
    4,096 ones pooled to 0.125), with index-adds (`scatter_reduce` is 10x slower on CPU) and group sizes
    by `scatter_add_` (`bincount` syncs with the host)."""
    zeros = lambda *shape: torch.zeros(shape, device=tokens.device)  # noqa: E731  fp32
    if groups.ndim == 1:
        shape = list(tokens.shape)
        shape[dim] = count
        total = zeros(*shape).index_add_(dim, groups, tokens.float())
        sizes = zeros(count).scatter_add_(0, groups, zeros(*groups.shape) + 1)
        return (total / sizes.view(count, *[1] * (tokens.ndim - dim - 1))).to(tokens.dtype)
    if dim != 1:
        raise ValueError("per-sample groups pool along the token dimension 1")
    batch, length = groups.shape
    if tokens.shape[0] != batch:
        tokens = tokens.expand(batch, *tokens.shape[1:])
    rows = _flat_rows(groups, batch, count)
    rest = tokens.shape[2:]
    total = zeros(batch * count, *rest).index_add_(0, rows, tokens.reshape(batch * length, *rest).float())
    sizes = zeros(batch * count).scatter_add_(0, rows, zeros(*rows.shape) + 1)
    return (total / sizes.view(-1, *[1] * len(rest))).to(tokens.dtype).view(batch, count, *rest)


def pool_rotation(cos: torch.Tensor, sin: torch.Tensor, groups: torch.Tensor, count: int,
                  dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables at each group's mean angle: every column's (cos, sin) pair averaged over the
    group and made unit length again, so the rotation stays a rotation. For positions symmetric about
    their mean (spread below a quarter turn) this is exactly the rotation at the mean position; a
    column whose angles cancel stays unrotated."""
    cos, sin = pool_tokens(cos, groups, count, dim), pool_tokens(sin, groups, count, dim)
    norm = torch.hypot(cos, sin)
    cancelled = norm < 1e-6
    norm = norm.clamp(min=1e-6)
    return torch.where(cancelled, 1.0, cos / norm), torch.where(cancelled, 0.0, sin / norm)


def pool_key_mask(mask: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """A mask over image keys (last dimension; bool or additive) pooled by group: a group may be
    attended where any of its members may (the largest value)."""
    if groups.ndim == 2 and mask.shape[0] != groups.shape[0]:
        mask = mask.expand(groups.shape[0], *mask.shape[1:])
    view = [1] * mask.ndim
    view[-1] = groups.shape[-1]
    if groups.ndim == 2:
        view[0] = groups.shape[0]
    index = groups.reshape(view).expand_as(mask)
    return mask.new_zeros(*mask.shape[:-1], count).scatter_reduce_(-1, index, mask, "amax", include_self=False)
