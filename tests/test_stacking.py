"""diffusers' own step caches as plan members (stage 1), and stacking them with RAS (stages 2 and 5).

Every cache runs through diffusers' own hooks; the runtime opens a cache context where the pipeline
opens none (SD3, PixArt, DiT), resets the caches at every run, supplies PAB's timestep, and hands a
cache full-length tensors around token subsets. The ledger counts what each skipped.
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
)
from helpers import model_state

import dit_accel
from dit_accel.testing import FAMILIES, VIDEO_FAMILIES, tiny_call_kwargs, tiny_pipeline

STEPS = 8
RAS_HALF = dict(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())


def _kwargs(family: str, **overrides) -> dict:
    """Latents out (DiT always decodes), small videos: the denoising loop is what differs."""
    kwargs = {"num_inference_steps": STEPS, "output_type": "pt" if family == "dit" else "latent"}
    if family in VIDEO_FAMILIES:
        kwargs.update(height=64, width=64, num_frames=5)
    return tiny_call_kwargs(family, **{**kwargs, **overrides})


def _run(pipe, family: str, *configs, **overrides) -> tuple[torch.Tensor, dict]:
    with dit_accel.apply(pipe, *configs) as handle:
        out = torch.as_tensor(pipe(**_kwargs(family, **overrides))[0])
        report = handle.report()
    return out, report


@functools.cache
def _pipe(family: str):
    return tiny_pipeline(family)


@functools.cache
def _dense(family: str) -> torch.Tensor:
    return torch.as_tensor(_pipe(family)(**_kwargs(family))[0])


def _caches(pipe, family: str) -> dict[str, object]:
    return {
        "fbcache": FirstBlockCacheConfig(threshold=0.5),
        "taylorseer": TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2),
        "pab": PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(-1, 1001)),
        "magcache": dit_accel.calibrate(pipe, MagCacheConfig(threshold=0.5, calibrate=True), **_kwargs(family)),
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_every_diffusers_cache_alone_and_with_ras(family):
    """Each cache skips work on every family (SD3, PixArt and DiT have no `enable_cache` and their
    pipelines open no cache context); with RAS it skips more than RAS alone; remove() restores the model."""
    pipe = _pipe(family)
    dense = _dense(family)  # a pipeline that opens cache contexts leaves an empty registry on its transformer
    before = model_state(pipe.transformer)
    _, ras = _run(pipe, family, dit_accel.RASConfig(**RAS_HALF))
    for name, cache in _caches(pipe, family).items():
        out, alone = _run(pipe, family, cache)
        assert alone["flops_ratio"] < 0.95, name
        assert torch.isfinite(out).all() and (out - dense).abs().mean() < 0.2 * dense.abs().mean(), name
        out, stacked = _run(pipe, family, cache, dit_accel.RASConfig(**RAS_HALF))
        assert stacked["flops_ratio"] < min(alone["flops_ratio"], ras["flops_ratio"]), name
        assert torch.isfinite(out).all(), name
        assert stacked["techniques"][0] == type(cache).__name__  # stage 1 outermost, whatever the order
        assert model_state(pipe.transformer) == before, name
    assert torch.equal(torch.as_tensor(pipe(**_kwargs(family))[0]), dense)


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_keep_all_pairs_equal_the_other_member_alone(family):
    """`A.keep_all() + B` equals B and `A + B.keep_all()` equals A, through the real composed paths:
    full-length boundaries around the token subset, the K/V cache under a step cache."""
    pipe = _pipe(family)
    ras = dit_accel.RASConfig(**RAS_HALF)
    caches = _caches(pipe, family)
    keep_all_caches = [FirstBlockCacheConfig(threshold=0.0),
                       TaylorSeerCacheConfig(cache_interval=1, disable_cache_before_step=STEPS),
                       PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=1,
                                                       spatial_attention_timestep_skip_range=(-1, 1001)),
                       dataclasses.replace(caches["magcache"], retention_ratio=1.0)]
    ras_alone, _ = _run(pipe, family, ras)
    for cache, keep_all in zip(caches.values(), keep_all_caches, strict=True):
        cache_alone, _ = _run(pipe, family, cache)
        torch.testing.assert_close(_run(pipe, family, dit_accel.RASConfig.keep_all(), cache)[0], cache_alone,
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(_run(pipe, family, ras, keep_all)[0], ras_alone, rtol=1e-4, atol=1e-4)


def test_measure_only_counts_what_a_users_cache_skipped():
    """A cache the user enabled is measured on the same scale: Wan through `enable_cache`, SD3 through
    `apply_first_block_cache` (diffusers alone would fail there: SD3's pipeline opens no cache context)."""
    for family in ("wan", "sd3"):
        pipe = tiny_pipeline(family)
        if family == "wan":
            pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        else:
            apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.5))
        before = model_state(pipe.transformer)
        with dit_accel.measure(pipe) as handle:
            pipe(**_kwargs(family))
            report = handle.report()
        assert report["techniques"] == [] and report["flops_ratio"] < 0.9
        assert model_state(pipe.transformer) == before


