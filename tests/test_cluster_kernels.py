"""SVG2's kernel layer against its plain references on this CPU: k-means at scale, fp32 pooling, the
cluster plan's BlockMask, and the cluster kernels (torch, flex eager and compiled) on one plan."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from helpers import run
from torch.nn.attention.flex_attention import create_block_mask
from torch.utils._python_dispatch import TorchDispatchMode

import dit_accel
from dit_accel.attention import kmeans, pooling
from dit_accel.attention.kernels import clusters
from dit_accel.attention.kernels.dense import fused_cpu
from dit_accel.config import ConfigError
from dit_accel.testing import FAMILIES, tiny_pipeline
from dit_accel.testing.dispatch import count_dispatches

#: (fp32, bf16) tolerances of a kernel against the fp32 reference: bf16 outputs are rounded once (~2^-8)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _offsets(groups: int, length: int, clusters_: int, seed: int) -> torch.Tensor:
    """(G, clusters + 1) offsets of random non-empty clusters covering `length` tokens."""
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.stack([torch.randperm(length - 1, generator=generator)[: clusters_ - 1] + 1 for _ in range(groups)])
    ends = torch.full((groups, 1), length)
    return torch.cat([torch.zeros(groups, 1, dtype=torch.long), cuts.sort(-1).values, ends], -1)


def _inputs(*, text=0, stand_ins=True, key_bias=True, dtype=torch.float32, keep_all=False, batch=1, heads=2,
            q_image=200, k_image=180, dim=16, q_clusters=5, k_clusters=7):
    """(query, key, value (G, S, D) in the permuted order, plan): random clusters and kept pairs, text
    as one more cluster on each side, a stand-in per image key cluster, a key bias with a text padding
    key at -inf."""
    groups = batch * heads
    q_offsets, k_offsets = _offsets(groups, q_image, q_clusters, 1), _offsets(groups, k_image, k_clusters, 2)
    keep = torch.ones(groups, q_clusters, k_clusters, dtype=torch.bool) if keep_all else \
        torch.rand(groups, q_clusters, k_clusters, generator=torch.Generator().manual_seed(3)) < 0.4
    keep[:, :, 0] = True
    if text:
        q_offsets = torch.cat([q_offsets, q_offsets[:, -1:] + text], 1)
        k_offsets = torch.cat([k_offsets, k_offsets[:, -1:] + text], 1)
        keep = torch.cat([keep, torch.ones(groups, q_clusters, 1, dtype=torch.bool)], 2)
        keep = torch.cat([keep, torch.ones(groups, 1, k_clusters + 1, dtype=torch.bool)], 1)
    q_len, k_len = q_image + text, k_image + text
    query, key, value = (_randn(groups, n, dim, seed=s, dtype=dtype) for s, n in ((4, q_len), (5, k_len), (6, k_len)))
    stand = None
    if stand_ins:
        stand = (_randn(groups, k_clusters, dim, seed=7, dtype=dtype), _randn(groups, k_clusters, dim, seed=8, dtype=dtype),
                 k_offsets.diff(dim=-1)[:, :k_clusters].float().log())
    bias = None
    if key_bias:
        bias = _randn(groups, k_len, seed=9)
        bias[:, -1] = float("-inf")
    plan = clusters.ClusterPlan(batch, heads, q_len, k_len, slice(0, q_image), slice(0, k_image),
                                torch.arange(q_image).expand(groups, -1), torch.arange(k_image).expand(groups, -1),
                                q_offsets, k_offsets, keep, stand, bias)
    return query, key, value, plan


def _token_mask(plan: clusters.ClusterPlan) -> torch.Tensor:
    """(G, Q, columns) which permuted query attends which column, token by token."""
    columns = plan.columns
    rows = columns.keep.gather(1, clusters.token_clusters(plan.q_offsets, plan.q_len).unsqueeze(-1).expand(
        -1, -1, columns.keep.shape[-1]))
    return rows.gather(2, clusters.token_clusters(columns.offsets, plan.k_len + columns.stand_ins).unsqueeze(1).expand(
        -1, plan.q_len, -1))


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------ k-means


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
    permutation, offsets = kmeans.cluster_permutation(labels, sizes)
    permuted = points.gather(1, permutation.unsqueeze(-1).expand_as(points))
    assert (labels.gather(1, permutation).diff(dim=-1) >= 0).all()  # clusters contiguous
    assert torch.equal(offsets.diff(dim=-1), sizes)
    restored = torch.empty_like(permuted).scatter_(1, permutation.unsqueeze(-1).expand_as(points), permuted)
    assert torch.equal(restored, points)


def test_kmeans_sizes_without_bincount_assignment_in_chunks_and_bf16_points(monkeypatch):
    points = _randn(3, 500, 16, seed=10)
    centroids = _randn(3, 12, 16, seed=11)
    whole = kmeans.assign(points, centroids)
    with _Ops() as ops:
        labels, found, sizes = kmeans.kmeans(points, 12, 3, centroids)
    assert "aten.bincount" not in ops.names and "aten.scatter_add_" in ops.names
    reference = torch.stack([torch.bincount(row, minlength=12) for row in labels])
    assert torch.equal(sizes, reference)
    monkeypatch.setattr(kmeans, "ASSIGN_ELEMENTS", 3 * 12 * 7)  # 7 points a chunk
    assert torch.equal(kmeans.assign(points, centroids), whole)
    assert torch.equal(kmeans.kmeans(points, 12, 3, centroids)[0], labels)
    # bf16 points (GEMM in bf16, centroids fp32): well-separated clusters come out the same
    centers = _randn(3, 12, 16, seed=12) * 10
    truth = torch.randint(0, 12, (3, 500), generator=torch.Generator().manual_seed(13))
    clustered = centers.gather(1, truth.unsqueeze(-1).expand(-1, -1, 16)) + 0.1 * points
    labels, found, _ = kmeans.kmeans(clustered, 12, 5, centers)
    labels_bf16, found_bf16, _ = kmeans.kmeans(clustered.bfloat16(), 12, 5, centers)
    assert found_bf16.dtype == torch.float32 and torch.equal(labels_bf16, labels)
    torch.testing.assert_close(found_bf16, found, rtol=0, atol=0.05)


def test_kmeans_warm_start_survives_a_query_subset():
    """Cluster counts from the grid: a call on a subset of the tokens (RAS) keeps the centroids' shape."""
    config = dit_accel.SVG2Config()
    assert config.clusters_for(4096, 4096) == config.clusters_for(4096, 4096, None)
    assert config.clusters_for(4096, 4096, 128)[1] == 32  # flex: one key cluster per tile


