"""SD3.5's skip-layer guidance: a third transformer call per step, on the samples alone (batch B beside
the batched call's 2B), that skips some blocks. Every plan runs through it, a skipped block is
counted nowhere (neither in the ledger nor in the dense baseline), and the call's branch keeps its own
state (RAS's outputs and K/V cache, the token set's buffers)."""

from __future__ import annotations

import functools

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig
from helpers import run

import dit_accel
from dit_accel.testing import VARIANTS, tiny_pipeline

STEPS = 8
#: SD3.5-medium's card recommends layers 7-9 of 24; the tiny SD3.5 has 4 blocks
SKIP = [1, 2]
RAS_HALF = dict(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())


def _kwargs(skip=SKIP, start=0.0, **overrides) -> dict:
    """Skip-layer guidance from the second step on (the pipeline's default window, 1%-20% of the steps,
    holds one step of 8)."""
    return dict(num_inference_steps=STEPS, output_type="latent", skip_guidance_layers=skip,
                skip_layer_guidance_start=start, skip_layer_guidance_stop=1.0, **overrides)


@functools.cache
def _pipe():
    return tiny_pipeline("sd3", variant="sd3.5")


@functools.cache
def _dense(skip: tuple[int, ...] = tuple(SKIP)) -> torch.Tensor:
    return run(_pipe(), "sd3", **_kwargs(list(skip)))


def _run(*configs, **overrides) -> tuple[torch.Tensor, dict]:
    with dit_accel.apply(_pipe(), *configs, details=True) as handle:
        out = run(_pipe(), "sd3", **_kwargs(**overrides))
        return out, handle.report()


def test_the_sd35_variant():
    transformer = _pipe().transformer
    assert VARIANTS["sd3.5"][0] == "sd3" and len(transformer.transformer_blocks) == 4
    assert transformer.transformer_blocks[1].attn2 is not None and transformer.transformer_blocks[2].attn2 is None
    assert transformer.config.qk_norm == "rms_norm"
    with pytest.raises(ValueError, match="variant"):
        tiny_pipeline("flux", variant="sd3.5")


def test_skipped_blocks_are_counted_nowhere():
    """Measured, dense with skip-layer guidance is FLOPs ratio 1: the extra call's dense baseline and
    its ledger both leave the skipped blocks out."""
    with dit_accel.measure(_pipe()) as handle:
        torch.testing.assert_close(run(_pipe(), "sd3", **_kwargs()), _dense())
        report = handle.report()
        records = handle.sessions[0].records
    assert report["flops_ratio"] == pytest.approx(1.0)
    assert [len(step["calls"]) for step in report["steps"]] == [1] + [2] * (STEPS - 1)
    batched, guidance = report["steps"][1]["calls"]
    # the same blocks at half the batch would be half the batched call; two of four blocks are skipped
    assert guidance["dense_flops"] < 0.4 * batched["dense_flops"]
    skipping = [r for r in records if r.ctx.step_index > 0 and r.ctx.branch != "batched"]
    assert len(skipping) == STEPS - 1
    assert all(w.block not in SKIP for r in skipping for w in r.works)
    batched_blocks = [{w.block for w in r.works if w.kind == "linear"} for r in records if r.ctx.branch == "batched"]
    assert all(blocks == {0, 1, 2, 3} for blocks in batched_blocks)


def test_keep_all_equals_dense_through_the_real_path():
    for config in (dit_accel.RASConfig.keep_all(), dit_accel.DyDiTConfig.keep_all()):
        out, report = _run(config)
        torch.testing.assert_close(out, _dense(), rtol=1e-5, atol=1e-5)
        assert round(report["flops_ratio"], 3) == 1.0, type(config).__name__
    for config in (dit_accel.FlexDiTConfig.keep_all(), dit_accel.SVG2Config.keep_all(),
                   dit_accel.ProxyAttentionConfig.keep_all()):
        torch.testing.assert_close(_run(config)[0], _dense(), rtol=1e-4, atol=1e-4)


