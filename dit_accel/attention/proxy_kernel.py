"""Proxy-token attention: exact attention inside a local window, one pooled proxy per other window.

Image tokens sit on a (frames, rows, cols) grid cut into local windows, and every local window into
proxy windows. A query attends exactly to the keys of its own local window and to the rest of the
grid through proxies: the mean key and value of a proxy window, its logit biased by log(its size) so
that the softmax weighs it as the tokens it stands for (SVG2's |K_j| exp(s_ij)). The proxies inside
the query's own local window are left out, so no key counts twice. Extra keys (text) are attended
exactly by every query. The two parts are separate attentions merged by their log-sum-exp; with one
local window over the whole grid, or proxies of one token, the result is dense attention.

This module plans: `place` puts queries and keys into windows (per-token window ids), `pool` makes
the proxies, `reference` is the plain masked attention over exact keys and proxies that the kernels
(`kernels/windows.py`: a `WindowPlan` built once per resolution, the `torch` and `flex` kernels)
are tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import pooling
from .merge import attention_with_lse

Size3 = tuple[int, int, int]


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
    """(proxy keys, proxy values (B, H, M, D), fp32 log-size bias (B|1, H|1, 1, M)) of the proxy windows."""
    if key_bias is None and windows.tiling is not None:
        extent, size = windows.tiling
        log_size = torch.full((1, 1, 1, windows.proxies), float(size[0] * size[1] * size[2]), device=key.device).log()
        return pooling.tiled_mean(key, extent, size), pooling.tiled_mean(value, extent, size), log_size
    return pooling.pool(key, value, windows.k_proxy, windows.proxies, key_bias)


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, windows: Windows,
              key_bias: torch.Tensor | None = None, extra_key: torch.Tensor | None = None,
              extra_value: torch.Tensor | None = None, extra_bias: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """Window attention as one masked attention over [exact keys, proxies, extra keys] (fp32 logits):
    image queries (B, H, n, D) against image keys/values (B, H, N, D) and the extra keys (B, H, T, D);
    biases are per key, (B|1, H|1, 1, K)."""
    batch, heads, n, _ = query.shape
    proxy_k, proxy_v, proxy_bias = pool(key, value, windows, key_bias)
    exact = windows.q_local.unsqueeze(-1) == windows.k_local.unsqueeze(1)  # (S, n, N)
    far = windows.q_local.unsqueeze(-1) != windows.proxy_local  # (S, n, M)
    keys, values, masks = [key, proxy_k], [value, proxy_v], [exact, far]
    zeros = lambda count: torch.zeros(1, 1, 1, count, device=key.device)  # noqa: E731
    biases = [zeros(key.shape[2]) if key_bias is None else key_bias.float(), proxy_bias.float()]
    if extra_key is not None:
        keys.append(extra_key)
        values.append(extra_value)
        masks.append(torch.ones(1, n, extra_key.shape[2], dtype=torch.bool, device=key.device))
        biases.append(zeros(extra_key.shape[2]) if extra_bias is None else extra_bias.float())
    mask = torch.cat([m.expand(exact.shape[0], n, -1) for m in masks], -1).unsqueeze(1)
    bias = torch.cat([b.expand(batch, heads, 1, -1) for b in biases], -1)
    return attention_with_lse(query, torch.cat(keys, 2), torch.cat(values, 2), bias, mask, scale)[0]
