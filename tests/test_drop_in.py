"""The Accelerated*Pipeline classes as drop-ins for their diffusers parents, and a standing plan that
survives what diffusers users do: helpers that read `__call__`'s signature (LoRA scale), caches
enabled after the plan, other attention processors, IP-Adapter tokens, pipelines sharing components,
and the checks diffusers' own `PipelineTesterMixin` runs on every pipeline (with no plan and with a
keep-all one)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import contextlib
import inspect
import io

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
)
from helpers import ACCELERATED, add_tiny_flux_ip_adapter, model_state

import dit_accel
from dit_accel.pipelines import AcceleratedFluxPipeline
from dit_accel.testing import FAMILIES, VIDEO_FAMILIES, tiny_call_kwargs, tiny_pipeline

RAS_HALF = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())
#: the standing plans of the PipelineTesterMixin checks: none, and one running its real path on every token
PLANS = {"dense": None, "keep_all": dit_accel.RASConfig.keep_all()}


def _kwargs(family: str, **overrides) -> dict:
    """Two steps, latents out (DiT always decodes), small videos: the denoising loop is what differs."""
    kwargs = {"num_inference_steps": 2, "output_type": "pt" if family == "dit" else "latent"}
    if family in VIDEO_FAMILIES:
        kwargs.update(height=64, width=64, num_frames=5)
    return tiny_call_kwargs(family, **{**kwargs, **overrides})


def _out(pipe, family: str, **overrides) -> torch.Tensor:
    return torch.as_tensor(pipe(**_kwargs(family, **overrides))[0]).float()


def _accelerated(family: str, plan=None):
    """The family's Accelerated class built from a fresh tiny pipeline's components, with `plan` standing."""
    pipe = ACCELERATED[family](**tiny_pipeline(family).components)
    pipe.set_progress_bar_config(disable=True)
    pipe.set_acceleration(plan)
    return pipe


def _has_hooks(transformer) -> bool:
    return any(name.startswith("dit_accel.") for m in transformer.modules() if hasattr(m, "_diffusers_hook")
               for name in m._diffusers_hook.hooks)


# -- 1. signatures -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_signatures_are_the_parents_plus_a_keyword_only_acceleration(family):
    cls = ACCELERATED[family]
    parent = cls.diffusers_class()
    for name in ("__call__", "from_pretrained", "from_pipe"):
        ours, theirs = inspect.signature(getattr(cls, name)), inspect.signature(getattr(parent, name))
        *same, added = ours.parameters.values()
        if added.kind is inspect.Parameter.VAR_KEYWORD:  # `acceleration` sits before **kwargs
            *same, added, kwargs = ours.parameters.values()
            same.append(kwargs)
        assert same == list(theirs.parameters.values()), name
        assert (added.name, added.kind, added.default) == ("acceleration", inspect.Parameter.KEYWORD_ONLY, None)
        assert ours.return_annotation == theirs.return_annotation
    assert inspect.signature(cls.save_pretrained) == inspect.signature(parent.save_pretrained)
    assert cls.__name__ == f"Accelerated{parent.__name__}" and cls.__module__ == "dit_accel.pipelines.accelerated"
    assert inspect.getdoc(parent.__call__) in cls.__call__.__doc__


def _attention_kwargs_name(pipeline_class) -> str:
    """diffusers' LoRA tests find where a LoRA scale goes by reading `__call__`'s signature."""
    parameters = inspect.signature(pipeline_class.__call__).parameters
    for name in ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs"):
        if name in parameters:
            return name
    raise AssertionError(f"Could not determine the attention kwargs name for {pipeline_class.__name__}")


@pytest.mark.parametrize("family", ["flux", "sd3", "wan"])
def test_lora_scale_through_the_attention_kwargs_the_signature_names(family):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    parent = tiny_pipeline(family)
    torch.manual_seed(0)
    parent.transformer.add_adapter(lora)
    name = _attention_kwargs_name(ACCELERATED[family])
    assert name == _attention_kwargs_name(type(parent))
    full = _out(parent, family)
    half = _out(parent, family, **{name: {"scale": 0.5}})
    assert not torch.equal(full, half)
    pipe = _accelerated(family, dit_accel.RASConfig.keep_all())
    torch.manual_seed(0)
    pipe.transformer.add_adapter(lora)
    torch.testing.assert_close(_out(pipe, family, **{name: {"scale": 0.5}}), half)
    assert pipe.acceleration_report()["techniques"] == ["RASConfig"]


# -- 2. a cache enabled after the plan joins it --------------------------------------------------------------

def _enable_fbc(transformer, config) -> None:
    """`enable_cache` where the model has it; SD3, PixArt and DiT take diffusers' `apply_first_block_cache`."""
    if hasattr(transformer, "enable_cache"):
        transformer.enable_cache(config)
    else:
        apply_first_block_cache(transformer, config)


