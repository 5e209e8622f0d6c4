"""Attention kernels against their plain references: k-means, the log-sum-exp merge, block-sparse."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit_accel.attention import block_sparse, kmeans, merge, proxy_kernel


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _inertia(points, labels, centroids):
    return (points - centroids.gather(1, labels.unsqueeze(-1).expand_as(points))).pow(2).sum()


def test_kmeans_converges_warm_starts_and_its_permutation_round_trips():
    centers = _randn(2, 4, 8, seed=1) * 10  # two groups (heads), four far-apart centers each
    truth = torch.randint(0, 4, (2, 200), generator=torch.Generator().manual_seed(2))
    points = centers.gather(1, truth.unsqueeze(-1).expand(-1, -1, 8)) + 0.1 * _randn(2, 200, 8, seed=3)
    first = kmeans.kmeans(points, 4, 1)
    labels, centroids, sizes = kmeans.kmeans(points, 4, 20)
    assert _inertia(points, labels, centroids) <= _inertia(points, first[0], first[1])
    assert torch.equal(labels, kmeans.assign(points, centroids))  # every point in its nearest cluster
    assert sizes.sum(-1).tolist() == [200, 200]
    warm, again, _ = kmeans.kmeans(points, 4, 2, centroids=centroids)  # a fixed point stays put
    assert torch.equal(warm, labels) and torch.allclose(again, centroids)
    permutation, offsets = kmeans.cluster_permutation(labels, 4)
    permuted = points.gather(1, permutation.unsqueeze(-1).expand_as(points))
    assert (labels.gather(1, permutation).diff(dim=-1) >= 0).all()  # clusters contiguous
    assert torch.equal(offsets.diff(dim=-1), sizes)
    restored = torch.empty_like(permuted).scatter_(1, permutation.unsqueeze(-1).expand_as(points), permuted)
    assert torch.equal(restored, points)


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


def _clusters(groups: int, length: int, clusters: int, seed: int) -> torch.Tensor:
    """(G, clusters + 1) offsets of random non-empty clusters covering `length` tokens."""
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.stack([torch.randperm(length - 1, generator=generator)[: clusters - 1] + 1 for _ in range(groups)])
    ends = torch.full((groups, 1), length)
    return torch.cat([torch.zeros(groups, 1, dtype=torch.long), cuts.sort(-1).values, ends], -1)


def test_block_sparse_with_every_block_kept_is_dense_and_both_kernels_match_the_reference():
    groups, q_len, k_len = 4, 60, 50
    query, key, value = _randn(groups, q_len, 16, seed=9), _randn(groups, k_len, 16, seed=10), _randn(groups, k_len, 16, seed=11)
    q_offsets, k_offsets = _clusters(groups, q_len, 5, 12), _clusters(groups, k_len, 6, 13)
    everything = torch.ones(groups, 5, 6, dtype=torch.bool)
    dense = F.scaled_dot_product_attention(query, key, value)
    kernels = (block_sparse.reference, block_sparse.gathered, block_sparse.padded)
    for kernel in kernels:
        torch.testing.assert_close(kernel(query, key, value, q_offsets, k_offsets, everything), dense)
    assert block_sparse.pairs(q_offsets, k_offsets, everything).tolist() == [q_len * k_len] * groups

    keep = torch.rand(groups, 5, 6, generator=torch.Generator().manual_seed(14)) < 0.4
    keep[:, :, 0] = True  # every query cluster keeps a key cluster
    bias = _randn(groups, k_len, seed=15).unsqueeze(1)
    expected = block_sparse.reference(query, key, value, q_offsets, k_offsets, keep, bias)
    for kernel in kernels[1:]:
        torch.testing.assert_close(kernel(query, key, value, q_offsets, k_offsets, keep, bias), expected)
    mask = block_sparse.token_mask(q_offsets, k_offsets, keep, q_len, k_len)
    assert block_sparse.pairs(q_offsets, k_offsets, keep).tolist() == mask.sum((1, 2)).tolist()
    assert not torch.allclose(expected, dense)
    padded, kept = block_sparse.padded_work(q_offsets, k_offsets, keep)
    assert padded >= kept == int(block_sparse.pairs(q_offsets, k_offsets, keep).max())


def test_block_sparse_stand_ins_make_skipped_clusters_of_equal_keys_exact():
    """A cluster of identical keys and values is exactly its stand-in (mean, log-size bias): with
    stand-ins the sparse result is dense whatever is skipped; the kernels agree on any keys."""
    groups, q_len, k_len = 3, 40, 36
    k_offsets = torch.tensor([0, 4, 10, 16, 20, 30, 36]).expand(groups, -1)
    labels = torch.searchsorted(k_offsets[:, 1:].contiguous(), torch.arange(k_len).expand(groups, -1).contiguous(),
                                right=True)
    centers_k, centers_v = _randn(groups, 6, 16, seed=17), _randn(groups, 6, 16, seed=18)
    key = centers_k.gather(1, labels.unsqueeze(-1).expand(-1, -1, 16))
    value = centers_v.gather(1, labels.unsqueeze(-1).expand(-1, -1, 16))
    query = _randn(groups, q_len, 16, seed=19)
    q_offsets = _clusters(groups, q_len, 4, 20)
    keep = torch.rand(groups, 4, 6, generator=torch.Generator().manual_seed(21)) < 0.3
    keep[:, :, 1] = True
    sizes = k_offsets.diff(dim=-1).float()
    stand_ins = (centers_k, centers_v, sizes.log())
    dense = F.scaled_dot_product_attention(query, key, value)
    for kernel in (block_sparse.reference, block_sparse.gathered, block_sparse.padded):
        torch.testing.assert_close(kernel(query, key, value, q_offsets, k_offsets, keep, stand_ins=stand_ins), dense)
    noisy = key + _randn(groups, k_len, 16, seed=22)
    expected = block_sparse.reference(query, noisy, value, q_offsets, k_offsets, keep, stand_ins=stand_ins)
    for kernel in (block_sparse.gathered, block_sparse.padded):
        torch.testing.assert_close(kernel(query, noisy, value, q_offsets, k_offsets, keep, stand_ins=stand_ins),
                                   expected)


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
        prepared = proxy_kernel.Prepared.of(proxy_kernel.place(coords, coords, extent, local, size, shifted), extra_keys=4)
        torch.testing.assert_close(proxy_kernel.attention(query, key, value, prepared, None, text_k, text_v)[0], dense)

    windows = proxy_kernel.place(coords, coords, extent, (1, 4, 4), (1, 2, 2), True)
    bias = _randn(2, 1, 1, tokens, seed=25)  # stage 5's per-key bias
    text_bias = torch.zeros(1, 1, 1, 4)
    text_bias[..., -1] = float("-inf")  # a padded text token
    out, pairs = proxy_kernel.attention(query, key, value, proxy_kernel.Prepared.of(windows, extra_keys=4), bias, text_k, text_v,
                                 text_bias)
    torch.testing.assert_close(out, proxy_kernel.reference(query, key, value, windows, bias, text_k, text_v, text_bias))
    assert pairs < tokens * (tokens + 4) and not torch.allclose(out, dense, atol=1e-2)

    # queries a per-sample subset (as RAS computes them), keys the whole grid
    index = torch.stack([torch.randperm(tokens, generator=torch.Generator().manual_seed(s))[:40].sort().values
                         for s in (26, 27)])
    subset_q = query.gather(2, index[:, None, :, None].expand(-1, 3, -1, 16))
    windows = proxy_kernel.place(coords[0][index], coords, extent, (1, 4, 4), (1, 2, 2))
    torch.testing.assert_close(proxy_kernel.attention(subset_q, key, value, proxy_kernel.Prepared.of(windows))[0],
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
