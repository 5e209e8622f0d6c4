"""Region-adaptive sampling: dense equivalence through the real path, token reduction, caches,
schedules, batches, memory."""

from __future__ import annotations

import dataclasses
import gc
import math
import weakref

import pytest
import torch
from helpers import AttentionRecorderConfig, RecordingConfig, run

import dit_accel
from dit_accel.config import ConfigError
from dit_accel.techniques.ras import RAS
from dit_accel.models.base import CallInfo, TokenGrid
from dit_accel.runtime.context import StepContext
from dit_accel.runtime.call_state import CallState
from dit_accel.runtime.estimate import CallShapes
from dit_accel.runtime.storage import StoredTensor
from dit_accel.testing import FAMILIES, tiny_pipeline

STEPS = 4
RAS_HALF = dict(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())


def _ras(handle) -> RAS:
    return next(t for t in handle.sessions[0].techniques if isinstance(t, RAS))


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_runs_the_whole_machinery_and_equals_dense(family):
    """keep_all selects every token at every step after the first: selection, gather/scatter, K/V
    cache and output merge all run, and the output is the dense one."""
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    recorder = AttentionRecorderConfig()
    with dit_accel.apply(pipe, dit_accel.RASConfig.keep_all(), recorder) as handle:
        out = run(pipe, family)
        report = handle.report()
        computed = dict(_ras(handle).computed)
    torch.testing.assert_close(out, baseline, rtol=1e-5, atol=1e-5)
    assert sorted(computed) == [1, 2, 3] and all(mask.all() for mask in computed.values())
    assert report["state_bytes"]["RASConfig"] > 0  # the K/V cache and previous outputs were held
    assert report["work"]["overhead"] > 0  # the focus scores were computed
    assert report["flops_ratio"] == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_half_ratio_computes_half_the_tokens(family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family, num_inference_steps=STEPS)
    recorder = AttentionRecorderConfig()
    with dit_accel.apply(pipe, recorder, dit_accel.RASConfig(**RAS_HALF)) as handle:
        out = run(pipe, family, num_inference_steps=STEPS)
        report = handle.report()
    assert torch.isfinite(out).all()
    assert (out - baseline).abs().mean() < 0.25 * baseline.abs().mean() + 0.05
    total = report["steps"][0]["calls"][0]["total_image_tokens"]
    kept = math.ceil(total / 2)
    for seen in recorder.seen:
        ras_step = seen["step"] >= 1
        assert seen["image_queries"] == (kept if ras_step else total)
        # keys/values of skipped tokens still take part, from the cache
        assert seen["keys"] - (seen["queries"] - seen["image_queries"]) == total
    for step in report["steps"]:
        expected = kept if step["step"] >= 1 else total
        assert all(call["image_tokens"] == expected for call in step["calls"])
        # text tokens are always computed: the tiny CogVideoX pads 226 of them next to 192 image tokens
        assert step["flops_ratio"] < 0.8 if step["step"] >= 1 else step["flops_ratio"] == 1.0
    assert 0.3 < report["flops_ratio"] < 0.9