@pytest.mark.parametrize("family", ["wan", "flux", "cogvideox", "sd3"])
@pytest.mark.parametrize("plan", [RAS_HALF, dit_accel.RASConfig.keep_all()], ids=["ras", "keep_all"])
def test_a_cache_enabled_after_the_plan_joins_it(family, plan):
    """Enabling FirstBlockCache on a pipeline with a standing plan gives what applying both at once gives;
    disabling it again gives the plan alone (diffusers' cache tester: enable, then disable)."""
    fbc = FirstBlockCacheConfig(threshold=0.3)
    steps = {"num_inference_steps": 6}
    pipe = _accelerated(family, [plan, fbc])
    both = _out(pipe, family, **steps)
    both_ratio = pipe.acceleration_report()["flops_ratio"]
    pipe.set_acceleration(plan)
    alone = _out(pipe, family, **steps)
    _enable_fbc(pipe.transformer, fbc)
    assert torch.equal(_out(pipe, family, **steps), both)
    assert pipe.acceleration_report()["flops_ratio"] == both_ratio
    if hasattr(pipe.transformer, "disable_cache"):
        pipe.transformer.disable_cache()
        assert torch.equal(_out(pipe, family, **steps), alone)
    pipe.set_acceleration(None)
    assert not _has_hooks(pipe.transformer)


def test_a_cache_the_plan_cannot_take_is_refused_at_enable_cache():
    pipe = _accelerated("wan", [RAS_HALF, FirstBlockCacheConfig(threshold=0.3)])
    before = model_state(pipe.transformer)
    with pytest.raises(dit_accel.ConfigError, match="TaylorSeerCacheConfig cannot join the dit-accel plan.*stage 1"):
        pipe.transformer.enable_cache(TaylorSeerCacheConfig())
    assert model_state(pipe.transformer) == before and pipe.transformer._cache_config is None

    video = _accelerated("cogvideox", RAS_HALF)
    before = model_state(video.transformer)
    faster = FasterCacheConfig(spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                               tensor_format="BFCHW")
    with pytest.raises(dit_accel.ConfigError, match="FasterCacheConfig runs only part of the batch"):
        video.transformer.enable_cache(faster)
    assert model_state(video.transformer) == before and video.transformer._cache_config is None
    assert torch.isfinite(_out(video, "cogvideox")).all()
    video.set_acceleration(None)
    assert model_state(video.transformer)["hooks"] == [] and "enable_cache" not in vars(video.transformer)


# -- 3. attention processors that never call torch's SDPA ------------------------------------------------------

@pytest.mark.parametrize("family", ["pixart", "pixart_sigma"])
def test_a_processor_without_sdpa_runs_ras_without_its_kv_source(family):
    """`set_default_attn_processor()` (diffusers' tests call it on every component) puts AttnProcessor,
    which computes attention in matmuls: RAS runs its token set there without its K/V cache and says so."""
    parent = tiny_pipeline(family)
    parent.transformer.set_default_attn_processor()
    dense = _out(parent, family)
    pipe = _accelerated(family, dit_accel.RASConfig.keep_all())
    pipe.transformer.set_default_attn_processor()  # after the plan: taken up at the next call
    torch.testing.assert_close(_out(pipe, family), dense)
    pipe.set_acceleration(RAS_HALF)
    assert torch.isfinite(_out(pipe, family)).all()
    report = pipe.acceleration_report()
    assert report["flops_ratio"] < 0.9
    assert len(report["notes"]) == 1 and "RASConfig ran without its K/V source" in report["notes"][0]
    assert "AttnProcessor" in report["notes"][0]


