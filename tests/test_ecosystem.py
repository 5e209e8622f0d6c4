"""The rest of the ecosystem: offloading, torch.compile, attention backends, half precision, LoRA.

On this CPU `enable_model_cpu_offload(device="cpu")` and group offloading install their hooks but
move nothing; the tests check that those wrappers survive `apply()`/`remove()` in either order and
still fire.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig
from diffusers.models.attention_dispatch import _AttentionBackendRegistry
from helpers import model_state

import dit_accel
from dit_accel.pipelines import AcceleratedStableDiffusion3Pipeline
from dit_accel.testing import VIDEO_FAMILIES, tiny_call_kwargs, tiny_pipeline

RAS_HALF = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())


def _kwargs(family: str, **overrides) -> dict:
    kwargs = {"num_inference_steps": 4, "output_type": "latent"}
    if family in VIDEO_FAMILIES:
        kwargs.update(height=64, width=64, num_frames=5)
    return tiny_call_kwargs(family, **{**kwargs, **overrides})


def _out(pipe, family: str, **overrides) -> torch.Tensor:
    return torch.as_tensor(pipe(**_kwargs(family, **overrides))[0]).float()


def _count_offload_calls(transformer) -> list:
    """Make the transformer's accelerate offload hook count its pre_forward calls (the one installed now)."""
    hook, calls = transformer._hf_hook, []
    original = hook.pre_forward

    def counting(module, *args, **kwargs):
        calls.append(1)
        return original(module, *args, **kwargs)

    hook.pre_forward = counting
    return calls


@pytest.mark.parametrize("offload_first", [True, False])
def test_model_cpu_offload_before_or_after_apply(offload_first):
    pipe = AcceleratedStableDiffusion3Pipeline(**tiny_pipeline("sd3").components)
    pipe.set_progress_bar_config(disable=True)
    dense = _out(pipe, "sd3")
    if offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    handle = dit_accel.apply(pipe, dit_accel.RASConfig.keep_all())
    if not offload_first:
        pipe.enable_model_cpu_offload(device="cpu")
    calls = _count_offload_calls(pipe.transformer)
    torch.testing.assert_close(_out(pipe, "sd3"), dense)
    assert len(calls) == 4 and handle.report()["num_calls"] == 4
    handle.remove()
    # a per-call plan swaps hooks twice around accelerate's wrapper, which must survive both swaps
    pipe(**_kwargs("sd3"), acceleration=RAS_HALF)
    assert pipe.acceleration_report()["flops_ratio"] < 1
    calls = _count_offload_calls(pipe.transformer)  # the pipeline re-installs its offload hooks after each call
    torch.testing.assert_close(_out(pipe, "sd3"), dense)
    assert len(calls) == 4 and hasattr(pipe.transformer, "_hf_hook")
    assert not any(name.startswith("dit_accel") for m in pipe.transformer.modules() if hasattr(m, "_diffusers_hook")
                   for name in m._diffusers_hook.hooks)


@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_group_offloading_under_a_plan(family):
    pipe = tiny_pipeline(family)
    dense = _out(pipe, family)
    pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                          offload_type="block_level", num_blocks_per_group=1)
    before = model_state(pipe.transformer)
    with dit_accel.apply(pipe, dit_accel.RASConfig.keep_all()):
        torch.testing.assert_close(_out(pipe, family), dense)
    with dit_accel.apply(pipe, RAS_HALF, FirstBlockCacheConfig(threshold=0.5)) as handle:
        assert torch.isfinite(_out(pipe, family)).all()
        assert handle.report()["flops_ratio"] < 0.7
    assert model_state(pipe.transformer) == before
    torch.testing.assert_close(_out(pipe, family), dense)


def test_torch_compile_of_the_transformer_and_of_its_repeated_blocks():
    """apply() reaches the modules under `torch.compile`'s wrapper; compiled in place
    (`compile_repeated_blocks`), blocks still run the techniques' hooks (our hooks are graph breaks)."""
    pipe = tiny_pipeline("wan")
    dense = _out(pipe, "wan")
    pipe.transformer = torch.compile(pipe.transformer)
    with dit_accel.apply(pipe, dit_accel.RASConfig.keep_all()):
        torch.testing.assert_close(_out(pipe, "wan"), dense, rtol=1e-4, atol=1e-4)
    with dit_accel.apply(pipe, RAS_HALF, FirstBlockCacheConfig(threshold=0.5)) as handle:
        assert torch.isfinite(_out(pipe, "wan")).all()
        assert handle.report()["flops_ratio"] < 0.7
    repeated = tiny_pipeline("wan")
    repeated.transformer.compile_repeated_blocks()
    with dit_accel.apply(repeated, RAS_HALF) as handle:
        assert torch.isfinite(_out(repeated, "wan")).all()
        assert handle.report()["flops_ratio"] < 0.8


@pytest.fixture
def restore_attention_backend():
    active = _AttentionBackendRegistry.get_active_backend()[0]
    yield
    _AttentionBackendRegistry.set_active_backend(active)


