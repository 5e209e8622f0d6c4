"""Window attention, proxy attention's kernel: every image query against the exact keys of its local
window, one pooled proxy per proxy window outside it, and the extra (text) keys.

`WindowPlan` holds what does not depend on q/k/v, built once per resolution (per call under RAS) from
`proxy_kernel.place`'s per-token window ids: each side's tokens grouped by local window (sorted
order, rank, padded layout) and the proxies in window order. It holds nothing of size queries x
proxies: the own-window test is made from the ids where a kernel needs it.

- `TorchWindows`: the local part as one batched SDPA over the padded windows; the far part as one SDPA
  of every query over every proxy and extra key with a per-key bias only (a per-query mask costs
  torch's fused CPU kernel a third of its speed), from which the proxies of each query's own window
  are then taken out exactly: their logits, a few per query, are computed per window and their share
  of the far part's sum (and of its output) is subtracted, in fp32; the two parts merge by their
  log-sum-exp. Its `with_lse` is the device's (`dense.lse_kernel`).
- `FlexWindows`: one `flex_attention` call. Tokens in window order, so the local part is
  block-diagonal; the key columns are [image keys | proxies | extra keys], each padded to whole tiles;
  `mask_mod` tests the own window from per-token ids, `score_mod` adds the fp32 per-key bias (proxies'
  log sizes, stage 5's bias, text padding). Its `BlockMask` comes from each tile's first and last
  window (no evaluation over queries x keys) and is cached on the plan.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ..merge import merge
from ..proxy_kernel import Windows, pool
from .dense import LseKernel

#: what marks a padding column in the flex kernel's column ids (windows are >= 0, extra keys -1)
_PAD = -2


@dataclass(frozen=True)
class _Layout:
    """Tokens of one side grouped by local window: in sorted order, and in a (windows x width) padded layout."""

    order: torch.Tensor  # (S, n) tokens by window (stable)
    sorted_ids: torch.Tensor  # (S, n) their windows, ascending
    rank: torch.Tensor  # (S, n) position of every token in `order`
    slot: torch.Tensor  # (S, n) position of every token in the padded layout
    #: (n,) tokens in padded-layout order, when one row fills the layout exactly
    dense_order: torch.Tensor | None
    width: int
    counts: torch.Tensor  # (S, windows)

    @classmethod
    def of(cls, ids: torch.Tensor, windows: int) -> "_Layout":
        order = ids.argsort(dim=-1, stable=True)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        rank = torch.empty_like(order).scatter_(1, order, positions)
        counts = torch.zeros(ids.shape[0], windows, dtype=torch.long, device=ids.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids))
        sorted_ids = ids.gather(1, order)
        within = positions - (counts.cumsum(1) - counts).gather(1, sorted_ids)
        width = int(counts.max())  # a host sync, once per plan
        slot = torch.empty_like(ids).scatter_(1, order, sorted_ids * width + within)
        full = ids.shape[0] == 1 and bool((counts == width).all())
        return cls(order, sorted_ids, rank, slot, order[0] if full else None, width, counts)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, n, D) tokens as (B * H, windows, width, D), zero-padded."""
        batch, heads, _, dim = x.shape
        windows = self.counts.shape[1]
        if self.dense_order is not None:
            return x.index_select(2, self.dense_order).view(batch * heads, windows, self.width, dim)
        index = self.slot.expand(batch, -1).unsqueeze(1).unsqueeze(-1).expand(batch, heads, -1, dim)
        padded = x.new_zeros(batch, heads, windows * self.width, dim).scatter_(2, index, x)
        return padded.view(batch * heads, windows, self.width, dim)

    def scatter(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """(B * H, windows, width, ...) back to (B, H, n, ...) in token order."""
        flat = x.reshape(batch, -1, x.shape[1] * x.shape[2], *x.shape[3:])
        if self.dense_order is not None:
            return flat.index_select(2, self.slot[0])
        index = self.slot.expand(batch, -1).unsqueeze(1).expand(batch, flat.shape[1], -1)
        if flat.ndim == 4:
            index = index.unsqueeze(-1).expand(-1, -1, -1, flat.shape[-1])
        return flat.gather(2, index)


def _by_rows(x: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`x` taken at `index` (S, n) along `dim` (2 of (B, H, L, D), or -1 of (B|1, H|1, 1, L)), S = 1 or B."""
    if index.shape[0] == 1:
        return x.index_select(dim, index[0])
    shape = [index.shape[0], 1, 1, 1]
    shape[dim] = index.shape[1]
    target = list(x.shape)
    target[0], target[dim] = index.shape[0], index.shape[1]
    return x.expand(index.shape[0], *x.shape[1:]).gather(dim, index.view(shape).expand(target))


@dataclass(frozen=True)
class WindowPlan:
    """The windows' layout for every block of a call (or of a run, on the whole grid)."""

    windows: Windows
    queries: _Layout
    keys: _Layout
    #: (S, L, width) fp32 -inf on the padding of the key layout, or None without padding
    key_padding: torch.Tensor | None
    #: (M,) the proxies by local window
    proxy_order: torch.Tensor
    #: the proxies grouped by local window, in a (windows x width) padded layout
    proxy_layout: _Layout
    #: the flex kernel's BlockMasks and mask_mods, by (extra keys, tile)
    flex: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, windows: Windows) -> "WindowPlan":
        queries, keys = _Layout.of(windows.q_local, windows.locals), _Layout.of(windows.k_local, windows.locals)
        padding = None
        if bool((keys.counts != keys.width).any()):
            present = torch.arange(keys.width, device=keys.counts.device) < keys.counts.unsqueeze(-1)
            padding = torch.zeros(present.shape, device=present.device).masked_fill(~present, -torch.inf)
        return cls(windows, queries, keys, padding, windows.proxy_local.argsort(stable=True),
                   _Layout.of(windows.proxy_local.unsqueeze(0), windows.locals))

    @property
    def proxies(self) -> int:
        """Proxies a query can attend to: none when one local window holds every proxy."""
        return self.windows.proxies if self.windows.locals > 1 else 0

    def pairs(self, extra_keys: int) -> int:
        """(query, key) pairs computed per (sample, head): the padded local windows, then every query
        against every proxy and extra key."""
        local = self.windows.locals * self.queries.width * self.keys.width
        return local + self.windows.q_local.shape[1] * (self.proxies + extra_keys)

    def every_query_has_far_keys(self, extra_bias: torch.Tensor | None) -> bool:
        """Whether every query keeps a key outside its window (no dead-row fix needed): with the whole grid
        as keys, every other window's proxies, or extra keys no bias removes."""
        return self.windows.whole_keys and (self.proxies > 0 or extra_bias is None)


@dataclass(frozen=True)
class TorchWindows:
    """Local windows as one batched SDPA, every proxy and extra key as one SDPA less the own-window proxies,
    merged by LSE."""

    with_lse: LseKernel
    name = "torch"

    def _local(self, query, key, value, plan: WindowPlan, key_bias, scale):
        """Every query against the exact keys of its local window: (output, lse)."""
        batch, heads = query.shape[:2]
        windows, keys = plan.windows.locals, plan.keys
        mask = None
        if plan.key_padding is not None or key_bias is not None:
            mask = torch.zeros(1, 1, windows, keys.width, device=query.device)
            if plan.key_padding is not None:
                mask = mask + plan.key_padding.unsqueeze(1)
            if key_bias is not None:
                per_key = key_bias.float().expand(batch, heads, 1, -1).transpose(2, 3)  # (B, H, N, 1)
                mask = mask + keys.gather(per_key)[..., 0].view(batch, heads, windows, keys.width)
            mask = mask.expand(batch, heads, -1, -1).reshape(batch * heads, windows, 1, keys.width)
        out, lse = self.with_lse(plan.queries.gather(query), keys.gather(key), keys.gather(value), mask, scale,
                                 every_query_has_keys=plan.windows.whole_keys)
        return plan.queries.scatter(out, batch), plan.queries.scatter(lse, batch)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: WindowPlan,
                 key_bias: torch.Tensor | None = None, extra_key: torch.Tensor | None = None,
                 extra_value: torch.Tensor | None = None, extra_bias: torch.Tensor | None = None,
                 scale: float | None = None) -> tuple[torch.Tensor, int]:
        """(output (B, H, n, D), pairs computed per (sample, head)) of image queries (B, H, n, D) against image
        keys/values (B, H, N, D) and the extra keys (B, H, T, D). Biases are per key, (B|1, H|1, 1, K)."""
        out, lse = self._local(query, key, value, plan, key_bias, scale)
        extra = 0 if extra_key is None else extra_key.shape[2]
        if plan.proxies == 0 and extra == 0:
            return out, plan.pairs(0)
        keys, values, biases = [], [], []
        if plan.proxies:
            proxy_k, proxy_v, proxy_bias = pool(key, value, plan.windows, key_bias)
            keys.append(proxy_k)
            values.append(proxy_v)
            biases.append(proxy_bias.float())
        if extra:
            keys.append(extra_key)
            values.append(extra_value)
            biases.append(torch.zeros(1, 1, 1, extra, device=query.device) if extra_bias is None else extra_bias.float())
        lead = [max(b.shape[d] for b in biases) for d in (0, 1)]
        bias = torch.cat([b.expand(*lead, *b.shape[2:]) for b in biases], -1)
        far, far_lse = self.with_lse(query, torch.cat(keys, 2), torch.cat(values, 2), bias, scale,
                                     every_query_has_keys=plan.every_query_has_far_keys(extra_bias))
        if plan.proxies:
            far, far_lse = _without_own_proxies(far, far_lse, query, proxy_k, proxy_v, proxy_bias, plan, scale)
        return merge(out, lse, far, far_lse)[0], plan.pairs(extra)