# ------------------------------------------------------------------------------------------------ pooling


def test_pooling_sums_in_fp32():
    """4,096 bf16 ones pool to 1.0 (a bf16 running sum sticks at 256); contiguous segments equal `pool`."""
    ones = torch.ones(1, 1, 4096, 8, dtype=torch.bfloat16)
    keys, values, bias = pooling.pool(ones, ones, torch.zeros(1, 4096, dtype=torch.long), 1)
    assert keys.dtype == torch.bfloat16 and torch.equal(keys, torch.ones_like(keys)) and torch.equal(values, keys)
    torch.testing.assert_close(bias, torch.tensor(4096.0).log().view(1, 1, 1, 1))
    flat = ones[0]
    keys, values, bias = pooling.segment_pool(flat, flat, torch.tensor([[0, 4096]]))
    assert torch.equal(keys, torch.ones_like(keys)) and torch.equal(values, keys)
    assert torch.equal(pooling.tiled_mean(ones.view(1, 1, 4096, 8), (1, 64, 64), (1, 64, 64)),
                       torch.ones(1, 1, 1, 8, dtype=torch.bfloat16))

    key, value = _randn(2, 300, 8, seed=12), _randn(2, 300, 8, seed=13)
    offsets = _offsets(2, 300, 9, 14)
    offsets[:, 3] = offsets[:, 2]  # an empty cluster
    labels = clusters.token_clusters(offsets, 300)
    key_bias = _randn(2, 300, seed=15)
    for bias in (None, key_bias):
        expected = pooling.pool(key.unsqueeze(1), value.unsqueeze(1), labels, 9,
                                None if bias is None else bias.view(2, 1, 1, 300))
        got = pooling.segment_pool(key, value, offsets, bias)
        present = offsets.diff(dim=-1) > 0
        for a, b in zip(got[:2], expected[:2]):
            torch.testing.assert_close(a[present], b[:, 0][present])
        torch.testing.assert_close(got[2], expected[2].view(2, 9))


# ------------------------------------------------------------------------------------------------ kernels


