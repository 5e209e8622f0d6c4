"""apply()/remove()/report(), the step context, and clear errors for bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, HookRegistry, ModelHook, TaylorSeerCacheConfig
from helpers import RecordingConfig, model_state, run

import dit_accel
from dit_accel.config import ConfigError, Stage, config_fields
from dit_accel.plan_spec import parse_plan
from dit_accel.testing import FAMILIES, tiny_pipeline

CONFIGS = [dit_accel.RASConfig, dit_accel.FlexDiTConfig, dit_accel.DyDiTConfig, dit_accel.SVG2Config,
           dit_accel.ProxyAttentionConfig]
RAS_HALF = dict(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())


@pytest.mark.parametrize("family", FAMILIES)
def test_noop_apply_and_remove_are_bit_identical(family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    before = model_state(pipe.transformer)
    handle = dit_accel.apply(pipe, dit_accel.RASConfig.keep_all(), RecordingConfig())
    torch.testing.assert_close(run(pipe, family), baseline, rtol=1e-5, atol=1e-5)
    report = handle.report()
    assert report["num_steps"] == 4 and report["dense_flops"] > 0
    assert report["flops_ratio"] == pytest.approx(1.0, abs=1e-3)
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


@pytest.mark.parametrize("make,message", [
    (lambda: dit_accel.RASConfig(sample_ratio=0.0), "sample_ratio must be in"),
    (lambda: dit_accel.RASConfig(sample_ratio=1.5), "sample_ratio must be in"),
    (lambda: dit_accel.RASConfig(metric="mean"), "metric must be one of 'std', 'l2norm'"),
    (lambda: dit_accel.RASConfig(warmup_steps=-1), "warmup_steps must be >= 0"),
    (lambda: dit_accel.RASConfig(warmup_steps=True), "warmup_steps must be an int"),
    (lambda: dit_accel.RASConfig(error_reset_steps=3), "error_reset_steps must be tuple of int"),
    (lambda: dit_accel.RASConfig(error_reset_steps=(3, -1)), r"error_reset_steps\[1\] must be >= 0"),
    (lambda: dit_accel.RASConfig(cache_kv="no"), "cache_kv must be True or False"),
    (lambda: dit_accel.FlexDiTConfig(schedule=(0, 0.5)), r"schedule\[0\] must be in"),
    (lambda: dit_accel.FlexDiTConfig(sparse_blocks=5), "sparse_blocks must be"),
    (lambda: dit_accel.FlexDiTConfig(sparse_blocks=(3, 1)), "first <= last"),
    (lambda: dit_accel.DyDiTConfig(width_ratio=2), "width_ratio must be in"),
    (lambda: dit_accel.SVG2Config(top_p=0), "top_p must be in"),
    (lambda: dit_accel.SVG2Config(key_clusters=0), "key_clusters must be"),
    (lambda: dit_accel.SVG2Config(query_clusters=2.5), "query_clusters must be an int"),
    (lambda: dit_accel.ProxyAttentionConfig(proxy_window=(1, 0, 2)), r"proxy_window\[1\] must be >= 1"),
    (lambda: dit_accel.ProxyAttentionConfig(proxy_window=(1, 2)), "proxy_window must be"),
    (lambda: dit_accel.ProxyAttentionConfig(local_window=(1, 6, 6), proxy_window=(1, 4, 4)), "whole number of proxy"),
])
def test_bad_config_values_name_the_field(make, message):
    with pytest.raises(dit_accel.ConfigError, match=message):
        make()


def test_configs_are_frozen_normalised_and_documented():
    config = dit_accel.RASConfig(sample_ratio=1, error_reset_steps=[6, 9])
    assert config.sample_ratio == 1.0 and isinstance(config.sample_ratio, float)
    assert config.error_reset_steps == (6, 9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.sample_ratio = 0.2
    specs = {spec.name: spec for spec in config_fields(dit_accel.RASConfig)}
    assert specs["sample_ratio"].param.range_text() == "in (0, 1]" and specs["sample_ratio"].param.doc
    assert specs["error_reset_steps"].type_text == "tuple of int"
    assert all(spec.param.doc for cls in CONFIGS for spec in config_fields(cls))


@pytest.mark.parametrize("config_cls", CONFIGS)
def test_keep_all_is_valid(config_cls):
    assert isinstance(config_cls.keep_all(), config_cls)


def test_configs_that_share_a_stage_are_refused_by_name():
    pipe = tiny_pipeline("sd3")
    before = model_state(pipe.transformer)
    cases = [((dit_accel.SVG2Config(), dit_accel.ProxyAttentionConfig()), "SVG2Config and ProxyAttentionConfig.*stage 6"),
             ((dit_accel.RASConfig(), dit_accel.FlexDiTConfig.preset("quality")), "RASConfig and FlexDiTConfig.*stage 5"),
             ((FirstBlockCacheConfig(), TaylorSeerCacheConfig()), "FirstBlockCacheConfig and TaylorSeerCacheConfig"),
             ((dit_accel.RASConfig(), dit_accel.RASConfig(cache_kv=False)), "stage 2")]
    for configs, message in cases:
        with pytest.raises(dit_accel.ConfigError, match=message):
            dit_accel.apply(pipe, *configs)
    with pytest.raises(dit_accel.ConfigError, match="acceleration configs"):
        dit_accel.apply(pipe, {"sample_ratio": 0.5})
    # a stage left empty by the config's fields is free: RAS without its K/V cache composes with FlexDiT's pooled K/V
    assert Stage.KV_SOURCE not in dit_accel.RASConfig(cache_kv=False).stages()
    assert model_state(pipe.transformer) == before


def test_plan_order_is_fixed_by_stage_not_by_argument_order():
    pipe = tiny_pipeline("wan")
    outputs, orders = [], []
    for configs in ((dit_accel.RASConfig(**RAS_HALF), FirstBlockCacheConfig(threshold=0.3)),
                    (FirstBlockCacheConfig(threshold=0.3), dit_accel.RASConfig(**RAS_HALF))):
        with dit_accel.apply(pipe, *configs) as handle:
            outputs.append(run(pipe, "wan"))
            orders.append(handle.report()["techniques"])
            flops = handle.report()["flops"]
        assert flops > 0
    assert torch.equal(outputs[0], outputs[1])
    assert orders[0] == orders[1] == ["FirstBlockCacheConfig", "RASConfig"]


def test_image_to_image_counts_the_steps_it_runs():
    """SD3 img2img at strength 0.5 runs the last 3 of 6 scheduler steps: the context says 3 steps with
    their own sigmas, step indices 0..2."""
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = StableDiffusion3Img2ImgPipeline(**tiny_pipeline("sd3").components)
    pipe.set_progress_bar_config(disable=True)
    probe = RecordingConfig()
    image = torch.rand(1, 3, 128, 128)
    with dit_accel.apply(pipe, probe):
        pipe(prompt="a red circle", image=image, strength=0.5, num_inference_steps=6, output_type="pt",
             generator=torch.Generator().manual_seed(0))
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    assert [c.step_index for c in probe.seen] == [0, 1, 2]
    assert {c.num_steps for c in probe.seen} == {3}
    assert [c.sigma for c in probe.seen] == pytest.approx(sigmas[3:6])


def test_step_index_and_sigma_from_the_pipelines_cache_context():
    """Wan passes step_index, sigma and the step count in `cache_context`: the context takes them."""
    pipe = tiny_pipeline("wan")
    probe = RecordingConfig()
    with dit_accel.apply(pipe, probe):
        run(pipe, "wan", num_inference_steps=3)
    sigmas = [float(s) for s in pipe.scheduler.sigmas]
    assert [(c.step_index, c.branch) for c in probe.seen] == [(s, b) for s in range(3) for b in ("cond", "uncond")]
    assert [c.sigma for c in probe.seen] == pytest.approx([s for s in sigmas[:3] for _ in range(2)])


def test_apply_twice_is_refused_and_failed_apply_leaves_no_hooks():
    pipe = tiny_pipeline("sd3")
    before = model_state(pipe.transformer)
    handle = dit_accel.apply(pipe, dit_accel.RASConfig())
    with pytest.raises(RuntimeError, match="already accelerated"):
        dit_accel.apply(pipe, dit_accel.RASConfig())
    handle.remove()
    assert model_state(pipe.transformer) == before

    class Skipper(ModelHook):  # a foreign step cache on a block's MLP, which stage 2 refuses at attach
        def new_forward(self, module, *args, **kwargs):
            return self.fn_ref.original_forward(*args, **kwargs)

    HookRegistry.check_if_exists_or_initialize(pipe.transformer.transformer_blocks[0].ff).register_hook(
        Skipper(), "skipper")
    with_cache = model_state(pipe.transformer)
    with pytest.raises(ConfigError, match="cannot be combined"):  # after DyDiT attached its hooks
        dit_accel.apply(pipe, dit_accel.DyDiTConfig(width_ratio=0.5), dit_accel.RASConfig())
    assert model_state(pipe.transformer) == with_cache


def test_dense_attention_counts_a_pooled_key_by_its_log_count_bias():
    """Stage 5's contract with stage 6: a key standing for `c` equal keys carries log(c); with it,
    attending to the pooled keys equals attending to all of them (bool and float masks kept)."""
    from dit_accel.attention.intercept import dense_attention

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 3, 5, 8, generator=generator)
    key, value = torch.randn(2, 3, 4, 8, generator=generator), torch.randn(2, 3, 4, 8, generator=generator)
    counts = torch.tensor([1, 3, 2, 1])
    full_key, full_value = key.repeat_interleave(counts, dim=2), value.repeat_interleave(counts, dim=2)
    bias = counts.float().log().view(1, 1, 1, -1)
    expected = torch.nn.functional.scaled_dot_product_attention(query, full_key, full_value)
    torch.testing.assert_close(dense_attention(query, key, value, bias), expected)
    keep = torch.tensor([[True, True, False, True]])
    masked = torch.nn.functional.scaled_dot_product_attention(query, full_key, full_value,
                                                              attn_mask=keep.repeat_interleave(counts, dim=1))
    torch.testing.assert_close(dense_attention(query, key, value, bias, attn_mask=keep), masked)


def test_token_set_coordinates_are_the_tokens_grid_positions():
    from dit_accel.models.base import TokenGrid
    from dit_accel.runtime.call_state import TokenSelection

    grid = TokenGrid(2, 3, 4)
    tokens = TokenSelection(torch.tensor([[0, 5, 23], [1, 12, 13]]), grid)
    assert tokens.count == 3 and not tokens.shared
    assert tokens.coordinates()[0].tolist() == [[0, 0, 0], [0, 1, 1], [1, 2, 3]]
    assert tokens.coordinates()[1].tolist() == [[0, 0, 1], [1, 0, 0], [1, 0, 1]]


def test_presets_are_named_configs_and_plans_take_them_with_overrides():
    fast = dit_accel.ProxyAttentionConfig.preset("fast")
    assert fast == dit_accel.ProxyAttentionConfig(**dit_accel.ProxyAttentionConfig.presets["fast"])
    [parsed] = parse_plan("proxy:preset=fast,shift_windows=True")
    assert parsed == dit_accel.ProxyAttentionConfig.preset("fast", shift_windows=True)
    for config_class in (dit_accel.SVG2Config, dit_accel.ProxyAttentionConfig):
        assert set(config_class.presets) == {"quality", "balanced", "fast"}
    with pytest.raises(dit_accel.ConfigError, match="valid presets: quality, balanced, fast"):
        parse_plan("svg2:preset=turbo")
    with pytest.raises(dit_accel.ConfigError, match="ras has no field 'preset'"):
        parse_plan("ras:preset=fast")