@pytest.mark.parametrize("kv_cache", ["device", "host"])
def test_skipped_tokens_reuse_previous_output_and_kv_cache_is_refreshed(kv_cache):
    pipe = tiny_pipeline("sd3")
    outputs = []
    pipe.transformer.register_forward_hook(lambda m, a, o: outputs.append(o[0].clone()))
    kv_snapshots = []
    config = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=2, error_reset_steps=(), kv_cache=kv_cache)
    with dit_accel.apply(pipe, config) as handle:
        ras = _ras(handle)
        original_end = ras.end_call

        def end_and_snapshot(call_state, output):
            result = original_end(call_state, output)
            kv_snapshots.append({k: tuple(entry.load().clone() for entry in v) for k, v in ras.state.kv.items()})
            return result

        ras.end_call = end_and_snapshot
        run(pipe, "sd3", num_inference_steps=STEPS)
        computed = dict(ras.computed)
    adapter = handle.sessions[0].adapter
    patch = pipe.transformer.config.patch_size
    grid = TokenGrid(1, outputs[0].shape[-2] // patch, outputs[0].shape[-1] // patch)
    assert sorted(computed) == [2, 3]
    for step in (2, 3):
        mask = computed[step]  # (samples, N)
        now = adapter.output_to_tokens(outputs[step], grid)
        before = adapter.output_to_tokens(outputs[step - 1], grid)
        both = torch.cat([mask, mask])  # batched CFG: both halves share the selection
        assert torch.equal(now[~both], before[~both])
        assert not torch.equal(now[both], before[both])
        for key, cached in kv_snapshots[step].items():
            for now_kv, before_kv in zip(cached, kv_snapshots[step - 1][key]):
                # (B, H, S, D), SD3's image tokens first
                now_kv, before_kv = now_kv[:, :, : grid.num_tokens], before_kv[:, :, : grid.num_tokens]
                skipped = ~both[:, None, :, None].expand_as(now_kv)
                assert torch.equal(now_kv[skipped], before_kv[skipped])
                assert not torch.equal(now_kv[~skipped], before_kv[~skipped])


def test_batch_two_with_cfg_selects_per_sample():
    pipe = tiny_pipeline("sd3")
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF)) as handle:
        out = run(pipe, "sd3", prompt=["a red circle", "a blue square"], num_inference_steps=STEPS)
        computed = _ras(handle).computed
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert computed[1].shape[0] == 2
    assert not torch.equal(computed[1][0], computed[1][1])
    assert (computed[1].sum(-1) == computed[1].shape[-1] // 2).all()


@pytest.mark.parametrize("family", ["sd3", "pixart"])
def test_two_prompts_one_seed_without_guidance_are_not_taken_for_cfg(family):
    """Equal latents in both halves of a batch are batched CFG only if the pipeline says so (SD3) or
    the halves stay equal (PixArt has no such property): RAS must not silently run dense."""
    pipe = tiny_pipeline(family)
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)]
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF)) as handle:
        run(pipe, family, prompt=["a red circle", "a blue square"], guidance_scale=1.0, generator=generators,
            num_inference_steps=STEPS)
        report = handle.report()
        computed = _ras(handle).computed
    assert report["flops_ratio"] < 0.8
    assert sorted(computed)[-2:] == [STEPS - 2, STEPS - 1] and computed[STEPS - 1].shape[0] == 2
    branches = [call["branch"] for step in report["steps"][1:] for call in step["calls"]]
    assert set(branches) == {"single"}


def test_shared_selection_when_rotary_tables_are_shared():
    pipe = tiny_pipeline("flux")
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF)) as handle:
        out = run(pipe, "flux", prompt=["a red circle", "a blue square"], num_inference_steps=STEPS)
        computed = _ras(handle).computed
    assert torch.isfinite(out).all() and torch.equal(computed[1][0], computed[1][1])


def test_non_square_image():
    pipe = tiny_pipeline("sd3")
    baseline = run(pipe, "sd3", height=64, width=96)
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF)) as handle:
        out = run(pipe, "sd3", height=64, width=96)
        report = handle.report()
    assert out.shape == baseline.shape and torch.isfinite(out).all()
    total = report["steps"][1]["calls"][0]["total_image_tokens"]
    assert report["steps"][1]["calls"][0]["image_tokens"] == total // 2