def test_ras_on_top_of_a_users_cache_and_a_second_cache_refused():
    pipe = tiny_pipeline("wan")
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    with dit_accel.measure(pipe) as handle:
        pipe(**_kwargs("wan"))
        cache_alone = handle.report()["flops_ratio"]
    before = model_state(pipe.transformer)
    with pytest.raises(dit_accel.ConfigError, match="already has a diffusers cache"):
        dit_accel.apply(pipe, TaylorSeerCacheConfig())
    assert model_state(pipe.transformer) == before
    out, report = _run(pipe, "wan", dit_accel.RASConfig(**RAS_HALF))
    assert torch.isfinite(out).all() and report["flops_ratio"] < cache_alone - 0.05
    assert model_state(pipe.transformer) == before
    pipe.transformer.disable_cache()
    assert not any(hasattr(m, "_diffusers_hook") and m._diffusers_hook.hooks for m in pipe.transformer.modules())


def test_a_cache_enabled_after_apply():
    """The ledger still counts what it skipped and SD3 still gets its cache context; with a token set the
    hooks are laid out again around the cache, which then skips on top of RAS (tests/test_drop_in.py: the
    same output as applying both at once)."""
    pipe = tiny_pipeline("sd3")
    with dit_accel.measure(pipe) as handle:
        apply_first_block_cache(pipe.transformer, FirstBlockCacheConfig(threshold=0.5))
        pipe(**_kwargs("sd3"))
        assert handle.report()["flops_ratio"] < 0.9
    pipe = tiny_pipeline("wan")
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF)) as handle:
        pipe(**_kwargs("wan"))
        ras_alone = handle.report()["flops_ratio"]
        pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.5))
        assert torch.isfinite(torch.as_tensor(pipe(**_kwargs("wan"))[0])).all()
        assert handle.report()["flops_ratio"] < ras_alone - 0.05


def test_cache_state_is_reset_at_every_run():
    """SD3's pipeline never resets diffusers' stateful hooks: the runtime does, so a second run with
    the same seed is the same image (the first FirstBlockCache step of run 2 must not reuse run 1)."""
    pipe = _pipe("sd3")
    with dit_accel.apply(pipe, FirstBlockCacheConfig(threshold=0.5)) as handle:
        first = torch.as_tensor(pipe(**_kwargs("sd3"))[0])
        second = torch.as_tensor(pipe(**_kwargs("sd3"))[0])
        assert handle.report()["flops_ratio"] < 0.9
    assert torch.equal(first, second)


def test_magcache_calibration_and_its_step_count():
    pipe = _pipe("sd3")
    config = dit_accel.calibrate(pipe, MagCacheConfig(threshold=0.5, calibrate=True), **_kwargs("sd3"))
    assert not config.calibrate and config.num_inference_steps == STEPS and len(config.mag_ratios) == STEPS
    with pytest.raises(dit_accel.ConfigError, match="MagCacheConfig.num_inference_steps is 8 but this run has 4"):
        _run(pipe, "sd3", config, num_inference_steps=4)
    with pytest.raises(dit_accel.ConfigError, match="needs no calibration"):
        dit_accel.calibrate(pipe, dit_accel.RASConfig())


def test_fastercache_alone_and_refused_with_a_token_subset():
    pipe = _pipe("cogvideox")
    config = FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                               tensor_format="BFCHW")
    out, report = _run(pipe, "cogvideox", config)
    assert torch.isfinite(out).all() and report["flops_ratio"] < 0.95
    before = model_state(pipe.transformer)
    with pytest.raises(dit_accel.ConfigError, match="FasterCacheConfig runs only part of the batch"):
        dit_accel.apply(pipe, config, dit_accel.RASConfig(**RAS_HALF))
    assert model_state(pipe.transformer) == before


def test_fastercache_skips_the_unconditional_half_of_pooled_text_embeddings():
    """SD3 passes pooled text embeddings beside the hidden states; on the steps where FasterCache computes
    only the conditional half, diffusers' default input names leave them whole (a batch-size mismatch)."""
    pipe = tiny_pipeline("sd3")
    call = tiny_call_kwargs("sd3", num_inference_steps=30, guidance_scale=4.0, output_type="latent")
    with dit_accel.apply(pipe, FasterCacheConfig(tensor_format="BCHW")) as handle:
        out = pipe(**{**call, "prompt": ["a red circle", "a blue square"]})[0]
        report = handle.report()
    assert torch.isfinite(out).all() and report["flops_ratio"] < 0.95


@pytest.mark.parametrize("family,guidance", [("wan", 5.0), ("sd3", 1.0)])
def test_fastercache_without_batched_cfg_is_refused_by_name(family, guidance):
    """Wan runs CFG in two calls, and without guidance there is no unconditional half: diffusers' FasterCache
    would fail deep in its hook with an IndexError; the first call names the problem instead."""
    pipe = tiny_pipeline(family)
    with dit_accel.apply(pipe, FasterCacheConfig(tensor_format="BFCHW" if family == "wan" else "BCHW")):
        with pytest.raises(dit_accel.ConfigError, match="FasterCacheConfig drops the unconditional half"):
            pipe(**tiny_call_kwargs(family, num_inference_steps=2, guidance_scale=guidance, output_type="latent"))


def test_taylorseer_defaults_that_miss_attn1_are_completed():
    """diffusers' default TaylorSeer patterns hook no module of Wan or CogVideoX (their attentions are
    attn1/attn2): the runtime names the self-attentions instead, so TaylorSeer acts."""
    for family in ("wan", "cogvideox"):
        _, report = _run(_pipe(family), family, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=2))
        assert report["work"]["self_attention"] < 0.8 * report["steps"][0]["calls"][0]["work"]["self_attention"] * \
            sum(len(s["calls"]) for s in report["steps"])