def test_stages_5_6_refuse_a_processor_without_sdpa_before_any_block_runs():
    pipe = _accelerated("pixart")
    pipe.transformer.set_default_attn_processor()
    for plan in (dit_accel.SVG2Config(), dit_accel.ProxyAttentionConfig()):
        with pytest.raises(dit_accel.ConfigError, match=r"never reaches \(its processor AttnProcessor\)"):
            pipe.set_acceleration(plan)
        assert pipe.acceleration == [] and not _has_hooks(pipe.transformer)

    pipe = _accelerated("pixart", dit_accel.SVG2Config())
    pipe.transformer.set_default_attn_processor()  # after the plan: refused when the next call starts
    blocks_run = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *args: blocks_run.append(1))
    with pytest.raises(dit_accel.ConfigError, match="AttnProcessor"):
        pipe(**_kwargs("pixart"))
    assert blocks_run == []


# -- 4. IP-Adapter tokens ------------------------------------------------------------------------------------------

def test_flux_ip_adapter_under_ras_and_attention_kernels():
    """IP-Adapter's image tokens reach Flux's image stream through a second SDPA call of the image queries
    alone; techniques keep it whole (it crashed RAS's K/V cache) and keep-all plans equal dense."""
    pipe = _accelerated("flux")
    dense_without = _out(pipe, "flux")
    ip = add_tiny_flux_ip_adapter(pipe)
    dense = _out(pipe, "flux", **ip)
    assert not torch.allclose(dense, dense_without, atol=1e-3)
    for plan in (dit_accel.RASConfig.keep_all(), dit_accel.SVG2Config.keep_all(), dit_accel.FlexDiTConfig.keep_all()):
        torch.testing.assert_close(_out(pipe, "flux", acceleration=plan, **ip), dense, rtol=1e-5, atol=1e-5)
    out = _out(pipe, "flux", acceleration=RAS_HALF, num_inference_steps=4, **ip)
    assert torch.isfinite(out).all() and pipe.acceleration_report()["flops_ratio"] < 0.8
    # IP-Adapter adds its output in head space, with weights over every head: no narrower heads
    with pytest.raises(dit_accel.ConfigError, match="FluxIPAdapterAttnProcessor has weights of its own"):
        pipe(**_kwargs("flux", **ip), acceleration=dit_accel.DyDiTConfig(width_ratio=0.5))


# -- 5. pipelines sharing components share the plan -----------------------------------------------------------------

def test_pipelines_built_from_the_same_components_share_the_plan():
    pipe = _accelerated("flux", RAS_HALF)
    sparse = _out(pipe, "flux")
    dense = _out(pipe, "flux", acceleration=[])

    derived = AcceleratedFluxPipeline.from_pipe(pipe)
    assert derived.acceleration == [RAS_HALF] and torch.equal(_out(derived, "flux"), sparse)
    assert derived.acceleration_report()["flops_ratio"] < 1
    plain = FluxPipeline(**pipe.components)
    assert torch.equal(_out(plain, "flux"), sparse)
    rebuilt = AcceleratedFluxPipeline(**pipe.components)
    assert rebuilt.acceleration == [RAS_HALF]

    with pytest.raises(RuntimeError, match=r"already accelerated by the plan \[RASConfig\] applied to "
                                           r"AcceleratedFluxPipeline"):
        dit_accel.apply(plain, dit_accel.RASConfig.keep_all())

    assert torch.equal(_out(derived, "flux", acceleration=[]), dense)  # a per-call plan is that call's own
    assert pipe.acceleration == [RAS_HALF] and torch.equal(_out(pipe, "flux"), sparse)
    derived.set_acceleration(None)  # the standing plan is the components': replaced for every pipeline
    assert pipe.acceleration == [] and not _has_hooks(pipe.transformer)
    assert torch.equal(_out(pipe, "flux"), dense) and torch.equal(_out(plain, "flux"), dense)
    third = AcceleratedFluxPipeline.from_pipe(pipe, acceleration=RAS_HALF)
    assert pipe.acceleration == derived.acceleration == third.acceleration == [RAS_HALF]
    assert torch.equal(_out(pipe, "flux"), sparse)


