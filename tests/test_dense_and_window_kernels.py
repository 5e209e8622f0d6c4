"""The kernel layer under proxy attention and FlexDiT's pooled K/V, against plain references on this CPU:
dense attention with a per-key bias (and under a flash-only SDPA context), attention with its
log-sum-exp, the window kernels (`torch`, `flex` eager and compiled), fp32 pooling of tokens, and
`ProxyAttentionConfig(kernel=...)` at keep-all through the real path.

Tolerances: fp32 kernels match the fp32 references to torch's default (1.3e-6 relative, 1e-5 absolute);
bf16 kernels are compared with the fp32 reference on the same bf16 inputs at 3e-2 (bf16 keeps 8 bits:
outputs of unit size round by up to 4e-3, and the GEMMs round their inputs)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from helpers import run
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

import dit_accel
from dit_accel.attention import merge, proxy_kernel
from dit_accel.attention.kernels import dense
from dit_accel.attention.kernels.windows import FlexWindows, TorchWindows, WindowPlan, window_kernel
from dit_accel.config import ConfigError
from dit_accel.testing import FAMILIES, tiny_pipeline
from dit_accel.testing.dispatch import count_dispatches
from dit_accel.tokens import pool_tokens

BF16 = dict(rtol=3e-2, atol=3e-2)
#: torch's SDPA (routing replaces the attribute while a plan's attention runs)
SDPA = F.scaled_dot_product_attention


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _plain(query, key, value, bias=None, mask=None):
    """softmax(q k^T / sqrt(d) + bias, masked) v in fp32, and its log-sum-exp."""
    logits = query.float() @ key.float().transpose(-1, -2) / math.sqrt(query.shape[-1])
    if bias is not None:
        logits = logits + bias.float()
    if mask is not None:
        logits = logits.masked_fill(~mask, -torch.inf)
    return logits.softmax(-1) @ value.float(), logits.logsumexp(-1)


# -- dense -----------------------------------------------------------------------------------------


def test_dense_attention_adds_a_per_key_bias_and_drops_one_that_is_the_same_for_every_key():
    query, key, value = _randn(2, 3, 7, 16, seed=1), _randn(2, 3, 11, 16, seed=2), _randn(2, 3, 11, 16, seed=3)
    bias = _randn(2, 1, 1, 11, seed=4)
    mask = torch.rand(1, 1, 1, 11, generator=torch.Generator().manual_seed(5)) > 0.3
    mask[..., 0] = True
    torch.testing.assert_close(dense.attention(query, key, value, bias), _plain(query, key, value, bias)[0])
    torch.testing.assert_close(dense.attention(query, key, value, bias, attn_mask=mask),
                               _plain(query, key, value, bias, mask)[0])
    uniform = torch.full((1, 1, 1, 1), math.log(4.0))  # FlexDiT's log(window) on every key: cancels
    seen = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dense, "_SDPA", lambda *args, **kwargs: seen.append(kwargs) or F.scaled_dot_product_attention(
            *args, **kwargs))
        torch.testing.assert_close(dense.attention(query, key, value, uniform), _plain(query, key, value)[0])
    assert seen == [{}]  # no mask reached SDPA: flash stays usable


def test_a_bias_under_a_flash_only_context_widens_it_instead_of_raising():
    """diffusers' `_native_flash` opens a flash-only context; CUDA's flash kernel refuses a mask ("No
    available kernel"), CPU's takes it. Simulated here: an SDPA that refuses a mask the way CUDA does
    while flash is the only backend. What only CUDA shows: which kernel then runs (memory-efficient)."""
    query, key, value = _randn(1, 2, 9, 16, seed=6), _randn(1, 2, 13, 16, seed=7), _randn(1, 2, 13, 16, seed=8)
    bias = _randn(1, 1, 1, 13, seed=9)
    contexts = []

    def cuda_like(*args, **kwargs):
        backends = _cur_sdpa_kernel_backends()
        contexts.append(backends)
        if kwargs.get("attn_mask") is not None and backends == [SDPBackend.FLASH_ATTENTION]:
            raise RuntimeError("No available kernel. Aborting execution.")
        return SDPA(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        patch.setattr(dense, "_SDPA", cuda_like)
        with pytest.raises(RuntimeError, match="No available kernel"):
            cuda_like(query, key, value, attn_mask=bias)
        assert dense.flash_only()
        out = dense.attention(query, key, value, bias)
        assert {SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH} <= set(contexts[-1])
        dense.attention(query, key, value)  # no bias: the context is left as the backend opened it
        assert contexts[-1] == [SDPBackend.FLASH_ATTENTION]
    torch.testing.assert_close(out, _plain(query, key, value, bias)[0])
    assert not dense.flash_only()


def test_flexdit_pooled_kv_with_text_keys_runs_under_native_flash():
    """FlexDiT's log-count bias stays where text keys are unbiased (Flux): under diffusers' `_native_flash`
    with an SDPA that refuses masks as CUDA's flash does, keep-all still equals dense."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    pipe = tiny_pipeline("flux")
    active = _AttentionBackendRegistry.get_active_backend()[0]
    pipe.transformer.set_attention_backend("_native_flash")

    def cuda_like(*args, **kwargs):
        if kwargs.get("attn_mask") is not None and _cur_sdpa_kernel_backends() == [SDPBackend.FLASH_ATTENTION]:
            raise RuntimeError("No available kernel. Aborting execution.")
        return SDPA(*args, **kwargs)

    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(dense, "_SDPA", cuda_like)
            baseline = run(pipe, "flux")
            with dit_accel.apply(pipe, dit_accel.FlexDiTConfig.keep_all()):
                torch.testing.assert_close(run(pipe, "flux"), baseline, rtol=1e-4, atol=1e-4)
    finally:
        _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.parametrize("name", ["fused_cpu", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_with_lse_equals_the_plain_reference_and_marks_queries_without_keys(name, dtype, monkeypatch):
    kernel = dense.lse_kernel(torch.device("cpu"), name)
    query, key, value = (_randn(2, 3, n, 16, seed=s, dtype=dtype) for s, n in ((10, 37), (11, 29), (12, 29)))
    bias = _randn(2, 1, 37, 29, seed=13) * 2
    bias[1, :, 5] = -torch.inf  # a query whose every key is removed
    monkeypatch.setattr(dense, "CHUNK_ELEMENTS", 2 * 3 * 29 * 8)  # chunked: 5 chunks of 8 rows
    out, lse = kernel(query, key, value, bias)
    expected, expected_lse = _plain(query, key, value, bias)
    expected[1, :, 5] = 0.0
    tolerance = {} if dtype == torch.float32 else BF16
    torch.testing.assert_close(out.float(), expected, **tolerance)
    torch.testing.assert_close(lse, expected_lse, **tolerance)
    assert lse.dtype == torch.float32 and (lse[1, :, 5] == -torch.inf).all()
    half = slice(0, 13), slice(13, 29)  # two partial attentions merge into the whole
    parts = [kernel(query, key[:, :, h], value[:, :, h], bias[..., h]) for h in half]
    merged, _ = merge.merge(*parts[0], *parts[1])
    torch.testing.assert_close(merged.float(), expected, **tolerance)
    assert dense.lse_kernel(torch.device("cpu")) is dense.fused_cpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's memory-efficient kernel")
def test_efficient_attention_with_lse_on_cuda_slices_its_padded_lse():
    query, key, value = (_randn(2, 3, n, 64, seed=s).cuda() for s, n in ((14, 37), (15, 29), (16, 29)))
    bias = _randn(2, 1, 1, 29, seed=17).cuda()
    out, lse = dense.efficient(query, key, value, bias)
    expected, expected_lse = _plain(query, key, value, bias)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(lse, expected_lse)


# -- windows ---------------------------------------------------------------------------------------


def _grid_coordinates(frames, rows, cols):
    f, r, c = torch.meshgrid(torch.arange(frames), torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.stack([f, r, c], -1).reshape(1, -1, 3)


EXTENT = (3, 5, 6)  # windows of 1 x 4 x 4 do not tile it: edge windows are partial


def _inputs(dtype, text: bool, key_bias: bool, queries: torch.Tensor | None = None):
    """(query, key, value, windows' args, kernel args) on EXTENT, with 4 text keys (one padded) and a
    stage-5 key bias if asked; `queries` (B, n) picks a per-sample query subset (RAS)."""
    tokens = math.prod(EXTENT)
    query, key, value = (_randn(2, 3, tokens, 16, seed=s, dtype=dtype) for s in (20, 21, 22))
    if queries is not None:
        query = query.gather(2, queries[:, None, :, None].expand(-1, 3, -1, 16))
    extra = {}
    if key_bias:
        extra["key_bias"] = _randn(2, 1, 1, tokens, seed=25)
    if text:
        text_bias = torch.zeros(1, 1, 1, 4)
        text_bias[..., -1] = -torch.inf
        extra.update(extra_key=_randn(2, 3, 4, 16, seed=23, dtype=dtype), extra_value=_randn(2, 3, 4, 16, seed=24, dtype=dtype),
                     extra_bias=text_bias)
    return query, key, value, extra


def _check(kernel, dtype, shifted, text, key_bias, subset=False):
    coordinates = _grid_coordinates(*EXTENT)
    queries = None
    if subset:
        queries = torch.stack([torch.randperm(coordinates.shape[1], generator=torch.Generator().manual_seed(s))[:40]
                               .sort().values for s in (26, 27)])
    windows = proxy_kernel.place(coordinates if queries is None else coordinates[0][queries], coordinates, EXTENT,
                                 (1, 4, 4), (1, 2, 2), shifted)
    query, key, value, extra = _inputs(dtype, text, key_bias, queries)
    plan = WindowPlan.of(windows)
    out, pairs = kernel(query, key, value, plan, **extra)
    fp32 = {name: x.float() if name != "extra_bias" else x for name, x in extra.items()}
    expected = proxy_kernel.reference(query.float(), key.float(), value.float(), windows, **fp32)
    assert out.dtype == dtype and pairs == plan.pairs(4 if text else 0)
    torch.testing.assert_close(out.float(), expected, **({} if dtype == torch.float32 else BF16))
    return out


CASES = [(shifted, text, key_bias) for shifted in (False, True) for text, key_bias in ((False, False), (True, True))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kernel", [TorchWindows(dense.fused_cpu), TorchWindows(dense.chunked),
                                    FlexWindows(compiled=False, tile=16)], ids=["torch", "torch-chunked", "flex-eager"])
def test_window_kernels_equal_the_reference(kernel, dtype):
    for shifted, text, key_bias in CASES:
        _check(kernel, dtype, shifted, text, key_bias)
    _check(kernel, dtype, False, False, False, subset=True)  # queries a per-sample subset, keys the grid


def test_torch_window_kernel_is_exact_where_own_window_proxies_hold_the_far_mass():
    """The torch kernel takes the own-window proxies out of a part over every proxy by subtraction: queries
    that look like their own window's keys put nearly all of that part's mass there (share ~0.999)."""
    coordinates = _grid_coordinates(*EXTENT)
    windows = proxy_kernel.place(coordinates, coordinates, EXTENT, (1, 4, 4), (1, 2, 2))
    key, value = _randn(2, 3, math.prod(EXTENT), 16, seed=30), _randn(2, 3, math.prod(EXTENT), 16, seed=31)
    query = 3 * key
    out, _ = TorchWindows(dense.fused_cpu)(query, key, value, WindowPlan.of(windows))
    torch.testing.assert_close(out, proxy_kernel.reference(query, key, value, windows), rtol=1e-4, atol=1e-4)


def test_compiled_flex_window_kernel_equals_the_reference():
    """A few compiles (each takes seconds): shared and per-sample-and-head biases, shifted windows, bf16."""
    kernel = FlexWindows(tile=16)
    _check(kernel, torch.float32, False, False, False)
    _check(kernel, torch.float32, True, True, True)
    _check(kernel, torch.bfloat16, True, True, True)


def test_window_plan_holds_nothing_of_size_queries_by_proxies_and_the_block_mask_skips_own_windows():
    coordinates = _grid_coordinates(2, 8, 8)
    windows = proxy_kernel.place(coordinates, coordinates, (2, 8, 8), (1, 4, 4), (1, 2, 2))
    plan = WindowPlan.of(windows)
    tokens, proxies = 128, windows.proxies
    held = [x for x in vars(plan).values() if isinstance(x, torch.Tensor)] + \
        [x for layout in (plan.queries, plan.keys) for x in vars(layout).values() if isinstance(x, torch.Tensor)]
    assert max(x.numel() for x in held) < tokens * proxies
    mask = FlexWindows(compiled=False, tile=16).block_mask(plan, 0)
    # in window order each 16-token tile is one window: a query tile runs its own window's key tile and
    # the proxy tile of the other frame fully, the proxy tile holding its own window partially (mask_mod),
    # and skips the other windows' key tiles
    assert mask.full_kv_num_blocks.tolist() == [[[2] * 8]] and mask.kv_num_blocks.tolist() == [[[1] * 8]]
    assert FlexWindows(compiled=False, tile=16).block_mask(plan, 0) is mask  # cached on the plan


@pytest.mark.parametrize("kernel", [TorchWindows(dense.fused_cpu), FlexWindows(compiled=False, tile=16)],
                         ids=["torch", "flex"])
def test_a_warm_window_call_makes_no_host_sync_and_its_ops_do_not_grow_with_the_windows(kernel):
    counts = []
    for extent in ((1, 8, 8), (2, 16, 16)):  # 4 windows, then 32
        coordinates = _grid_coordinates(*extent)
        plan = WindowPlan.of(proxy_kernel.place(coordinates, coordinates, extent, (1, 4, 4), (1, 2, 2)))
        query, key, value = (_randn(1, 2, coordinates.shape[1], 16, seed=s) for s in (30, 31, 32))
        kernel(query, key, value, plan)  # warm: the plan's BlockMask
        with count_dispatches() as count:
            kernel(query, key, value, plan)
        assert count.sync_total == 0, count.report()
        counts.append(count.kernels)
    assert counts[0] == counts[1]


# -- pooling ---------------------------------------------------------------------------------------


def test_pool_tokens_sums_in_fp32():
    ones = torch.ones(1, 4096, 8, dtype=torch.bfloat16)  # a bf16 sum sticks at 512: the mean was 0.125
    assert (pool_tokens(ones, torch.zeros(4096, dtype=torch.long), 1) == 1.0).all()
    assert (pool_tokens(ones, torch.zeros(1, 4096, dtype=torch.long), 1) == 1.0).all()
    tokens, groups = _randn(2, 10, 3, seed=33), torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
    means = torch.stack([tokens[:, groups == g].mean(1) for g in range(3)], 1)
    torch.testing.assert_close(pool_tokens(tokens, groups, 3), means)
    torch.testing.assert_close(pool_tokens(tokens, groups.expand(2, -1), 3), means)
    with count_dispatches() as count:
        pool_tokens(tokens, groups.expand(2, -1), 3)
    assert count.sync_total == 0


# -- through the runtime ---------------------------------------------------------------------------


def test_proxy_kernel_field_refuses_flashinfer_and_auto_is_torch_on_cpu():
    with pytest.raises(ConfigError, match="flashinfer"):
        dit_accel.ProxyAttentionConfig(kernel="flashinfer")
    assert isinstance(window_kernel("auto", torch.device("cpu"), dense.fused_cpu), TorchWindows)


@pytest.mark.parametrize("kernel", ["torch", "flex"])
@pytest.mark.parametrize("family", FAMILIES)
def test_proxy_keep_all_equals_dense_on_every_kernel(kernel, family):
    """keep_all (one local window on these grids), and small shifted windows with proxies of one token
    (every part of the kernel runs: own windows, proxies outside them, text): both are dense."""
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    windows = dit_accel.ProxyAttentionConfig(local_window=(1, 2, 2), proxy_window=(1, 1, 1), shift_windows=True,
                                             dense_warmup=0.0, dense_first_blocks=0.0, plan_every_layer=True)
    for config in (dit_accel.ProxyAttentionConfig.keep_all(), windows):
        with dit_accel.apply(pipe, dataclasses.replace(config, kernel=kernel)) as handle:
            torch.testing.assert_close(run(pipe, family), baseline, rtol=1e-4, atol=1e-4)
            calls = [call for s in handle.report()["steps"] for call in s["calls"]]
        assert all(call["attention_density"] >= 1.0 and not call["dense_layers"] for call in calls)
