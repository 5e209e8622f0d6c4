"""apply()/remove()/report(), the step context, and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch
from helpers import RecordingConfig, model_state, run

import dit_accel
from dit_accel.testing import FAMILIES, tiny_pipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_apply_and_remove_are_bit_identical(family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    before = model_state(pipe.transformer)
    handle = dit_accel.apply(pipe, dit_accel.RASConfig.keep_all(), RecordingConfig())
    assert torch.equal(run(pipe, family), baseline)
    report = handle.report()
    assert report["num_steps"] == 4 and report["flops_ratio"] == 1.0 and report["dense_flops"] > 0
    handle.remove()
    assert model_state(pipe.transformer) == before
    assert "set_timesteps" not in vars(pipe.scheduler)
    assert torch.equal(run(pipe, family), baseline)


def test_batched_cfg_context():
    pipe = tiny_pipeline("sd3")
    probe = RecordingConfig()
    with dit_accel.apply(pipe, probe):
        run(pipe, "sd3", num_inference_steps=3)
        run(pipe, "sd3", num_inference_steps=2, guidance_scale=1.0)
    first, second = probe.seen[:3], probe.seen[3:]
    assert [c.step_index for c in first] == [0, 1, 2] and [c.step_index for c in second] == [0, 1]
    assert all(c.branch == "batched" and c.cfg_batched and c.num_steps == 3 for c in first)
    assert all(c.branch == "single" and not c.cfg_batched and c.num_steps == 2 for c in second)
    assert first[0].run_index + 1 == second[0].run_index
    assert first[0].sigma is not None and first[0].sigma > first[1].sigma


TWO_CALL_CFG = {"flux": {"true_cfg_scale": 2.0, "negative_prompt": "blurry"},
                "hunyuan_video": {"true_cfg_scale": 2.0, "negative_prompt": "blurry"},
                "wan": {}}


@pytest.mark.parametrize("family", FAMILIES)
def test_step_context_of_every_family(family):
    """Batched CFG (one call holds uncond and cond) or two calls per step named by the pipeline."""
    pipe = tiny_pipeline(family)
    probe = RecordingConfig()
    with dit_accel.apply(pipe, probe):
        run(pipe, family, num_inference_steps=3, **TWO_CALL_CFG.get(family, {}))
    seen = [(c.step_index, c.branch, c.call_in_step, c.cfg_batched, c.num_steps) for c in probe.seen]
    if family in TWO_CALL_CFG:
        assert seen == [(s, b, i, False, 3) for s in range(3) for i, b in enumerate(("cond", "uncond"))]
    else:
        assert seen == [(s, "batched", 0, True, 3) for s in range(3)]
    assert {c.run_index for c in probe.seen} == {0}


def test_bare_transformer_context_resets_on_new_run():
    pipe = tiny_pipeline("sd3")
    probe = RecordingConfig()
    handle = dit_accel.apply(pipe.transformer, probe)
    run(pipe, "sd3", num_inference_steps=3)
    run(pipe, "sd3", num_inference_steps=3)
    handle.remove()
    assert [c.step_index for c in probe.seen] == [0, 1, 2, 0, 1, 2]
    assert [c.run_index for c in probe.seen] == [0, 0, 0, 1, 1, 1]
    assert probe.seen[0].num_steps is None


def test_report_counts_flops_per_step():
    pipe = tiny_pipeline("sd3")
    handle = dit_accel.apply(pipe)
    run(pipe, "sd3", num_inference_steps=3)
    report = handle.report()
    handle.remove()
    assert [s["step"] for s in report["steps"]] == [0, 1, 2]
    assert report["dense_flops"] == pytest.approx(sum(s["dense_flops"] for s in report["steps"]))
    assert 0 < report["transformer_seconds"] <= report["wall_seconds"]


# -- bad input -------------------------------------------------------------------------------------

def test_unsupported_model_names_supported_families():
    with pytest.raises(dit_accel.UnsupportedModelError, match="SD3Transformer2DModel"):
        dit_accel.apply(torch.nn.Linear(4, 4), dit_accel.RASConfig())


def test_pipeline_without_transformer():
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError, match="no `transformer` component"):
        dit_accel.apply(DDPMPipeline(unet=unet, scheduler=DDPMScheduler()), dit_accel.RASConfig())


def test_not_a_pipeline():
    with pytest.raises(TypeError, match="expects a diffusers pipeline"):
        dit_accel.apply("sd3", dit_accel.RASConfig())


@pytest.mark.parametrize("make,field", [
    (lambda: dit_accel.RASConfig(sample_ratio=0.0), "sample_ratio"),
    (lambda: dit_accel.RASConfig(sample_ratio=1.5), "sample_ratio"),
    (lambda: dit_accel.RASConfig(metric="mean"), "metric"),
    (lambda: dit_accel.RASConfig(warmup_steps=-1), "warmup_steps"),
    (lambda: dit_accel.FlexDiTConfig(min_density=0), "min_density"),
    (lambda: dit_accel.DyDiTConfig(width_ratio=2), "width_ratio"),
    (lambda: dit_accel.SVG2Config(top_p=0), "top_p"),
    (lambda: dit_accel.SVG2Config(key_clusters=0), "key_clusters"),
    (lambda: dit_accel.ProxyAttentionConfig(proxy_window=(1, 0, 2)), "proxy_window"),
])
def test_bad_config_values_name_the_field(make, field):
    with pytest.raises(dit_accel.ConfigError, match=field):
        make()


@pytest.mark.parametrize("config_cls", [dit_accel.RASConfig, dit_accel.FlexDiTConfig, dit_accel.DyDiTConfig,
                                        dit_accel.SVG2Config, dit_accel.ProxyAttentionConfig])
def test_keep_all_is_valid(config_cls):
    assert isinstance(config_cls.keep_all(), config_cls)


def test_configs_that_cannot_compose():
    pipe = tiny_pipeline("sd3")
    with pytest.raises(dit_accel.ConfigError, match="cannot be combined"):
        dit_accel.apply(pipe, dit_accel.SVG2Config(), dit_accel.ProxyAttentionConfig())
    with pytest.raises(dit_accel.ConfigError, match="cannot be combined"):
        dit_accel.apply(pipe, dit_accel.RASConfig(), dit_accel.FlexDiTConfig())
    with pytest.raises(dit_accel.ConfigError, match="acceleration configs"):
        dit_accel.apply(pipe, {"sample_ratio": 0.5})


def test_apply_twice_is_refused_and_failed_apply_leaves_no_hooks():
    pipe = tiny_pipeline("sd3")
    before = model_state(pipe.transformer)
    handle = dit_accel.apply(pipe, dit_accel.RASConfig())
    with pytest.raises(RuntimeError, match="already accelerated"):
        dit_accel.apply(pipe, dit_accel.RASConfig())
    handle.remove()
    with pytest.raises(NotImplementedError, match="SVG2Config"):
        dit_accel.apply(pipe, dit_accel.SVG2Config())
    assert model_state(pipe.transformer) == before