def _without_own_proxies(far: torch.Tensor, far_lse: torch.Tensor, query: torch.Tensor, proxy_k: torch.Tensor,
                         proxy_v: torch.Tensor, proxy_bias: torch.Tensor, plan: WindowPlan, scale: float | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, lse) of the far part without the proxies of each query's own window (its exact keys
    attend instead), from the part over every proxy: per window, the own proxies' weights relative to
    the part's sum, exp(logit - lse), their share s of the sum and their weighted values o; then
    out' = (out - o) / (1 - s), lse' = lse + log(1 - s), in fp32. A query left without keys (s = 1 up to
    rounding) gets lse -inf and output 0."""
    batch, heads = query.shape[:2]
    queries, proxies = plan.queries, plan.proxy_layout
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    own_bias = proxy_bias.float().expand(batch, heads, 1, -1).transpose(2, 3)  # (B, H, M, 1)
    own_bias = proxies.gather(own_bias)[..., 0]  # (B * H, windows, width)
    present = torch.arange(proxies.width, device=query.device) < proxies.counts.unsqueeze(-1)  # (1, windows, width)
    own_bias = own_bias.masked_fill(~present, -torch.inf)
    relative = queries.gather(far_lse.unsqueeze(-1))[..., 0].unsqueeze(-1)  # (B * H, windows, rows, 1)
    logits = queries.gather(query).float() @ proxies.gather(proxy_k).float().transpose(-1, -2) * scale
    # a query without far keys (lse -inf) has no own proxies to take out either
    weights = (logits + own_bias.unsqueeze(-2) - relative).exp().nan_to_num(0.0, posinf=0.0)
    share = queries.scatter(weights.sum(-1).unsqueeze(-1), batch)[..., 0]  # (B, H, n)
    weighted = queries.scatter(weights @ proxies.gather(proxy_v).float(), batch)  # (B, H, n, Dv)
    rest = 1.0 - share
    alive = rest > 16 * torch.finfo(torch.float32).eps
    out = ((far.float() - weighted) / rest.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(-1))
    out = out.masked_fill(~alive.unsqueeze(-1), 0.0).to(far.dtype)
    lse = (far_lse + torch.log(rest.clamp(min=torch.finfo(torch.float32).tiny))).masked_fill(~alive, -torch.inf)
    return out, lse


@functools.cache
def _compiled_flex(dynamic: bool | None) -> Callable:
    return torch.compile(flex_attention, dynamic=dynamic)


def _lookup(table: torch.Tensor) -> Callable:
    """f(b, i) = table[b, i], or table[0, i] for a (1, L) table shared by the batch."""
    if table.shape[0] == 1:
        row = table[0]
        return lambda b, i: row[i]
    return lambda b, i: table[b, i]


def _repeat_last(ids: torch.Tensor, tile: int) -> torch.Tensor:
    """Ascending ids (..., L) padded to a whole number of tiles by repeating the last one."""
    return torch.cat([ids, ids[..., -1:].expand(*ids.shape[:-1], -ids.shape[-1] % tile)], -1)


def _tiles(ids: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(first id, last id (..., tiles), whether the tile holds padding (tiles,)) of ascending `ids`
    (..., L) cut into tiles."""
    spans = _repeat_last(ids, tile).unflatten(-1, (-1, tile))
    holds_padding = torch.arange(1, spans.shape[-2] + 1, device=ids.device) * tile > ids.shape[-1]
    return spans[..., 0], spans[..., -1], holds_padding


