"""`dit_accel.estimate`: the bytes a plan will hold, from the adapter and the shapes before anything runs,
against what `report()["state_bytes"]` measures after a run; stage 2's full-length residuals only
where a step cache reads or writes; the check against free device memory at a run's first call."""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig

import dit_accel
from dit_accel.config import ConfigError
from dit_accel.models import adapter_for
from dit_accel.models.base import CallInfo
from dit_accel.testing import medium_call_kwargs, medium_pipeline, release_transformer

RAS = dict(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())


def _sizes(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in ("height", "width", "num_frames") if key in kwargs}


@pytest.mark.parametrize("family,guidance", [("wan", 5.0), ("sd3", 4.0)])
def test_the_estimate_is_within_ten_percent_of_what_a_run_holds(family, guidance):
    """RAS under FirstBlockCache on a medium model (4,096 tokens, 4 blocks), CFG in two calls (Wan) or
    batched (SD3): previous outputs, the K/V cache and the boundary residuals, before and after."""
    pipe = medium_pipeline(family)
    kwargs = medium_call_kwargs(family, num_inference_steps=3, guidance_scale=guidance, max_sequence_length=64)
    configs = (dit_accel.RASConfig(**RAS), FirstBlockCacheConfig(threshold=0.05))
    before = dit_accel.estimate(pipe, *configs, **_sizes(kwargs), guidance=True, text_tokens=64)
    with dit_accel.apply(pipe, *configs) as handle:
        pipe(**kwargs)
        measured = handle.report()["state_bytes"]["RASConfig"]
        after = handle.estimate(**_sizes(kwargs), guidance=True, text_tokens=64)
    assert before == after
    estimated = sum(before["by_technique"]["RASConfig"].values())
    assert abs(estimated - measured) <= 0.1 * measured, (estimated, measured, before["by_technique"])
    assert set(before["by_kind"]) == {"outputs", "kv_cache", "boundary_residuals"}
    assert before["shapes"]["tokens"] == 4096 and before["shapes"]["samples"] == 2


def test_stage_two_keeps_full_length_residuals_only_where_the_step_cache_looks():
    """FirstBlockCache reads its head block and writes its tail; the blocks between only run or pass their
    input on, so stage 2 keeps two residuals per branch, not one per block (25 GiB at Wan 14B 480p)."""
    pipe = medium_pipeline("wan")
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS), FirstBlockCacheConfig(threshold=0.05)) as handle:
        assert handle.sessions[0].token_set.cached_blocks == {0, 3}
        held = handle.estimate(height=512, width=512, num_frames=13, guidance=False, text_tokens=64)
    assert held["by_kind"]["boundary_residuals"] == 2 * 4096 * 384 * 4


def test_a_plan_that_cannot_fit_is_refused_at_the_first_call_with_the_numbers(monkeypatch):
    """The check a run's first CUDA call makes, against the free memory the device reports."""
    pipe = medium_pipeline("wan")
    call = CallInfo(adapter_for(pipe.transformer).grid_for(512, 512, 13),
                    2, 64, None, torch.zeros(2, 16, 4, 64, 64))
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS)) as handle:
        session = handle.sessions[0]
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 20, 80 << 30))
        with pytest.raises(ConfigError, match=r"GiB on the device \(RASConfig outputs .* kv_cache .* GiB free"):
            session._check_memory(call, cfg_batched=True)
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 << 30, 80 << 30))
        session._check_memory(call, cfg_batched=True)  # fits: silent


def test_wan_14b_480p_on_the_meta_device():
    """The readiness review's numbers, from the real config without weights: RAS's K/V cache is 50 GiB
    at Wan 14B 480p x 81 frames (2 CFG calls, 40 blocks, 32,760 tokens, bf16), its weights 26.6 GiB."""
    transformer = release_transformer("wan2.1-14b", device="meta", dtype=torch.bfloat16)
    held = dit_accel.estimate(transformer, dit_accel.RASConfig(), height=480, width=832, num_frames=81)
    assert held["shapes"]["tokens"] == 32760 and held["shapes"]["samples"] == 2
    assert held["by_kind"]["kv_cache"] / 2**30 == pytest.approx(50.0, rel=0.01)
    assert held["weights_bytes"] / 2**30 == pytest.approx(26.6, rel=0.02)


def test_sizes_that_give_no_tokens_are_named():
    pipe = medium_pipeline("wan")
    with pytest.raises(ValueError, match="height must be a positive int"):
        dit_accel.estimate(pipe, dit_accel.RASConfig(), height=0, width=512)
    with pytest.raises(ValueError, match="give no tokens"):
        dit_accel.estimate(pipe, dit_accel.RASConfig(), height=8, width=8)


def test_the_command_line_estimates_a_release_without_its_weights(capsys):
    """`dit-accel plans --estimate`: per plan the GiB it holds, whether it fits an 80 GB GPU beside the
    weights, and the smaller forms that would make it fit."""
    from dit_accel.cli import main

    assert main(["plans", "--estimate", "wan2.1-14b", "--frames", "81", "--plan", "ras",
                 "--plan", "ras:kv_cache=fp8"]) == 0
    out = capsys.readouterr().out
    assert "ras: 50.0 GiB on the device" in out and "does NOT fit" in out and "kv_cache='fp8'" in out
    assert "ras:kv_cache=fp8: 25.0 GiB on the device" in out and "fits an 80 GB GPU" in out