def test_dense_schedule_warmup_and_resets():
    pipe = tiny_pipeline("sd3")
    config = dit_accel.RASConfig(sample_ratio=0.25, warmup_steps=2, error_reset_steps=(4,))
    with dit_accel.apply(pipe, config) as handle:
        run(pipe, "sd3", num_inference_steps=6)
        report = handle.report()
    total = report["steps"][0]["calls"][0]["total_image_tokens"]
    tokens = [s["calls"][0]["image_tokens"] for s in report["steps"]]
    assert tokens == [total, total, total // 4, total // 4, total, total // 4]


def test_dynamic_ratio_moves_linearly():
    config = dit_accel.RASConfig(sample_ratio=0.25, final_sample_ratio=0.75, warmup_steps=2)
    assert config.ratio_at(2, 12) == pytest.approx(0.25)
    assert config.ratio_at(11, 12) == pytest.approx(0.75)
    assert config.ratio_at(6, 12) == pytest.approx(0.25 + 0.5 * 4 / 9)


def test_for_steps_scales_the_paper_schedule():
    config = dit_accel.RASConfig.for_steps(30)
    assert (config.warmup_steps, config.error_reset_steps) == (4, (12, 22))


def _plan(step: int, samples: int, tokens: int) -> CallState:
    call = CallInfo(TokenGrid(1, 1, tokens), samples, 0, torch.tensor([1.0]), torch.zeros(samples, tokens))
    return CallState(StepContext(0, step, 10, 1.0, None, "single", 0, False, call))


def test_starvation_makes_long_skipped_tokens_more_likely_to_be_recomputed():
    pipe = tiny_pipeline("sd3")
    config = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=0, error_reset_steps=(), starvation_scale=1.0)
    with dit_accel.apply(pipe, config) as handle:
        ras = _ras(handle)
        # four tokens whose outputs [-a, a] have focus scores proportional to a = 1, 1, 2, 3
        outputs = torch.tensor([[[-1.0, 1.0], [-1.0, 1.0], [-2.0, 2.0], [-3.0, 3.0]]])
        ras.state.outputs, ras.state.output_steps = {"call0": outputs}, {"call0": 0}
        assert ras._select(_plan(1, 1, 4)).index.tolist() == [[2, 3]]
        assert ras.state.skipped.tolist() == [[1.0, 1.0, 0.0, 0.0]]
        # token 0 now skipped three steps in a row: e^3 * 1 beats 2 and it is recomputed
        ras.state.skipped = torch.tensor([[3.0, 0.0, 0.0, 0.0]])
        assert ras._select(_plan(2, 1, 4)).index.tolist() == [[0, 3]]
        assert ras.state.skipped.tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_any_scheduler_even_two_calls_per_step():
    """Heun evaluates the model twice per step at different sigmas: each evaluation is a step of the
    schedule, and RAS's warm-up and resets count them."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    pipe = tiny_pipeline("sd3")
    pipe.scheduler = FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)
    baseline = run(pipe, "sd3")
    with dit_accel.apply(pipe, dit_accel.RASConfig.keep_all()):
        torch.testing.assert_close(run(pipe, "sd3"), baseline, rtol=1e-5, atol=1e-5)
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF)) as handle:
        out = run(pipe, "sd3")
        report = handle.report()
    assert torch.isfinite(out).all()
    evaluations = len(pipe.scheduler.timesteps)
    assert report["num_steps"] == evaluations == report["num_calls"] == 2 * STEPS - 1
    assert {c["num_steps"] for s in report["steps"] for c in s["calls"]} == {evaluations}
    assert report["flops_ratio"] < 0.9


def test_state_is_freed_when_the_call_ends_and_on_remove():
    """RAS's K/V cache and previous outputs, the token set's buffers and the tracker's latents do not
    outlive the pipeline call."""
    from diffusers.hooks import FirstBlockCacheConfig

    pipe = tiny_pipeline("sd3")
    held = []
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF), FirstBlockCacheConfig(threshold=0.5)) as handle:
        ras = _ras(handle)
        original_end = ras.end_call

        def end_and_watch(call_state, output):
            result = original_end(call_state, output)
            # the entries, and in "device" form the tensors they hold (the dense call's own K/V)
            held.extend(weakref.ref(t) for kv in ras.state.kv.values() for entry in kv for t in (entry, entry.load()))
            held.extend(weakref.ref(t) for t in ras.state.outputs.values())
            held.extend(weakref.ref(t) for t in handle.sessions[0].token_set._stale.values())
            return result

        ras.end_call = end_and_watch
        run(pipe, "sd3", num_inference_steps=STEPS)
        gc.collect()
        assert held and all(ref() is None for ref in held)
        assert handle.tracker._last_latents is None
        assert handle.report()["state_bytes"]["RASConfig"] > 0  # what it held at its peak is reported


# -- the K/V cache in cheaper forms ------------------------------------------------------------------

#: "fp8" K/V cache against "device" on the tiny models (6 steps, 5 of them RAS steps at ratio 0.5): measured
#: at most 4e-4 mean abs of the latents relative to their mean abs (Wan), and at most 1% of how far RAS
#: itself moves the latents from dense
FP8_RELATIVE, FP8_OF_RAS = 1e-3, 0.05


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_cache_forms_against_device(family):
    """"host" is exact; "fp8" moves the output far less than RAS itself does."""
    pipe = tiny_pipeline(family)
    call = dict(num_inference_steps=6, output_type="latent")
    dense = run(pipe, family, **call)
    latents = {}
    for form in ("device", "host", "fp8"):
        with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF, kv_cache=form)):
            latents[form] = run(pipe, family, **call)
    device = latents["device"]
    torch.testing.assert_close(latents["host"], device, rtol=1e-6, atol=1e-6)
    fp8_change = (latents["fp8"] - device).abs().mean()
    assert 0 < fp8_change < FP8_RELATIVE * device.abs().mean()
    assert fp8_change < FP8_OF_RAS * (device - dense).abs().mean()


@pytest.mark.parametrize("kv_cache", ["fp8", "host"])
@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_keep_all_with_a_cheaper_kv_cache_loads_it_and_equals_dense(family, kv_cache, monkeypatch):
    """At keep_all every cached row is overwritten by a fresh one before attention reads it, so even the
    fp8 form gives the dense output, through loads and saves of its own form."""
    loads = []
    load = StoredTensor.load
    monkeypatch.setattr(StoredTensor, "load", lambda self: loads.append(self.storage) or load(self))
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    with dit_accel.apply(pipe, dataclasses.replace(dit_accel.RASConfig.keep_all(), kv_cache=kv_cache)):
        out = run(pipe, family)
    torch.testing.assert_close(out, baseline, rtol=1e-5, atol=1e-5)
    assert loads and set(loads) == {kv_cache}


def _held_bytes(pipe, family: str, kv_cache: str) -> tuple[int, int]:
    """(peak state_bytes of RAS, bytes of one call's output: the previous outputs RAS holds under batched CFG)."""
    outputs = []
    hook = pipe.transformer.register_forward_hook(lambda m, a, o: outputs.append(o[0].numel() * o[0].element_size()))
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF, kv_cache=kv_cache)) as handle:
        run(pipe, family, num_inference_steps=STEPS)
        held = handle.report()["state_bytes"]["RASConfig"]
    hook.remove()
    return held, outputs[0]