@pytest.mark.parametrize("family", ["wan", "flux"])
def test_attention_backends(family, restore_attention_backend):
    """Stages 1-4 work under any diffusers backend; stages 5-6 run their dense part under a backend that
    ends in torch's SDPA, and a kernel refuses any other by name before running anything, while RAS runs
    there without its K/V source and says so."""
    pipe = tiny_pipeline(family)
    dense = _out(pipe, family)
    pipe.transformer.set_attention_backend("_native_math")
    with dit_accel.apply(pipe, dit_accel.RASConfig.keep_all()):
        torch.testing.assert_close(_out(pipe, family), dense, rtol=1e-4, atol=1e-4)
    pipe.transformer.set_attention_backend("flex")
    with pytest.raises(dit_accel.ConfigError, match="backend 'flex'"):
        dit_accel.apply(pipe, dit_accel.SVG2Config())
    for plan in ([FirstBlockCacheConfig(threshold=0.5)], [dit_accel.RASConfig(cache_kv=False, **{
            k: getattr(RAS_HALF, k) for k in ("sample_ratio", "warmup_steps", "error_reset_steps")})], [RAS_HALF]):
        with dit_accel.apply(pipe, *plan) as handle:
            assert torch.isfinite(_out(pipe, family)).all()
            report = handle.report()
            assert report["flops_ratio"] < 0.95
            assert bool(report["notes"]) == (plan == [RAS_HALF])


@pytest.mark.parametrize("family", ["sd3", "wan"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(family, dtype):
    pipe = tiny_pipeline(family).to(dtype=dtype)
    dense = _out(pipe, family)
    with dit_accel.apply(pipe, dit_accel.RASConfig.keep_all()):
        torch.testing.assert_close(_out(pipe, family), dense)
    with dit_accel.apply(pipe, RAS_HALF, FirstBlockCacheConfig(threshold=0.5)) as handle:
        out = _out(pipe, family)
        assert handle.report()["flops_ratio"] < 0.8
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("lora_first", [True, False])
def test_lora_loaded_before_or_after_apply(lora_first):
    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    reference = tiny_pipeline("flux")
    torch.manual_seed(0)
    reference.transformer.add_adapter(lora, adapter_name="style")
    with_lora = _out(reference, "flux")
    assert not torch.equal(with_lora, _out(tiny_pipeline("flux"), "flux"))

    pipe = tiny_pipeline("flux")
    if lora_first:
        torch.manual_seed(0)
        pipe.transformer.add_adapter(lora, adapter_name="style")
    handle = dit_accel.apply(pipe, dit_accel.RASConfig.keep_all())
    if not lora_first:
        torch.manual_seed(0)
        pipe.transformer.add_adapter(lora, adapter_name="style")
    torch.testing.assert_close(_out(pipe, "flux"), with_lora)
    handle.remove()
    torch.testing.assert_close(_out(pipe, "flux"), with_lora)


def test_width_and_token_density_under_offload_compile_half_precision_and_lora():
    """DyDiT's sliced weights follow the weights' device and dtype; FlexDiT and DyDiT run under
    torch.compile; a LoRA layer is refused by name, before or after apply."""
    keep_all = [dit_accel.FlexDiTConfig.keep_all(), dit_accel.DyDiTConfig.keep_all()]
    narrow = [dit_accel.FlexDiTConfig(pooled_kv_blocks=0, sparse_blocks=(0, 0)),
              dit_accel.DyDiTConfig(width_ratio=0.5, token_ratio=0.5)]
    pipe = AcceleratedStableDiffusion3Pipeline(**tiny_pipeline("sd3").components)
    pipe.set_progress_bar_config(disable=True)
    dense = _out(pipe, "sd3")
    pipe.enable_model_cpu_offload(device="cpu")
    with dit_accel.apply(pipe, *keep_all):
        torch.testing.assert_close(_out(pipe, "sd3"), dense, rtol=1e-4, atol=1e-4)
    grouped = tiny_pipeline("wan")
    dense = _out(grouped, "wan")
    grouped.transformer.enable_group_offload(onload_device=torch.device("cpu"), offload_device=torch.device("cpu"),
                                             offload_type="block_level", num_blocks_per_group=1)
    with dit_accel.apply(grouped, *keep_all):
        torch.testing.assert_close(_out(grouped, "wan"), dense, rtol=1e-4, atol=1e-4)
    compiled = tiny_pipeline("wan")
    compiled.transformer = torch.compile(compiled.transformer)
    with dit_accel.apply(compiled, *keep_all):
        torch.testing.assert_close(_out(compiled, "wan"), dense, rtol=1e-4, atol=1e-4)
    half = tiny_pipeline("sd3").to(dtype=torch.bfloat16)
    with dit_accel.apply(half, *narrow) as handle:
        assert torch.isfinite(_out(half, "sd3")).all() and handle.report()["flops_ratio"] < 0.8

    from peft import LoraConfig

    lora = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    later = tiny_pipeline("flux")
    with dit_accel.apply(later, dit_accel.DyDiTConfig()):
        later.transformer.add_adapter(lora, adapter_name="style")
        with pytest.raises(dit_accel.ConfigError, match="fuse it"):
            _out(later, "flux")
    with pytest.raises(dit_accel.ConfigError, match="fuse it"):
        dit_accel.apply(later, dit_accel.DyDiTConfig())


def test_measure_only_handle_counts_what_cache_dit_skipped():
    """cache-dit swaps the transformer's forward for its own; the runtime binds a call's arguments by
    the class's forward, so the measure-only ledger still reads every call and counts what DBCache left out."""
    cache_dit = pytest.importorskip("cache_dit", reason="cache-dit is the [bench] extra")
    pipe = tiny_pipeline("sd3")
    dense = _out(pipe, "sd3")
    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1, residual_diff_threshold=0.5))
    try:
        with dit_accel.measure(pipe) as handle:
            out = _out(pipe, "sd3")
            report = handle.report()
    finally:
        cache_dit.disable_cache(pipe)
    assert report["num_calls"] == 4 and report["flops_ratio"] < 1.0
    assert torch.isfinite(out).all() and not torch.equal(out, dense)
