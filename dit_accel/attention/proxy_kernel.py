"""Proxy-token attention: exact attention inside a local window, one pooled proxy per other window.

Image tokens sit on a (frames, rows, cols) grid cut into local windows, and every local window into
proxy windows. A query attends exactly to the keys of its own local window and to the rest of the
grid through proxies: the mean key and value of a proxy window, its logit biased by log(its size) so
that the softmax weighs it as the tokens it stands for (SVG2's |K_j| exp(s_ij)). The proxies inside
the query's own local window are left out, so no key counts twice. Extra keys (text) are attended
exactly by every query. The two parts are separate attentions merged by their log-sum-exp; with one
local window over the whole grid, or proxies of one token, the result is dense attention.

`place` puts queries and keys into windows, `Prepared` computes their layout once per call for
every block; `attention` is the fast path (the local part as one
batched SDPA over padded windows, the proxy part as one SDPA over proxies and extra keys, in query
chunks); `reference` is the plain masked attention over exact keys and proxies that tests compare
against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import pooling
from .merge import attention_with_lse, merge, sdpa_with_lse

Size3 = tuple[int, int, int]
#: logit-bias elements of one proxy-part chunk (queries x (proxies + extra keys) x samples)
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Windows:
    """The local and proxy window of every image query and key; rows are samples, or one for all."""

    q_local: torch.Tensor  # (S, n) local window of each query
    k_local: torch.Tensor  # (S, N) local window of each key
    k_proxy: torch.Tensor  # (S, N) proxy window of each key
    proxy_local: torch.Tensor  # (M,) local window each proxy window lies in
    locals: int
    #: the keys are the whole grid: every window holds keys, the query's own position among them
    whole_keys: bool = False
    #: (extent, proxy size) when the keys are the whole grid in order and proxies tile it exactly
    tiling: tuple[Size3, Size3] | None = None

    @property
    def proxies(self) -> int:
        return self.proxy_local.shape[0]


def _window_ids(coordinates: torch.Tensor, size: Size3, shift: Size3, extent: Size3) -> tuple[torch.Tensor, int]:
    """Window of every (..., 3) coordinate, windows of `size` whose boundaries sit `shift` earlier."""
    per_dim = [(extent[d] - 1 + shift[d]) // size[d] + 1 for d in range(3)]
    index = [(coordinates[..., d] + shift[d]) // size[d] for d in range(3)]
    return (index[0] * per_dim[1] + index[1]) * per_dim[2] + index[2], per_dim[0] * per_dim[1] * per_dim[2]


def place(q_coordinates: torch.Tensor, k_coordinates: torch.Tensor, extent: Size3, local: Size3, proxy: Size3,
          shifted: bool = False) -> Windows:
    """Windows of (S, n, 3) query and (S, N, 3) key coordinates on a grid of `extent`. Windows larger
    than the grid are clipped to it; a local window is a whole number of proxy windows (or the whole
    extent), and `shifted` moves local boundaries by half a window, in whole proxy windows (Swin)."""
    local = tuple(min(w, e) for w, e in zip(local, extent))
    proxy = tuple(min(p, w) for p, w in zip(proxy, local))
    for d in range(3):
        if local[d] % proxy[d] and local[d] != extent[d]:
            raise ValueError(f"local window {local} is not a whole number of proxy windows {proxy}")
    shift = tuple((w // 2 // p) * p if shifted and w < e else 0 for w, p, e in zip(local, proxy, extent))
    q_local, locals_ = _window_ids(q_coordinates, local, shift, extent)
    k_local, _ = _window_ids(k_coordinates, local, shift, extent)
    k_proxy, proxies = _window_ids(k_coordinates, proxy, (0, 0, 0), extent)
    per_dim = [(e - 1) // p + 1 for e, p in zip(extent, proxy)]
    starts = torch.stack(torch.meshgrid(*[torch.arange(n, device=k_coordinates.device) * p
                                          for n, p in zip(per_dim, proxy)], indexing="ij"), -1).reshape(-1, 3)
    proxy_local, _ = _window_ids(starts, local, shift, extent)
    whole = k_coordinates.shape[:2] == (1, extent[0] * extent[1] * extent[2])  # then in grid order
    tiling = (extent, proxy) if whole and all(e % p == 0 for e, p in zip(extent, proxy)) else None
    return Windows(q_local, k_local, k_proxy, proxy_local, locals_, whole, tiling)


def pool(key: torch.Tensor, value: torch.Tensor, windows: Windows, key_bias: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(proxy keys, proxy values (B, H, M, D), log-size bias (B|1, H|1, 1, M)) of the proxy windows."""
    if key_bias is None and windows.tiling is not None:
        extent, size = windows.tiling
        log_size = key.new_full((1, 1, 1, windows.proxies), float(size[0] * size[1] * size[2])).log()
        return pooling.tiled_mean(key, extent, size), pooling.tiled_mean(value, extent, size), log_size
    return pooling.pool(key, value, windows.k_proxy, windows.proxies, key_bias)