@pytest.mark.parametrize("dtype, fp8_share", [(torch.float32, 0.25), (torch.bfloat16, 0.5)])
def test_fp8_kv_cache_holds_one_byte_an_element(dtype, fp8_share):
    pipe = tiny_pipeline("sd3").to(dtype)
    device, outputs = _held_bytes(pipe, "sd3", "device")
    fp8, _ = _held_bytes(pipe, "sd3", "fp8")
    host, _ = _held_bytes(pipe, "sd3", "host")
    assert host == device  # counted wherever it sits
    assert (fp8 - outputs) / (device - outputs) == pytest.approx(fp8_share, rel=0.02)


def test_bad_kv_cache_form_names_the_field_and_the_forms():
    with pytest.raises(ConfigError, match=r"RASConfig.kv_cache must be one of 'device', 'fp8', 'host', got 'gpu'"):
        dit_accel.RASConfig(kv_cache="gpu")


def test_smaller_forms_offer_the_cheaper_kv_caches():
    pipe = tiny_pipeline("sd3")
    offered = {}
    for config in (dit_accel.RASConfig(), dit_accel.RASConfig(kv_cache="fp8"), dit_accel.RASConfig(kv_cache="host"),
                   dit_accel.RASConfig(cache_kv=False)):
        with dit_accel.apply(pipe, config) as handle:
            offered[(config.kv_cache, config.cache_kv)] = [text.split(":")[0] for text in _ras(handle).smaller_forms()]
    assert offered == {("device", True): ["RASConfig(kv_cache='fp8')", "RASConfig(kv_cache='host')"],
                       ("fp8", True): ["RASConfig(kv_cache='host')"], ("host", True): [], ("device", False): []}


def _call_shapes(pipe, ctx: StepContext, samples: int) -> CallShapes:
    config = pipe.transformer.config
    patch = config.patch_size if isinstance(config.patch_size, (tuple, list)) else (config.patch_size,) * 2
    return CallShapes(samples=samples, grid=ctx.call.grid, text_tokens=ctx.call.text_tokens,
                      itemsize=pipe.transformer.dtype.itemsize,
                      hidden=config.num_attention_heads * config.attention_head_dim,
                      output_channels=math.prod(patch) * config.out_channels)


@pytest.mark.parametrize("kv_cache", ["device", "fp8", "host", None])
@pytest.mark.parametrize("family", ["sd3", "wan"])
def test_estimate_bytes_meets_what_a_run_holds(family, kv_cache):
    """The estimate from the adapter and the call's shapes alone is what the run held at its peak (None:
    `cache_kv=False`, previous outputs only)."""
    pipe = tiny_pipeline(family)
    config = dit_accel.RASConfig(**RAS_HALF, cache_kv=False) if kv_cache is None else \
        dit_accel.RASConfig(**RAS_HALF, kv_cache=kv_cache)
    recorder = RecordingConfig()
    with dit_accel.apply(pipe, config, recorder) as handle:
        run(pipe, family, num_inference_steps=STEPS)
        held = handle.report()["state_bytes"]["RASConfig"]
        estimate = _ras(handle).estimate_bytes(_call_shapes(pipe, recorder.seen[0], samples=1 * 2))  # one prompt, CFG
    kinds = {None: {"outputs"}, "device": {"outputs", "kv_cache"}, "fp8": {"outputs", "kv_cache"},
             "host": {"outputs", "kv_cache@host"}}[kv_cache]
    assert set(estimate) == kinds
    assert sum(estimate.values()) == pytest.approx(held, rel=0.1)