def test_pipelines_with_a_scheduler_of_their_own_are_followed():
    """The step context reads the running pipeline's scheduler: an Accelerated pipeline's always; a plain
    one's where the handle follows it (a plain pipeline sharing the scheduler is followed through it)."""
    pipe = _accelerated("flux", RAS_HALF)
    expected = _out(pipe, "flux")

    def own_scheduler():
        return FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)

    assert torch.equal(_out(AcceleratedFluxPipeline.from_pipe(pipe, scheduler=own_scheduler()), "flux"), expected)
    pipe.set_acceleration(None)
    with dit_accel.apply(pipe, RAS_HALF) as handle:
        plain = FluxPipeline.from_pipe(pipe, scheduler=own_scheduler())
        handle.follow(plain)
        assert torch.equal(_out(plain, "flux"), expected)
    assert "set_timesteps" not in vars(plain.scheduler) and "maybe_free_model_hooks" not in vars(plain)


# -- 6. what diffusers' PipelineTesterMixin checks of every pipeline, with no plan and a keep-all one -----------------

@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
@pytest.mark.parametrize("family", ["sd3", "wan", "cogvideox"])
def test_callback_on_step_end_with_tensor_inputs(family, plan):
    pipe = _accelerated(family, PLANS[plan])
    seen = []

    def subset(pipe, step, timestep, callback_kwargs):
        assert set(callback_kwargs) <= set(pipe._callback_tensor_inputs)
        seen.append(step)
        return callback_kwargs

    def zero_last(pipe, step, timestep, callback_kwargs):
        assert set(callback_kwargs) == set(pipe._callback_tensor_inputs)
        if step == pipe.num_timesteps - 1:
            callback_kwargs["latents"] = torch.zeros_like(callback_kwargs["latents"])
        return callback_kwargs

    _out(pipe, family, callback_on_step_end=subset, callback_on_step_end_tensor_inputs=["latents"])
    assert seen == [0, 1]
    out = _out(pipe, family, callback_on_step_end=zero_last,
               callback_on_step_end_tensor_inputs=pipe._callback_tensor_inputs)
    assert out.abs().sum() == 0


@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
@pytest.mark.parametrize("family", [f for f in FAMILIES if f != "dit"])
def test_num_images_per_prompt(family, plan):
    pipe = _accelerated(family, PLANS[plan])
    parameters = inspect.signature(type(pipe).__call__).parameters  # how diffusers' test finds it
    count = next(name for name in ("num_images_per_prompt", "num_videos_per_prompt") if name in parameters)
    prompt = tiny_call_kwargs(family)["prompt"]
    for batch, per_prompt in ((1, 2), (2, 2)):
        out = _out(pipe, family, prompt=[prompt] * batch, **{count: per_prompt})
        # CogVideoX ignores num_videos_per_prompt (see tiny_call_kwargs)
        assert out.shape[0] == batch * (1 if family == "cogvideox" else per_prompt)


