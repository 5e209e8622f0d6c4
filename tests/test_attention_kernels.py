"""Attention kernels against their plain references: the log-sum-exp merge, proxy attention (SVG2's
k-means and cluster kernels: test_cluster_kernels.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit_accel.attention import merge, proxy_kernel
from dit_accel.attention.kernels.dense import fused_cpu
from dit_accel.attention.kernels.windows import TorchWindows, WindowPlan


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_lse_merge_of_a_split_attention_equals_the_whole():
    query, key, value = _randn(2, 3, 7, 16, seed=5), _randn(2, 3, 11, 16, seed=6), _randn(2, 3, 11, 16, seed=7)
    bias = _randn(1, 1, 1, 11, seed=8)
    full = F.scaled_dot_product_attention(query, key, value, attn_mask=bias)
    first, second = slice(0, 4), slice(4, 11)
    out_a, lse_a = merge.attention_with_lse(query, key[:, :, first], value[:, :, first], bias[..., first])
    out_b, lse_b = merge.attention_with_lse(query, key[:, :, second], value[:, :, second], bias[..., second])
    out, lse = merge.merge(out_a, lse_a, out_b, lse_b)
    torch.testing.assert_close(out, full)
    logits = (query @ key.transpose(-1, -2)) / 4 + bias
    torch.testing.assert_close(lse, torch.logsumexp(logits, -1))


def _grid_coordinates(frames, rows, cols):
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([f, r, c], -1).reshape(1, -1, 3)


def test_proxy_attention_is_dense_with_one_window_or_one_token_proxies_and_matches_its_reference():
    extent = (3, 5, 6)  # windows of 2 x 4 x 4 do not tile it: edge windows are partial
    coords = _grid_coordinates(*extent)
    tokens = coords.shape[1]
    query, key, value = (_randn(2, 3, tokens, 16, seed=s) for s in (20, 21, 22))
    text_k, text_v = _randn(2, 3, 4, 16, seed=23), _randn(2, 3, 4, 16, seed=24)
    dense = F.scaled_dot_product_attention(query, torch.cat([key, text_k], 2), torch.cat([value, text_v], 2))
    for local, size, shifted in [((9, 9, 9), (1, 2, 2), False), ((1, 2, 2), (1, 1, 1), False),
                                 ((2, 4, 4), (1, 1, 1), True)]:
        plan = WindowPlan.of(proxy_kernel.place(coords, coords, extent, local, size, shifted))
        torch.testing.assert_close(TorchWindows(fused_cpu)(query, key, value, plan, None, text_k, text_v)[0], dense)

    windows = proxy_kernel.place(coords, coords, extent, (1, 4, 4), (1, 2, 2), True)
    bias = _randn(2, 1, 1, tokens, seed=25)  # stage 5's per-key bias
    text_bias = torch.zeros(1, 1, 1, 4)
    text_bias[..., -1] = float("-inf")  # a padded text token
    out, pairs = TorchWindows(fused_cpu)(query, key, value, WindowPlan.of(windows), bias, text_k, text_v, text_bias)
    torch.testing.assert_close(out, proxy_kernel.reference(query, key, value, windows, bias, text_k, text_v, text_bias))
    assert pairs < tokens * (tokens + 4) and not torch.allclose(out, dense, atol=1e-2)

    # queries a per-sample subset (as RAS computes them), keys the whole grid
    index = torch.stack([torch.randperm(tokens, generator=torch.Generator().manual_seed(s))[:40].sort().values
                         for s in (26, 27)])
    subset_q = query.gather(2, index[:, None, :, None].expand(-1, 3, -1, 16))
    windows = proxy_kernel.place(coords[0][index], coords, extent, (1, 4, 4), (1, 2, 2))
    torch.testing.assert_close(TorchWindows(fused_cpu)(subset_q, key, value, WindowPlan.of(windows))[0],
                               proxy_kernel.reference(subset_q, key, value, windows))


def test_proxy_pooling_weighs_keys_by_their_bias_and_tiles_the_grid_exactly():
    coords = _grid_coordinates(2, 4, 4)
    key, value = _randn(1, 2, 32, 8, seed=28), _randn(1, 2, 32, 8, seed=29)
    windows = proxy_kernel.place(coords, coords, (2, 4, 4), (1, 4, 4), (1, 2, 2))
    assert windows.tiling is not None
    tiled = proxy_kernel.pool(key, value, windows)
    scattered = proxy_kernel.pool(key, value, windows, torch.zeros(1, 1, 1, 32))  # the general path
    for a, b in zip(tiled, scattered):
        torch.testing.assert_close(a.expand_as(b), b)
    torch.testing.assert_close(tiled[2], torch.full((1, 1, 1, 8), 4.0).log())
    first = windows.k_proxy[0] == 0
    torch.testing.assert_close(tiled[0][:, :, 0], key[:, :, first].mean(2))