def _kernels(compiled: bool):
    yield "torch", clusters.TorchClusters(fused_cpu, row_tile=48, key_chunks=(24, 32))  # several tiles and chunks
    yield "flex eager", clusters.FlexClusters(compiled=False)
    if compiled:
        yield "flex compiled", clusters.FlexClusters(compiled=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cluster_kernels_equal_the_reference(dtype):
    """With and without stand-ins, with a key bias (a padded text key at -inf), with text columns;
    compiled flex on the full setting only (one compile per shape and dtype)."""
    settings = [dict(text=6), dict(text=0, key_bias=False), dict(stand_ins=False, text=6), dict(stand_ins=False,
                                                                                                 key_bias=False)]
    for index, setting in enumerate(settings):
        query, key, value, plan = _inputs(dtype=dtype, **setting)
        expected = clusters.reference(query, key, value, plan)
        for name, kernel in _kernels(compiled=index == 0):
            got = kernel(query, key, value, plan)
            assert got.dtype == dtype and got.shape == expected.shape
            torch.testing.assert_close(got.float(), expected.float(), **TOLERANCE[dtype], msg=f"{name} {setting}")
    # the pairs a plan attends are its token mask's
    assert torch.equal(plan.pairs(), _token_mask(plan).sum((1, 2)).float())


def test_cluster_kernels_keep_all_is_dense_and_stand_ins_of_equal_keys_are_exact():
    query, key, value, plan = _inputs(text=5, stand_ins=False, key_bias=False, keep_all=True)
    dense = F.scaled_dot_product_attention(query, key, value)
    for name, kernel in [("reference", clusters.reference), *_kernels(compiled=False)]:
        torch.testing.assert_close(kernel(query, key, value, plan), dense, msg=name)
    assert plan.pairs().tolist() == [plan.q_len * plan.k_len] * 2

    # a cluster of identical keys and values is exactly its stand-in (mean, log-size bias)
    query, key, value, plan = _inputs(text=0, key_bias=False)
    labels = clusters.token_clusters(plan.k_offsets, plan.k_len)
    centers_k, centers_v = _randn(2, 7, 16, seed=16), _randn(2, 7, 16, seed=17)
    key, value = (c.gather(1, labels.unsqueeze(-1).expand(-1, -1, 16)) for c in (centers_k, centers_v))
    plan.stand_ins = (centers_k, centers_v, plan.k_offsets.diff(dim=-1).float().log())
    plan._cache.clear()
    dense = F.scaled_dot_product_attention(query, key, value)
    for name, kernel in [("reference", clusters.reference), *_kernels(compiled=False)]:
        torch.testing.assert_close(kernel(query, key, value, plan), dense, msg=name)


def test_block_mask_from_the_plan_equals_create_block_mask():
    """Tiles computed, tiles full (no mask_mod), and the element mask: as `create_block_mask` finds them
    by evaluating mask_mod over every (query, column) pair, on padded lengths."""
    for setting in (dict(text=6), dict(stand_ins=False, key_bias=False, keep_all=True), dict(q_image=300, k_image=400)):
        query, key, value, plan = _inputs(**setting)
        columns = plan.columns
        tile = (64, 32)
        q_len = -(-plan.q_len // tile[0]) * tile[0]
        c_len = -(-(plan.k_len + columns.stand_ins) // tile[1]) * tile[1]
        mask, tiles = plan.block_mask(tile, q_len, c_len)
        groups = query.shape[0]
        q_cluster = clusters.token_clusters(torch.cat([plan.q_offsets, torch.full((groups, 1), q_len)], 1), q_len)
        c_cluster = clusters.token_clusters(torch.cat([columns.offsets, torch.full((groups, 1), c_len)], 1), c_len)
        keep = torch.zeros(groups, columns.keep.shape[1] + 1, columns.keep.shape[2] + 1, dtype=torch.bool)
        keep[:, :-1, :-1] = columns.keep

        def mask_mod(b, h, q, kv):
            return keep[h, q_cluster[h, q], c_cluster[h, kv]]

        expected = create_block_mask(mask_mod, 1, groups, q_len, c_len, device="cpu", BLOCK_SIZE=tile)
        assert torch.equal(mask.kv_num_blocks, expected.kv_num_blocks)
        assert torch.equal(mask.full_kv_num_blocks, expected.full_kv_num_blocks)
        for ours, theirs in ((mask.kv_indices, expected.kv_indices), (mask.full_kv_indices, expected.full_kv_indices)):
            counts = (mask.kv_num_blocks if ours is mask.kv_indices else mask.full_kv_num_blocks).unsqueeze(-1)
            listed = torch.arange(ours.shape[-1]) < counts
            assert torch.equal(ours.masked_fill(~listed, -1).sort(-1).values, theirs.masked_fill(~listed, -1).sort(-1).values)
        assert torch.equal(mask.to_dense(), expected.to_dense())
        assert tiles == (mask.kv_num_blocks + mask.full_kv_num_blocks).sum()


def test_planning_and_the_flex_kernel_make_no_host_sync():
    """SVG2's planning (k-means, kept pairs, permutations, stand-ins, the BlockMask) reads nothing to the
    host; the torch kernel reads its sizes once."""
    from dit_accel.techniques.svg2 import plan_clusters

    query, key, value = (_randn(1, 2, 300, 16, seed=s) for s in (20, 21, 22))
    bias = _randn(1, 1, 1, 300, seed=23)
    with count_dispatches() as count:
        plan, keys, values, _ = plan_clusters(dit_accel.SVG2Config(), query, key, value, bias, None, slice(0, 290),
                                              slice(0, 290), (4, 9), 3)
        plan.block_mask((128, 128), 384, 384)
    assert count.sync_total == 0, count.report()
    with count_dispatches() as count:
        clusters.TorchClusters(fused_cpu)(plan.order_queries(query), keys, values, plan)
    assert count.sync_total == 1, count.report()


def test_kernel_choice_is_made_once_by_name_and_flashinfer_is_refused_without_cuda():
    cpu = torch.device("cpu")
    assert clusters.cluster_kernel("auto", cpu).name == "torch"
    flex = clusters.cluster_kernel("flex", cpu)
    assert flex.name == "flex" and flex.key_cluster_tokens == 128
    with pytest.raises(ConfigError, match="flashinfer"):
        clusters.cluster_kernel("flashinfer", cpu)


# ------------------------------------------------------------------------------------------------ the technique


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_with_the_flex_kernel_equals_dense(family):
    """The real path at keep-all on flex (compiled on this CPU; the torch kernel is the CPU's default,
    covered by test_sparse_attention)."""
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family, num_inference_steps=2)
    with dit_accel.apply(pipe, dataclasses.replace(dit_accel.SVG2Config.keep_all(), kernel="flex")) as handle:
        torch.testing.assert_close(run(pipe, family, num_inference_steps=2), baseline, rtol=1e-4, atol=1e-4)
        calls = [call for s in handle.report()["steps"] for call in s["calls"]]
    assert all(call["attention_density"] == pytest.approx(1.0) for call in calls)


def test_flashinfer_kernel_is_refused_by_name_on_this_cpu():
    """At apply where the package is missing; at the first call where the device is not CUDA."""
    pipe = tiny_pipeline("wan")
    config = dataclasses.replace(dit_accel.SVG2Config.keep_all(), kernel="flashinfer")
    if not clusters.flashinfer_installed():
        with pytest.raises(ConfigError, match="flashinfer package"):
            dit_accel.apply(pipe, config)
        return
    with dit_accel.apply(pipe, config):
        with pytest.raises(ConfigError, match="flashinfer"):
            run(pipe, "wan", num_inference_steps=1)


def test_the_ui_cluster_map_reaches_the_host_with_the_report():
    """Built only where details are asked for (the UI). Per call the map is a device tensor (the contracts in test_kernel_contracts.py count no host read);
    `report()` hands it over as the nested lists the UI draws."""
    pipe = tiny_pipeline("wan")
    config = dataclasses.replace(dit_accel.SVG2Config.keep_all(), query_clusters=4)
    with dit_accel.apply(pipe, config) as handle:  # not asked for: neither built nor kept
        run(pipe, "wan", num_inference_steps=2)
        assert "svg2_query_clusters" not in handle.techniques[0].call_stats(None)
        assert all("svg2_query_clusters" not in call for s in handle.report()["steps"] for call in s["calls"])
    with dit_accel.apply(pipe, config, details=True) as handle:
        run(pipe, "wan", num_inference_steps=2)
        technique = handle.techniques[0]
        assert isinstance(technique.call_stats(None)["svg2_query_clusters"]["labels"], torch.Tensor)
        calls = [call for s in handle.report()["steps"] for call in s["calls"]]
    cluster_map = calls[-1]["svg2_query_clusters"]
    assert isinstance(cluster_map["labels"], list) and isinstance(cluster_map["block"], int)
    labels = torch.tensor(cluster_map["labels"])
    assert labels.ndim == 3 and 0 <= int(labels.min()) and int(labels.max()) < 4


def test_kmeans_warm_start_survives_ras_subsets_and_reset_steps(monkeypatch):
    """Under RAS the queries are a subset at RAS steps and the whole grid at its reset steps: cluster
    counts come from the grid, so every call after a layer's first warm-starts (2 iterations)."""
    from dit_accel.techniques import svg2

    iterations = []
    real = svg2.kmeans.kmeans

    def counting(points, clusters_, iters, centroids=None):
        iterations.append(iters)
        return real(points, clusters_, iters, centroids)

    monkeypatch.setattr(svg2.kmeans, "kmeans", counting)
    pipe = tiny_pipeline("wan")
    config = dit_accel.SVG2Config(query_clusters=4, key_clusters=8, dense_warmup=0.0, dense_first_blocks=0.0,
                                  plan_every_layer=True, kmeans_iters_first=10)
    ras = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=(3,))
    with dit_accel.apply(pipe, config, ras):
        run(pipe, "wan", num_inference_steps=5)
    first = iterations.index(2)  # queries and keys of every layer's (and CFG branch's) first call: cold
    assert first >= 2 * len(pipe.transformer.blocks) and set(iterations[:first]) == {10}
    assert set(iterations[first:]) == {2}, iterations