def _padded(x: torch.Tensor, tile: int, dim: int = 2, value: float = 0.0) -> torch.Tensor:
    """`x` padded with `value` along `dim` to a whole number of tiles."""
    extra = -x.shape[dim] % tile
    if extra == 0:
        return x
    pad = [0, 0] * (x.ndim - dim % x.ndim - 1) + [0, extra]
    return F.pad(x, pad, value=value)


@dataclass(frozen=True)
class FlexWindows:
    """One flex_attention call over [image keys | proxies | extra keys], tokens in window order."""

    #: compiled (what runs), or flex's eager reference path (tests)
    compiled: bool = True
    #: the BlockMask's tile (queries and keys)
    tile: int = 128
    #: torch.compile's `dynamic`: None (CUDA) lets shapes go dynamic at a second resolution, so new
    #: resolutions do not reach the recompile limit (past it flex runs eagerly, writing every logit);
    #: False on CPU, where inductor's flex template does not compile with symbolic shapes (torch 2.13)
    dynamic: bool | None = False
    name = "flex"

    def block_mask(self, plan: WindowPlan, extra: int) -> BlockMask:
        """The plan's BlockMask for `extra` extra keys, from each tile's first and last window: a tile pair
        of image keys runs where their windows overlap (fully where both are one and the same window), of
        proxies unless both lie in one window (fully where their windows are apart), of extra keys always;
        padding columns are masked."""
        cache_key = (extra, self.tile)
        if cache_key in plan.flex:
            return plan.flex[cache_key]
        tile, device = self.tile, plan.proxy_order.device
        q_ids, k_ids = plan.queries.sorted_ids, plan.keys.sorted_ids
        q_first, q_last = (t.unsqueeze(-1) for t in _tiles(q_ids, tile)[:2])  # (Sq, QB, 1)
        k_first, k_last, k_pad = _tiles(k_ids, tile)
        k_first, k_last = k_first.unsqueeze(-2), k_last.unsqueeze(-2)  # (Sk, 1, KB)
        one_window = q_first == q_last
        image_full = one_window & (k_first == k_last) & (q_first == k_first) & ~k_pad
        partial, full = [(q_first <= k_last) & (k_first <= q_last) & ~image_full], [image_full]
        columns, flips = [_padded(k_ids, tile, -1, _PAD)], [torch.zeros(k_pad.numel() * tile, dtype=torch.bool,
                                                                        device=device)]
        if plan.proxies:
            proxy_ids = plan.windows.proxy_local[plan.proxy_order]
            p_first, p_last, p_pad = _tiles(proxy_ids, tile)
            own = one_window & (p_first == p_last) & (q_first == p_first)
            apart = ((q_last < p_first) | (p_last < q_first)) & ~p_pad
            partial.append(~own & ~apart)
            full.append(apart)
            columns.append(_padded(proxy_ids, tile, -1, _PAD).unsqueeze(0))
            flips.append(_padded(torch.ones(plan.proxies, dtype=torch.bool, device=device), tile, -1, False))
        if extra:  # always attended (a text padding bias is the score_mod's)
            e_pad = torch.arange(1, -(-extra // tile) + 1, device=device) * tile > extra
            partial.append(e_pad)
            full.append(~e_pad)
            columns.append(_padded(torch.full((1, extra), -1, device=device), tile, -1, _PAD))
            flips.append(_padded(torch.ones(extra, dtype=torch.bool, device=device), tile, -1, False))
        samples, rows = max(q_ids.shape[0], k_ids.shape[0]), q_first.shape[-2]

        def ordered(tiles: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            """(count, indices first) of the chosen key tiles per query tile, (S, 1, QB) and (S, 1, QB, KB)."""
            chosen = torch.cat([t.expand(samples, rows, t.shape[-1]) for t in tiles], -1).unsqueeze(1)
            return chosen.sum(-1, dtype=torch.int32), (~chosen).byte().argsort(dim=-1, stable=True).int()

        query_window = _lookup(_repeat_last(q_ids, tile))
        column_window = _lookup(torch.cat([c.expand(k_ids.shape[0], -1) for c in columns], -1))
        flip = torch.cat(flips)

        def mask_mod(b, h, q, kv):  # own window for image keys, any other for proxies, always for extra keys
            return (query_window(b, q) == column_window(b, kv)) != flip[kv]

        mask = BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=tile, mask_mod=mask_mod,
                                        seq_lengths=(rows * tile, flip.shape[0]), compute_q_blocks=False)
        plan.flex[cache_key] = mask
        return mask

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: WindowPlan,
                 key_bias: torch.Tensor | None = None, extra_key: torch.Tensor | None = None,
                 extra_value: torch.Tensor | None = None, extra_bias: torch.Tensor | None = None,
                 scale: float | None = None) -> tuple[torch.Tensor, int]:
        """The same as `TorchWindows`, in one flex_attention call."""
        batch, heads, queries, _ = query.shape
        extra = 0 if extra_key is None else extra_key.shape[2]
        tile, device = self.tile, query.device
        keys = [_padded(_by_rows(key, plan.keys.order, 2), tile)]
        values = [_padded(_by_rows(value, plan.keys.order, 2), tile)]
        image_bias = torch.zeros(1, 1, 1, key.shape[2], device=device) if key_bias is None else \
            _by_rows(key_bias.float(), plan.keys.order, -1)
        biases = [_padded(image_bias, tile, -1)]
        if plan.proxies:
            proxy_k, proxy_v, proxy_bias = pool(key, value, plan.windows, key_bias)
            keys.append(_padded(proxy_k.index_select(2, plan.proxy_order), tile))
            values.append(_padded(proxy_v.index_select(2, plan.proxy_order), tile))
            biases.append(_padded(proxy_bias.float().index_select(-1, plan.proxy_order), tile, -1))
        if extra:
            keys.append(_padded(extra_key, tile))
            values.append(_padded(extra_value, tile))
            text_bias = torch.zeros(1, 1, 1, extra, device=device) if extra_bias is None else extra_bias.float()
            biases.append(_padded(text_bias, tile, -1))
        lead = [max(b.shape[d] for b in biases) for d in (0, 1)]
        bias = torch.cat([b.expand(*lead, 1, b.shape[-1]) for b in biases], -1)[:, :, 0]  # fp32 (B|1, H|1, K)
        if lead == [1, 1]:
            row = bias[0, 0]

            def score_mod(score, b, h, q, kv):
                return score + row[kv]
        else:
            table = bias.expand(batch, heads, -1).contiguous()

            def score_mod(score, b, h, q, kv):
                return score + table[b, h, kv]

        attend = _compiled_flex(self.dynamic) if self.compiled else flex_attention
        out = attend(_padded(_by_rows(query, plan.queries.order, 2), tile), torch.cat(keys, 2), torch.cat(values, 2),
                     score_mod=score_mod, block_mask=self.block_mask(plan, extra), scale=scale)
        return _by_rows(out[:, :, :queries], plan.queries.rank, 2), plan.pairs(extra)


def window_kernel(name: str, device: torch.device, with_lse: LseKernel) -> TorchWindows | FlexWindows:
    """The window kernel `name` for `device`: "torch", "flex", or "auto": flex on CUDA (one fused call that
    writes no logits), torch on CPU, where it measured faster (`benchmarks/proxy_layer_speed.py`: at
    medium:wan's layer, 4,096 tokens, 2.64x over dense against compiled flex's 1.81x; at 16,384 tokens
    3.47x against 2.26x)."""
    if name == "auto":
        name = "flex" if torch.device(device).type == "cuda" else "torch"
    if name == "torch":
        return TorchWindows(with_lse)
    if name == "flex":
        return FlexWindows(dynamic=None if torch.device(device).type == "cuda" else False)
    raise ValueError(f"no window-attention kernel {name!r}: proxy attention runs on 'torch' or 'flex'")