@dataclass(frozen=True)
class _Layout:
    """Tokens of one side grouped by local window into a (windows x width) padded layout."""

    slot: torch.Tensor  # (S, n) position of every token in the layout
    order: torch.Tensor | None  # (n,) tokens in layout order, when one row fills the layout exactly
    width: int
    counts: torch.Tensor  # (S, windows)

    @classmethod
    def of(cls, ids: torch.Tensor, windows: int) -> "_Layout":
        order = ids.argsort(dim=-1, stable=True)
        counts = torch.zeros(ids.shape[0], windows, dtype=torch.long, device=ids.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids))
        sorted_ids = ids.gather(1, order)
        rank = torch.arange(ids.shape[1], device=ids.device) - (counts.cumsum(1) - counts).gather(1, sorted_ids)
        width = int(counts.max())
        slot = torch.empty_like(ids).scatter_(1, order, sorted_ids * width + rank)
        full = ids.shape[0] == 1 and bool((counts == width).all())
        return cls(slot, order[0] if full else None, width, counts)

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, n, D) tokens as (B * H, windows, width, D), zero-padded."""
        batch, heads, _, dim = x.shape
        windows = self.counts.shape[1]
        if self.order is not None:
            return x.index_select(2, self.order).view(batch * heads, windows, self.width, dim)
        index = self.slot.expand(batch, -1).unsqueeze(1).unsqueeze(-1).expand(batch, heads, -1, dim)
        padded = x.new_zeros(batch, heads, windows * self.width, dim).scatter_(2, index, x)
        return padded.view(batch * heads, windows, self.width, dim)

    def scatter(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """(B * H, windows, width, ...) back to (B, H, n, ...) in token order."""
        flat = x.reshape(batch, -1, x.shape[1] * x.shape[2], *x.shape[3:])
        if self.order is not None:
            return flat.index_select(2, self.slot[0])
        index = self.slot.expand(batch, -1).unsqueeze(1).expand(batch, flat.shape[1], -1)
        if flat.ndim == 4:
            index = index.unsqueeze(-1).expand(-1, -1, -1, flat.shape[-1])
        return flat.gather(2, index)


@dataclass(frozen=True)
class Prepared:
    """Everything about the windows that does not depend on q/k/v: computed once, used by every block."""

    windows: Windows
    queries: _Layout
    keys: _Layout
    #: (S, L, width) -inf on the padding of the key layout, or None without padding
    key_padding: torch.Tensor | None
    #: per query chunk: (S, 1, c, M) logit bias of the proxies without a key bias: log(size), and -inf
    #: on the proxies inside the query's own local window
    own: list[tuple[slice, torch.Tensor]]

    @classmethod
    def of(cls, windows: Windows, dtype: torch.dtype = torch.float32, extra_keys: int = 0) -> "Prepared":
        queries, keys = _Layout.of(windows.q_local, windows.locals), _Layout.of(windows.k_local, windows.locals)
        padding = None
        if bool((keys.counts != keys.width).any()):
            present = torch.arange(keys.width, device=keys.counts.device) < keys.counts.unsqueeze(-1)
            padding = torch.zeros(present.shape, dtype=dtype, device=present.device).masked_fill(~present, -torch.inf)
        proxies = windows.proxies if windows.locals > 1 else 0  # one local window holds every proxy
        sizes = torch.zeros(windows.k_proxy.shape[0], windows.proxies, device=windows.k_proxy.device)
        sizes.scatter_add_(1, windows.k_proxy, torch.ones_like(windows.k_proxy, dtype=sizes.dtype))
        log_sizes = sizes[:, :proxies].log().unsqueeze(1)  # what `pool` adds without a key bias
        rows = max(1, CHUNK_ELEMENTS // ((proxies + extra_keys) * windows.q_local.shape[0] or 1))
        own = []
        for start in range(0, windows.q_local.shape[1], rows):
            chunk = slice(start, start + rows)
            inside = windows.q_local[:, chunk].unsqueeze(-1) == windows.proxy_local[:proxies]
            own.append((chunk, (log_sizes.masked_fill(inside, -torch.inf)).unsqueeze(1).to(dtype)))
        return cls(windows, queries, keys, padding, own)


def _local_part(query, key, value, prepared: Prepared, key_bias, scale) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Every query against the exact keys of its local window: (output, lse, pairs computed per group)."""
    batch, heads = query.shape[:2]
    windows, keys = prepared.windows.locals, prepared.keys
    mask = None
    if prepared.key_padding is not None or key_bias is not None:
        mask = torch.zeros(1, 1, windows, keys.width, dtype=query.dtype, device=query.device)
        if prepared.key_padding is not None:
            mask = mask + prepared.key_padding.to(query.dtype).unsqueeze(1)
        if key_bias is not None:
            per_key = key_bias.to(query.dtype).expand(batch, heads, 1, -1).transpose(2, 3)  # (B, H, N, 1)
            mask = mask + keys.gather(per_key)[..., 0].view(batch, heads, windows, keys.width)
        mask = mask.expand(batch, heads, -1, -1).reshape(batch * heads, windows, 1, keys.width)
    out, lse = sdpa_with_lse(prepared.queries.gather(query), keys.gather(key), keys.gather(value), mask, scale,
                             every_query_has_keys=prepared.windows.whole_keys)
    out, lse = prepared.queries.scatter(out, batch), prepared.queries.scatter(lse, batch)
    return out, lse, windows * prepared.queries.width * keys.width


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prepared: Prepared,
              key_bias: torch.Tensor | None = None, extra_key: torch.Tensor | None = None,
              extra_value: torch.Tensor | None = None, extra_bias: torch.Tensor | None = None,
              scale: float | None = None) -> tuple[torch.Tensor, int]:
    """(output (B, H, n, D), pairs computed per (sample, head)) of image queries (B, H, n, D) against
    image keys/values (B, H, N, D) and the extra keys (B, H, T, D). Biases are per key, (B|1, H|1, 1, K)."""
    out, lse, pairs = _local_part(query, key, value, prepared, key_bias, scale)
    windows = prepared.windows
    if windows.locals == 1 and extra_key is None:
        return out, pairs
    # with the whole grid as keys, every query has other windows' proxies, or unmasked extra keys
    alive = windows.whole_keys and (windows.locals > 1 or extra_bias is None)
    keys = values = proxy_bias = None
    if windows.locals > 1:
        keys, values, proxy_bias = pool(key, value, windows, key_bias)
    if extra_key is not None:
        keys = extra_key if keys is None else torch.cat([keys, extra_key], 2)
        values = extra_value if values is None else torch.cat([values, extra_value], 2)
        extra_bias = query.new_zeros(1, 1, 1, extra_key.shape[2]) if extra_bias is None else extra_bias
    parts = []
    for chunk, own in prepared.own:
        bias = own.to(query.dtype)  # log sizes, own window removed
        if key_bias is not None and proxy_bias is not None:  # sizes weighted by the keys' bias
            bias = bias.masked_fill(bias > -torch.inf, 0.0) + proxy_bias.to(query.dtype)
        if extra_key is not None:
            lead = [max(a, b) for a, b in zip(bias.shape[:2], extra_bias.shape[:2])]
            bias = torch.cat([bias.expand(*lead, -1, -1),
                              extra_bias.to(query.dtype).expand(*lead, bias.shape[2], -1)], -1)
        parts.append(sdpa_with_lse(query[:, :, chunk], keys, values, bias, scale, every_query_has_keys=alive))
    far, far_lse = (torch.cat(p, 2) for p in zip(*parts))
    out, _ = merge(out, lse, far, far_lse)
    return out, pairs + query.shape[2] * keys.shape[2]


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, windows: Windows,
              key_bias: torch.Tensor | None = None, extra_key: torch.Tensor | None = None,
              extra_value: torch.Tensor | None = None, extra_bias: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """The same as `attention`, as one masked attention over [exact keys, proxies, extra keys]."""
    batch, heads, n, _ = query.shape
    proxy_k, proxy_v, proxy_bias = pool(key, value, windows, key_bias)
    exact = windows.q_local.unsqueeze(-1) == windows.k_local.unsqueeze(1)  # (S, n, N)
    far = windows.q_local.unsqueeze(-1) != windows.proxy_local  # (S, n, M)
    keys, values, masks = [key, proxy_k], [value, proxy_v], [exact, far]
    biases = [torch.zeros(1, 1, 1, key.shape[2]) if key_bias is None else key_bias.float(), proxy_bias]
    if extra_key is not None:
        keys.append(extra_key)
        values.append(extra_value)
        masks.append(torch.ones(1, n, extra_key.shape[2], dtype=torch.bool))
        biases.append(torch.zeros(1, 1, 1, extra_key.shape[2]) if extra_bias is None else extra_bias.float())
    mask = torch.cat([m.expand(exact.shape[0], n, -1) for m in masks], -1).unsqueeze(1)
    bias = torch.cat([b.expand(batch, heads, 1, -1) for b in biases], -1)
    return attention_with_lse(query, torch.cat(keys, 2), torch.cat(values, 2), bias, mask, scale)[0]