PLANS = {
    "ras": lambda: [dit_accel.RASConfig(**RAS_HALF)],
    "flexdit": lambda: [dit_accel.FlexDiTConfig()],
    "flexdit fast": lambda: [dit_accel.FlexDiTConfig.preset("fast")],
    "dydit": lambda: [dit_accel.DyDiTConfig()],
    "svg2": lambda: [dit_accel.SVG2Config(query_clusters=4, key_clusters=8, top_p=0.5, dense_first_blocks=0.0,
                                          plan_every_layer=True)],
    "proxy": lambda: [dit_accel.ProxyAttentionConfig()],
    "fbcache": lambda: [FirstBlockCacheConfig(threshold=0.5)],
    "ras + fbcache": lambda: [dit_accel.RASConfig(**RAS_HALF), FirstBlockCacheConfig(threshold=0.5)],
    "ras + proxy": lambda: [dit_accel.RASConfig(**RAS_HALF), dit_accel.ProxyAttentionConfig()],
    "ras + flexdit fast": lambda: [dit_accel.RASConfig(**RAS_HALF, cache_kv=False),
                                   dit_accel.FlexDiTConfig.preset("fast")],
    "ras + dydit + svg2": lambda: [dit_accel.RASConfig(**RAS_HALF), dit_accel.DyDiTConfig(),
                                   dit_accel.SVG2Config(query_clusters=4, key_clusters=8, top_p=0.5,
                                                        plan_every_layer=True)],
}


@pytest.mark.parametrize("plan", PLANS)
def test_every_plan_runs_and_saves(plan):
    out, report = _run(*PLANS[plan]())
    assert torch.isfinite(out).all()
    assert report["flops_ratio"] < 0.95
    assert all(len(step["calls"]) == 2 for step in report["steps"][1:])


@pytest.mark.parametrize("skip", [SKIP, [3]])
def test_ras_keeps_a_selection_per_branch_and_a_late_branch_starts_dense(skip):
    """The guidance call reuses the step's selection at its own batch, merges into its own previous
    output, and runs dense the first time it appears (skip-layer guidance from the fourth step here);
    skipping the last block, the tokens go back to full length after the last block that runs."""
    out, report = _run(dit_accel.RASConfig(**RAS_HALF), skip=skip, start=0.3)
    assert torch.isfinite(out).all() and report["flops_ratio"] < 0.9
    total = report["steps"][0]["calls"][0]["total_image_tokens"]
    first_guided = next(i for i, step in enumerate(report["steps"]) if len(step["calls"]) == 2)
    assert first_guided == 3
    for index, step in enumerate(report["steps"][1:], 1):
        batched, *guidance = step["calls"]
        assert batched["image_tokens"] == total // 2
        if guidance:
            assert guidance[0]["image_tokens"] == (total if index == first_guided else total // 2)
            assert guidance[0]["computed_tokens"] in (None, batched["computed_tokens"])


def test_ras_with_two_images_per_prompt():
    """The guidance call holds the 2 samples (the batched call 4): the selection follows its batch (after
    its first, dense, call)."""
    out, report = _run(dit_accel.RASConfig(**RAS_HALF), num_images_per_prompt=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all() and report["flops_ratio"] < 0.9
    total = report["steps"][0]["calls"][0]["total_image_tokens"]
    assert all(call["image_tokens"] == total // 2 for step in report["steps"][2:] for call in step["calls"])


def test_a_step_cache_with_two_images_per_prompt():
    """The guidance call's batch (2) differs from the batched call's (4): it is a branch of its own, so a
    step cache keeps its state apart instead of mixing tensors of both sizes."""
    out, report = _run(FirstBlockCacheConfig(threshold=0.2), dit_accel.RASConfig(**RAS_HALF), num_images_per_prompt=2)
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    branches = [call["branch"] for step in report["steps"][1:] for call in step["calls"]]
    assert set(branches) == {"batched", "call1"}