@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_equals_its_samples_one_by_one(family, plan):
    """diffusers' batch-single-identical check: the first sample of a batch of two (a generator each) is
    the single run's output, with a keep-all plan selecting per sample or shared by the batch."""
    pipe = _accelerated(family, PLANS[plan])
    batch_arg = "class_labels" if family == "dit" else "prompt"
    value = tiny_call_kwargs(family)[batch_arg]
    single = _out(pipe, family, generator=[torch.Generator().manual_seed(0)])
    batched = _out(pipe, family, **{batch_arg: value * 2 if family == "dit" else [value, value + " again"]},
                   generator=[torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)])
    assert batched.shape[0] == 2
    torch.testing.assert_close(batched[:1], single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_save_and_from_pretrained_keep_the_output(family, tmp_path):
    pipe = _accelerated(family, dit_accel.RASConfig.keep_all())
    expected = _out(pipe, family)
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert _has_hooks(pipe.transformer), "saving must put the standing plan back"
    loaded = ACCELERATED[family].from_pretrained(tmp_path, acceleration=dit_accel.RASConfig.keep_all())
    loaded.set_progress_bar_config(disable=True)
    assert set(loaded.components) == set(pipe.components)
    torch.testing.assert_close(_out(loaded, family), expected)
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is pipe.diffusers_class()


@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_to_dtype_runs_under_the_plan(family, plan):
    parent = tiny_pipeline(family).to(torch.bfloat16)
    dense = _out(parent, family)
    pipe = _accelerated(family, PLANS[plan])
    pipe.to(torch.bfloat16)
    assert all(c.dtype == torch.bfloat16 for c in pipe.components.values() if isinstance(c, torch.nn.Module))
    torch.testing.assert_close(_out(pipe, family), dense)


@pytest.mark.parametrize("family", FAMILIES)
def test_components_and_a_pipeline_from_them(family):
    parent = tiny_pipeline(family)
    components = {k: v for k, v in parent.components.items() if not isinstance(v, (str, int, float))}
    pipe = ACCELERATED[family](**components)
    assert set(pipe.components) == set(components)
    assert all(pipe.components[name] is component for name, component in components.items())


@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
def test_progress_bar_config(plan):
    pipe = _accelerated("sd3", PLANS[plan])
    pipe.set_progress_bar_config(disable=False)
    with io.StringIO() as stderr, contextlib.redirect_stderr(stderr):
        pipe(**_kwargs("sd3"))
        assert "2/2" in stderr.getvalue()
    pipe.set_progress_bar_config(disable=True)
    with io.StringIO() as stderr, contextlib.redirect_stderr(stderr):
        pipe(**_kwargs("sd3"))
        assert stderr.getvalue() == ""


@pytest.mark.parametrize("plan", PLANS, ids=list(PLANS))
@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_output_types_dict_and_tuple_and_attention_slicing(family, plan):
    pipe = _accelerated(family, PLANS[plan])
    kwargs = dict(num_inference_steps=2)
    as_pt = pipe(**tiny_call_kwargs(family, output_type="pt", **kwargs)).images
    as_np = pipe(**tiny_call_kwargs(family, output_type="np", **kwargs)).images
    as_pil = pipe(**tiny_call_kwargs(family, output_type="pil", **kwargs)).images
    assert np.abs(as_pt.numpy().transpose(0, 2, 3, 1) - as_np).max() < 1e-4
    assert np.abs(np.asarray(as_pil[0], dtype=np.float32) - (as_np[0] * 255).round()).max() < 2
    as_tuple = pipe(**tiny_call_kwargs(family, output_type="pt", return_dict=False, **kwargs))[0]
    assert torch.equal(as_tuple, as_pt)
    pipe.enable_attention_slicing(slice_size=1)
    sliced = pipe(**tiny_call_kwargs(family, output_type="pt", **kwargs)).images
    assert (sliced - as_pt).abs().max() < 1e-3


@pytest.mark.parametrize("family", ["sd3", "wan", "cogvideox"])
def test_guidance_on_and_off_under_ras(family):
    """diffusers' `test_cfg`: the same shapes with guidance 1 and 7.5; the step context follows the
    pipeline's own CFG verdict call by call."""
    pipe = _accelerated(family, RAS_HALF)

    def branches() -> list[str]:
        return [call["branch"] for call in pipe.acceleration_report()["steps"][0]["calls"]]

    without = _out(pipe, family, guidance_scale=1.0)
    assert len(branches()) == 1 and branches() != ["batched"]
    with_cfg = _out(pipe, family, guidance_scale=7.5)
    assert branches() in (["batched"], ["cond", "uncond"])
    assert without.shape == with_cfg.shape and torch.isfinite(with_cfg).all()
