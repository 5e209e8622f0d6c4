"""What the sparse attentions may cost a GPU, checked on this CPU by counting what a warm call dispatches
(`dit_accel.testing.dispatch`: the counts do not depend on the device).

Contracts (issue 22, item 7):
- a warm SVG2, proxy or FlexDiT pooled-K/V attention, on the kernels a GPU runs (`flex`), dispatches a number of ops that does not grow with
  the number of clusters or windows (two counts compared), and makes no host sync;
- the whole transformer call makes no more host syncs than the dense call (the runtime's own
  `float(timestep)`): nothing per call for stats or the UI; RAS at most one more per step;
- CPU's own kernels (`torch`): SVG2's reads its batch sizes to the host once per attention, proxy's none.

A warm call is a layer's second sparse call, after its cold one (k-means from scratch, window layouts
and groups built), at a step past the dense warm-up. Calls go straight to the transformer under
`dit_accel.apply`, with the step context a pipeline sets (`cache_context(step_index=...,
num_inference_steps=...)`); "the attention" is the self-attention module, its q/k/v projections, norms
and RoPE included (the dense one dispatches 67 ops). SVG2 and proxy attention run with
`plan_every_layer=True`: random weights attend diffusely, where a technique may rightly decide that its
plan cannot save and run dense, and the contract is about the sparse path.

Shapes: Wan 2.1 1.3B's self-attention at 480p x 81 frames is 12 heads x 128 over 21 x 30 x 52 = 32,760
tokens; here 2 heads x 128 over 3 x 30 x 52 = 4,680 tokens (one block of hidden 256, FFN 512, text width
64, 16 text tokens), so the suite stays fast. Head dim, a frame's 30 x 52 token grid, patch, norms and
RoPE are Wan's. Proxy attention's "many windows" has a proxy per token, so that its query rows hold as
many proxies as the default's at 32,760 tokens (where a logit chunk per 2^24 elements makes 16).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

import dit_accel
from dit_accel.testing import release_transformer, wan_inputs
from dit_accel.testing.dispatch import DispatchCount, count_dispatches, count_module_calls

STEPS = 10
GRID = (3, 30, 52)
REDUCED = dict(num_layers=1, num_attention_heads=2, ffn_dim=512, text_dim=64)
TEXT_TOKENS = 16


@dataclass
class WarmCall:
    """What the warm call dispatched, in its self-attention and in the whole transformer call, and what
    its `report()` entry says it did."""

    attention: DispatchCount
    call: DispatchCount
    #: the technique changed the work: the ledger's FLOPs of the call differ from the dense ones
    changed: bool
    #: the sparse attentions' layers that ran dense, by reason
    dense_layers: dict

    def describe(self) -> str:
        return f"attention: {self.attention.report()}\nwhole call: {self.call.report()}"


def _call(transformer, inputs: dict, step: int) -> None:
    sigma = 1.0 - step / STEPS
    with transformer.cache_context("cond", step_index=step, num_inference_steps=STEPS, sigma=sigma):
        transformer(**inputs, timestep=torch.tensor([1000.0 * sigma]), return_dict=False)


def _warm_call(config, cold_steps: tuple[int, ...] = (STEPS - 2,), warm_step: int = STEPS - 1) -> WarmCall:
    """`config` (None: dense, under a measure-only handle) on a fresh reduced Wan block: the calls at
    `cold_steps`, then the counted call at `warm_step`."""
    transformer = release_transformer("wan2.1-1.3b", **REDUCED)
    inputs = wan_inputs(transformer, GRID, TEXT_TOKENS)
    handle = dit_accel.measure(transformer) if config is None else dit_accel.apply(transformer, config)
    with handle:
        for step in cold_steps:
            _call(transformer, inputs, step)
        with count_module_calls(transformer.blocks[0].attn1) as attention, count_dispatches() as call:
            _call(transformer, inputs, warm_step)
        record = handle.report()["steps"][-1]["calls"][-1]
    warm = WarmCall(attention[0], call, record["flops"] != record["dense_flops"], record.get("dense_layers", {}))
    print(f"\n{config!r}\n{warm.describe()}")
    return warm


@functools.cache
def _dense() -> WarmCall:
    return _warm_call(None)


def _check_flat_and_sync_free(few: WarmCall, many: WarmCall, what: str) -> None:
    """Every broken contract at once: the ops, the syncs in the attention and in the call."""
    dense_syncs = _dense().call.sync_total
    broken = []
    for label, warm in (("fewer", few), ("more", many)):
        assert warm.changed and not warm.dense_layers, f"the warm call did not run sparse: {warm.dense_layers}"
        if warm.attention.sync_total or warm.call.sync_total > dense_syncs:
            broken.append(f"host syncs with {label} {what} (the dense call makes {dense_syncs}):\n{warm.describe()}")
    if many.attention.total > few.attention.total:
        broken.append(f"attention ops grow with the {what}: {few.attention.total} -> {many.attention.total}")
    assert not broken, "\n".join(broken)


def test_svg2_warm_call_is_flat_in_clusters_and_sync_free():
    """On the `flex` kernel (what "auto" runs on CUDA), twice the query and key clusters (19 / 62: the
    default sizes at 4,680 tokens)."""
    few = _warm_call(dit_accel.SVG2Config(query_clusters=19, key_clusters=62, plan_every_layer=True, kernel="flex"))
    many = _warm_call(dit_accel.SVG2Config(query_clusters=38, key_clusters=124, plan_every_layer=True, kernel="flex"))
    _check_flat_and_sync_free(few, many, "clusters")


def test_svg2_torch_kernel_reads_the_host_once():
    """The `torch` cluster kernel ("auto" on CPU) sizes its batched SDPAs from the cluster sizes: one host read
    per attention (on a CPU it waits for nothing), and nothing else."""
    warm = _warm_call(dit_accel.SVG2Config(plan_every_layer=True, kernel="torch"))
    assert warm.changed and not warm.dense_layers, warm.dense_layers
    assert warm.attention.syncs == {"Tensor.tolist": 1}, warm.describe()
    assert warm.call.sync_total == _dense().call.sync_total + 1, warm.describe()


def test_proxy_warm_call_is_flat_in_windows_and_sync_free():
    """On the `flex` kernel (what "auto" runs on CUDA), 84 local windows of 8 x 8 and 1,170 proxies of 2 x 2,
    against 312 local windows of 4 x 4 and a proxy per token (4,680: at 32,760 tokens the default's 8,190
    proxies are as many per query row)."""
    few = _warm_call(dit_accel.ProxyAttentionConfig(plan_every_layer=True, kernel="flex"))
    many = _warm_call(dit_accel.ProxyAttentionConfig(local_window=(1, 4, 4), proxy_window=(1, 1, 1),
                                                     plan_every_layer=True, kernel="flex"))
    _check_flat_and_sync_free(few, many, "windows")


def test_proxy_torch_kernel_is_sync_free():
    """The `torch` window kernel ("auto" on CPU) chunks its proxy logits by a memory budget (more proxies, more
    chunks) and makes no host sync."""
    warm = _warm_call(dit_accel.ProxyAttentionConfig(plan_every_layer=True, kernel="torch"))
    assert warm.changed and not warm.dense_layers, warm.dense_layers
    assert warm.attention.sync_total == 0 and warm.call.sync_total == _dense().call.sync_total, warm.describe()


def test_flexdit_pooled_kv_warm_call_is_flat_in_windows_and_sync_free():
    """Pooled K/V over 3 x 2 x 2 windows (390 on the grid) and 1 x 2 x 2 ones (1,170)."""
    few = _warm_call(dit_accel.FlexDiTConfig.preset("quality", pool_frames=3))
    many = _warm_call(dit_accel.FlexDiTConfig.preset("quality"))
    _check_flat_and_sync_free(few, many, "windows")


def test_ras_syncs_at_most_once_per_step():
    """A RAS step after a RAS step (one call a step): the selection may read one thing to the host."""
    ras = _warm_call(dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=()),
                     cold_steps=(0, 1), warm_step=2)
    dense_syncs = _dense().call.sync_total
    assert ras.changed, "the warm call did not run RAS"
    syncs, call_syncs = ras.attention.sync_total, ras.call.sync_total
    assert syncs == 0, f"host syncs in the attention:\n{ras.describe()}"
    assert call_syncs <= dense_syncs + 1, f"RAS syncs more than once a step (dense: {dense_syncs}):\n{ras.describe()}"


def test_the_counter_sees_what_would_sync_a_gpu():
    """Reading a value or a list to the host, a boolean mask, a data-dependent shape: syncs; indexing with
    integers, views and static shapes: not."""
    x, index = torch.randn(100), torch.arange(10)
    with count_dispatches() as static:
        x[index].view(2, 5).t().contiguous()
        torch.repeat_interleave(x[:3], torch.full((3,), 2), output_size=6)
        torch.zeros(10).scatter_add_(0, index, x[:10])
    assert static.sync_total == 0 and static.views >= 2 and static.kernels >= 4
    with count_dispatches() as syncs:
        int(x.max())
        x[x > 0]
        x.nonzero()
        torch.bincount(index)
        x.tolist()
        x.cpu()
    assert set(syncs.syncs) == {"aten._local_scalar_dense", "aten.index", "aten.nonzero", "aten.bincount",
                                "Tensor.tolist", "Tensor.cpu"} and syncs.sync_total == 6
