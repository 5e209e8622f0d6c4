"""Compiled blocks under a plan, and the light ledger that lets them stay one graph.

`compile_repeated_blocks(fullgraph=True)` compiles each block's call; under a plan the block's hooks run
eagerly around its compiled body (attention and MLP), a routed attention is one custom op in its graph,
and `remove()` gives the compiled call back. The light ledger (hooks on blocks) and the exact one (hooks
on every attention unit) count the same work.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig
from torch._dynamo.utils import counters

import dit_accel
from dit_accel.testing import medium_call_kwargs, medium_pipeline, tiny_call_kwargs, tiny_pipeline

RAS = dict(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())
PLANS = {
    "ras+fbc": lambda: [dit_accel.RASConfig(**RAS), FirstBlockCacheConfig(threshold=0.05)],
    "proxy": lambda: [dit_accel.ProxyAttentionConfig()],
    "flexdit": lambda: [dit_accel.FlexDiTConfig()],
    "dydit": lambda: [dit_accel.DyDiTConfig.preset("fast")],
    "dydit width": lambda: [dit_accel.DyDiTConfig(width_ratio=0.5, buckets=2)],
}


@pytest.mark.parametrize("family,plans", [("wan", ["ras+fbc", "proxy"]), ("sd3", ["flexdit", "dydit"])])
def test_the_light_and_exact_ledgers_count_the_same_work(family, plans):
    """On a medium model (4,096 tokens), every kind of work per block, for plans across stages 1-6."""
    pipe = medium_pipeline(family)
    kwargs = lambda: medium_call_kwargs(family, num_inference_steps=2)  # noqa: E731
    for name in plans:
        plan = PLANS[name]
        reports = {}
        for ledger in ("light", "exact"):
            with dit_accel.apply(pipe, *plan(), ledger=ledger) as handle:
                pipe(**kwargs())
                reports[ledger] = handle.report()
        light, exact = reports["light"], reports["exact"]
        assert light["flops"] == pytest.approx(exact["flops"], rel=1e-9), name
        assert light["blocks"].keys() == exact["blocks"].keys()
        for block, work in light["blocks"].items():
            assert work == pytest.approx(exact["blocks"][block], rel=1e-9), (name, block)
        assert light["flops_ratio"] < 1.0, name


def test_the_ledger_is_named():
    with pytest.raises(dit_accel.ConfigError, match="'light' or 'exact'"):
        dit_accel.apply(tiny_pipeline("wan"), dit_accel.RASConfig(), ledger="fast")


def _latents(pipe, steps: int = 4) -> torch.Tensor:
    return pipe(**tiny_call_kwargs("wan", num_inference_steps=steps, output_type="latent"))[0]


@pytest.mark.parametrize("plan", ["ras+fbc", "proxy", "flexdit", "dydit width"])
def test_compiled_repeated_blocks_keep_one_graph_under_a_plan(plan):
    """fullgraph=True (no graph break anywhere in a block's body), the eager plan's output and FLOPs, a
    bounded number of graphs (token counts change between dense and sparse steps, weight widths between
    DyDiT's buckets), and remove() gives the compiled call back."""
    pipe = tiny_pipeline("wan")
    with dit_accel.apply(pipe, *PLANS[plan]()) as handle:
        eager = _latents(pipe)
        eager_flops = handle.report()["flops_ratio"]
    torch._dynamo.reset()
    counters.clear()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    compiled_calls = [block._compiled_call_impl for block in pipe.transformer.blocks]
    with dit_accel.apply(pipe, *PLANS[plan]()) as handle:
        assert all(block._compiled_call_impl is None for block in pipe.transformer.blocks)
        compiled = _latents(pipe)
        report = handle.report()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert report["flops_ratio"] == pytest.approx(eager_flops) and report["notes"] == []
    assert 1 <= counters["stats"]["unique_graphs"] <= 4 and not counters["graph_break"]
    assert [block._compiled_call_impl for block in pipe.transformer.blocks] == compiled_calls


def test_compiled_blocks_compile_their_bodies_in_pieces_under_the_exact_ledger_and_say_so():
    """The exact ledger's per-unit hooks and DyDiT's MLP token skipping run eagerly inside the body."""
    pipe = tiny_pipeline("wan")
    torch._dynamo.reset()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    for attach in (lambda: dit_accel.measure(pipe), lambda: dit_accel.apply(pipe, *PLANS["dydit"]())):
        with attach() as handle:
            _latents(pipe, steps=2)
            assert any("compiled their bodies in pieces" in note for note in handle.report()["notes"])


def test_a_transformer_compiled_whole_compiles_the_block_bodies_under_a_plan():
    """`transformer.compile()`: its graph breaks at the plan's block hooks; the bodies below them get its
    settings rather than running eagerly, and remove() leaves the transformer compiled as it was."""
    pipe = tiny_pipeline("wan")
    with dit_accel.apply(pipe, *PLANS["ras+fbc"]()):
        eager = _latents(pipe)
    torch._dynamo.reset()
    counters.clear()
    pipe.transformer.compile()
    compiled_call = pipe.transformer._compiled_call_impl
    with dit_accel.apply(pipe, *PLANS["ras+fbc"]()) as handle:
        compiled = _latents(pipe)
        bodies = [handle.sessions[0]._compiled._moved[block][1] for block in pipe.transformer.blocks]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] > 2  # the transformer's pieces and the block bodies
    assert all(not hasattr(body, "_torchdynamo_orig_callable") for body in bodies)  # the eager bodies kept to restore
    assert pipe.transformer._compiled_call_impl is compiled_call
    assert all(block.__dict__.get("_compiled_call_impl") is None for block in pipe.transformer.blocks)
