"""DyDiT through the runtime: keep-all equals dense through the sliced path on every family, sliced
execution equals masked execution of the same heads and groups, the weights used shrink, token
skipping (its sketch decision against the full-input one, its cache forms), what it holds against its
estimate, calibration files, and composition."""

from __future__ import annotations

import pytest
import torch
from helpers import model_state, run

import dit_accel
from dit_accel.metrics.quality import psnr
from dit_accel.models import adapter_for
from dit_accel.models.base import TokenGrid
from dit_accel.plan_spec import parse_plan
from dit_accel.runtime.estimate import CallShapes
from dit_accel.techniques.dydit import load_calibration, select_units
from dit_accel.techniques.dydit.tokens import MLPTokens, SkipTokens
from dit_accel.testing import FAMILIES, tiny_call_kwargs, tiny_pipeline
from dit_accel.tokens import scatter_tokens

NARROW = dit_accel.DyDiTConfig(width_ratio=0.5, max_width_ratio=0.5, buckets=1)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def _calls(report: dict) -> list[dict]:
    return [call for step in report["steps"] for call in step["calls"]]


def _technique(handle):
    (session,) = handle.sessions
    return session.techniques[0]


def _token_hooks(module: torch.nn.Module) -> list:
    return [hook for m in module.modules() for hook in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}).values()
            if isinstance(hook, SkipTokens)]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_runs_the_sliced_path_and_equals_dense(family):
    """The slicing hooks run and cut nothing: no copies; at token_ratio 1 no token hook, no cache."""
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    before, weights = model_state(pipe.transformer), _weights(pipe.transformer)
    with dit_accel.apply(pipe, dit_accel.DyDiTConfig.keep_all()) as handle:
        assert not _token_hooks(pipe.transformer)
        torch.testing.assert_close(run(pipe, family), baseline, rtol=1e-5, atol=1e-5)
        report = handle.report()
    stats = _calls(report)[-1]
    assert stats["dydit_heads"] == stats["dydit_groups"] == 1.0
    assert "dydit_mlp_tokens" not in stats
    assert report["state_bytes"]["DyDiTConfig"] == 0
    assert report["flops_ratio"] == pytest.approx(1.0)
    assert model_state(pipe.transformer) == before
    assert all(torch.equal(weights[k], v) for k, v in pipe.transformer.state_dict().items())


def _mask_hooks(transformer, selection: dict[str, torch.Tensor]) -> list:
    """Dense execution with the dropped heads' outputs and MLP channels zeroed before they are read."""
    adapter = adapter_for(transformer)
    handles = []

    def zero(offset: int, mask: torch.Tensor):
        def hook(module, args):
            x = args[0].clone()
            x[..., offset:offset + mask.numel()] *= mask.to(x.dtype)
            return (x,)
        return hook

    for i, block in enumerate(adapter.blocks()):
        layout = adapter.width_layout(block)
        for a, heads in enumerate(layout.attentions):
            mask = torch.zeros(heads.heads, heads.head_dim)
            mask[selection[f"block{i}.attention{a}"]] = 1
            for linear, offset in heads.columns:
                handles.append(linear.register_forward_pre_hook(zero(offset, mask.flatten())))
        if layout.mlp is not None:
            groups = torch.arange(layout.mlp.hidden).tensor_split(layout.attentions[0].heads)
            mask = torch.zeros(layout.mlp.hidden)
            for g in selection[f"block{i}.mlp"]:
                mask[groups[int(g)]] = 1
            for linear, offset in layout.mlp.columns:
                handles.append(linear.register_forward_pre_hook(zero(offset, mask)))
    return handles


@pytest.mark.parametrize("family, overrides", [*((f, {}) for f in FAMILIES), ("pixart", {"activation_fn": "geglu"}),
                                               ("sd3", {"dual_attention_layers": (0,), "qk_norm": "rms_norm"})])
def test_sliced_equals_masked_and_the_weights_used_shrink(family, overrides):
    """Also a gated MLP (GEGLU: both halves sliced) and SD3.5's second self-attention."""
    pipe = tiny_pipeline(family, **overrides)
    adapter = adapter_for(pipe.transformer)
    block = adapter.blocks()[0]
    layout = adapter.width_layout(block)
    heads = layout.attentions[0]
    shapes = {}
    watch = [heads.rows[-1], layout.mlp.rows[0], heads.columns[0][0]]

    def record(i):
        def hook(module, args, output):
            shapes.setdefault(i, (args[0].shape[-1], output.shape[-1]))
        return hook

    hooks = [m.register_forward_hook(record(i)) for i, m in enumerate(watch)]
    with dit_accel.apply(pipe, NARROW) as handle:
        sliced = run(pipe, family)
        selection = _technique(handle).selection(0)
        assert handle.report()["flops_ratio"] < 0.8
    for hook in hooks:
        hook.remove()
    kept_heads = len(selection["block0.attention0"])
    assert kept_heads == heads.heads // 2
    assert shapes[0][1] == kept_heads * heads.head_dim  # v (or q/k) rows of the kept heads only
    assert shapes[1][1] < layout.mlp.rows[0].out_features  # the MLP's hidden channels shrank
    assert shapes[2][0] < heads.columns[0][0].in_features  # the output projection reads fewer inputs
    masks = _mask_hooks(pipe.transformer, selection)
    try:
        masked = run(pipe, family)
    finally:
        for hook in masks:
            hook.remove()
    torch.testing.assert_close(sliced, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_token_skipping_reuses_cached_mlp_outputs(family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    config = dit_accel.DyDiTConfig(width_ratio=1.0, token_ratio=0.5)
    with dit_accel.apply(pipe, config) as handle:
        out = run(pipe, family)
        report = handle.report()
    assert torch.isfinite(out).all() and not torch.allclose(out, baseline)
    calls = _calls(report)
    assert calls[0]["dydit_mlp_tokens"] == 1.0  # the first call computes every token
    assert calls[-1]["dydit_mlp_tokens"] == pytest.approx(0.5, abs=0.05)
    assert report["flops_ratio"] < 1.0
    assert report["state_bytes"]["DyDiTConfig"] > 0


def test_width_one_buckets_hold_no_slice_copies():
    """A bucket that keeps every head and group runs each linear on its own weight: nothing is held
    then, while the narrower bucket holds exactly the copies `estimate_bytes` names."""
    pipe = tiny_pipeline("sd3")
    config = dit_accel.DyDiTConfig(width_ratio=0.5, max_width_ratio=1.0, buckets=2)
    layout = adapter_for(pipe.transformer).width_layout(pipe.transformer.transformer_blocks[0])
    linears = [*layout.attentions[0].rows, *layout.mlp.rows, layout.attentions[0].columns[0][0]]
    seen = []
    with dit_accel.apply(pipe, config) as handle:
        technique = _technique(handle)
        probe = pipe.transformer.register_forward_hook(lambda *_: seen.append(
            (technique.state_bytes(), [technique.sliced(linear)[0] is linear.weight for linear in linears])))
        try:
            run(pipe, "sd3", num_inference_steps=4)
        finally:
            probe.remove()
        shapes = CallShapes(samples=2, grid=TokenGrid(1, 16, 16), text_tokens=109, itemsize=4, hidden=64,
                            output_channels=64)
        estimate = technique.estimate_bytes(shapes)
    narrow, full = seen[:2], seen[2:]  # 4 steps, 2 buckets; one batched CFG call a step
    assert all(held == estimate["slice_copies"] > 0 and not any(own) for held, own in narrow)
    assert all(held == 0 and all(own) for held, own in full)
    assert "token_cache" not in estimate


@pytest.mark.parametrize("family, token_cache", [("sd3", "device"), ("sd3", "fp8"), ("wan", "host"), ("wan", "fp8")])
def test_estimate_is_within_ten_percent_of_the_state_held(family, token_cache):
    """SD3 batches CFG in one call, Wan runs it as two calls: `samples` counts both branches either way."""
    pipe = tiny_pipeline(family)
    config = dit_accel.DyDiTConfig.preset("fast", token_cache=token_cache)
    call = tiny_call_kwargs(family)
    transformer = pipe.transformer.config
    patch = (1, transformer.patch_size, transformer.patch_size) if family == "sd3" else transformer.patch_size
    frames = (call["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1 if family == "wan" else 1
    spatial = pipe.vae_scale_factor if family == "sd3" else pipe.vae_scale_factor_spatial
    grid = TokenGrid(frames // patch[0], call["height"] // spatial // patch[1], call["width"] // spatial // patch[2])
    shapes = CallShapes(samples=1 * 2, grid=grid, text_tokens=call["max_sequence_length"], itemsize=4,
                        hidden=transformer.num_attention_heads * transformer.attention_head_dim,
                        output_channels=transformer.out_channels * patch[1] * patch[2])
    with dit_accel.apply(pipe, config) as handle:
        estimate = _technique(handle).estimate_bytes(shapes)
        run(pipe, family)
        held = handle.report()["state_bytes"]["DyDiTConfig"]
    assert estimate["slice_copies"] > 0 and estimate["token_cache"] > 0
    assert ("token_cache@host" in estimate) == (token_cache == "host")
    assert sum(estimate.values()) == pytest.approx(held, rel=0.1)


def test_estimate_on_the_meta_device_equals_the_estimate_with_weights():
    """Without weights (a model on the meta device) every unit ranks alike: the same counts, the same bytes."""
    pipe = tiny_pipeline("wan")
    with torch.device("meta"):
        meta = type(pipe.transformer).from_config(pipe.transformer.config)
    sizes = {"height": 128, "width": 128, "num_frames": 9}
    for config in (dit_accel.DyDiTConfig.preset("fast"), NARROW):
        estimate = dit_accel.estimate(pipe.transformer, config, **sizes)["by_technique"]
        assert estimate["DyDiTConfig"]["slice_copies"] > 0
        assert dit_accel.estimate(meta, config, **sizes)["by_technique"] == estimate


def _sketch_as_input(self, hidden):
    """The old full-input decision: the "sketch" is the MLP input itself."""
    return hidden.float()


def _full_input_decisions_beside(monkeypatch) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Beside every token-skipping decision a run makes: the full-input decision on the same state (the
    old cache: each token's MLP input as of its last computation). Per decision, for each sample: the
    share of the tokens run that the full input also picks, and the share of the largest possible
    summed input change that they cover."""
    from dit_accel.techniques.dydit import tokens

    inputs, decisions, chosen = {}, [], []
    gather, run_mlp = tokens.gather_tokens, MLPTokens.run

    def recording(tensor, index, *args):
        chosen.append(index)
        return gather(tensor, index, *args)

    def run_beside(self, call_state, block, unit, forward, hidden):
        chosen.clear()
        output = run_mlp(self, call_state, block, unit, forward, hidden)
        key = (call_state.ctx.slot, block)
        if not chosen:  # every token ran
            inputs[key] = hidden.clone()
            return output
        index = chosen[0]
        change = (hidden - inputs[key]).float().pow(2).sum(-1)
        best = change.topk(index.shape[-1], dim=1).indices
        picked = torch.zeros_like(change, dtype=torch.bool).scatter_(1, best, True)
        decisions.append((picked.gather(1, index).float().mean(1),
                          change.gather(1, index).sum(1) / change.gather(1, best).sum(1)))
        inputs[key] = scatter_tokens(inputs[key], index, gather(hidden, index))
        return output

    monkeypatch.setattr(tokens, "gather_tokens", recording)
    monkeypatch.setattr(MLPTokens, "run", run_beside)
    return decisions


def test_sketch_decision_stays_close_to_the_full_input_decision(monkeypatch):
    """A 256-wide MLP input sketched to 64 columns: on the same state, the tokens run mostly are those
    the full input's change picks and cover nearly all of the change those would; the output stays
    close to the full-input decision's run and no further from dense."""
    pipe = tiny_pipeline("sd3", attention_head_dim=64)
    steps = {"num_inference_steps": 8}
    config = dit_accel.DyDiTConfig(width_ratio=1.0, token_ratio=0.5)
    dense = run(pipe, "sd3", **steps)
    with monkeypatch.context() as patch:
        decisions = _full_input_decisions_beside(patch)
        with dit_accel.apply(pipe, config):
            sketched = run(pipe, "sd3", **steps)
    with monkeypatch.context() as patch:
        patch.setattr(MLPTokens, "_sketch", _sketch_as_input)
        with dit_accel.apply(pipe, config):
            full_input = run(pipe, "sd3", **steps)
    agreement, covered = (torch.cat(values) for values in zip(*decisions))
    assert len(decisions) == 2 * 7  # 2 blocks, 7 skipping steps
    assert agreement.mean() > 0.85 and covered.mean() > 0.97 and covered.min() > 0.9
    assert psnr(sketched, full_input) > 50.0
    assert psnr(sketched, dense) > psnr(full_input, dense) - 1.0


def test_fp8_and_host_token_caches_match_the_device_cache():
    """"host" holds the same values elsewhere (exact); "fp8" rounds the cached outputs, a byte a value and
    a 4-byte scale per token instead of fp32's 4 bytes a value (the fp32 sketches stay as they are)."""
    pipe = tiny_pipeline("sd3")
    outputs, held = {}, {}
    for form in ("device", "fp8", "host"):
        with dit_accel.apply(pipe, dit_accel.DyDiTConfig(width_ratio=1.0, token_ratio=0.5, token_cache=form)) as handle:
            outputs[form] = run(pipe, "sd3")
            held[form] = handle.report()["state_bytes"]["DyDiTConfig"]
    assert torch.equal(outputs["host"], outputs["device"])
    assert held["host"] == held["device"]
    assert psnr(outputs["fp8"], outputs["device"]) > 50.0
    cached_tokens, width = 2 * 2 * 256, 64  # (2 blocks) x (2 CFG samples) x 256 tokens, 64 wide
    assert held["fp8"] == held["device"] - cached_tokens * (3 * width - 4)
    with pytest.raises(dit_accel.ConfigError, match=r"DyDiTConfig\.token_cache must be one of 'device', 'fp8', 'host'"):
        dit_accel.DyDiTConfig(token_cache="disk")


def test_batch_two_with_cfg_equals_each_prompt_alone():
    """Widths depend only on the step, token choices are per sample: batching changes nothing."""
    pipe = tiny_pipeline("sd3")
    prompts = ["a red circle", "a blue square"]
    seeds = lambda *s: [torch.Generator().manual_seed(i) for i in s]  # noqa: E731
    config = dit_accel.DyDiTConfig(width_ratio=0.5, token_ratio=0.5)
    with dit_accel.apply(pipe, config):
        out = run(pipe, "sd3", prompt=prompts, generator=seeds(0, 1))
        alone = torch.cat([run(pipe, "sd3", prompt=p, generator=seeds(i)) for i, p in enumerate(prompts)])
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-4)


def test_widths_narrow_at_the_noisy_steps():
    pipe = tiny_pipeline("flux")
    config = dit_accel.DyDiTConfig(width_ratio=0.25, max_width_ratio=1.0, buckets=4)
    with dit_accel.apply(pipe, config) as handle:
        run(pipe, "flux", num_inference_steps=4)
        heads = [call["dydit_heads"] for call in _calls(handle.report())]
    assert heads == sorted(heads) and heads[0] == 0.25 and heads[-1] == 1.0


def test_calibration_round_trips_and_refuses_another_model(tmp_path):
    pipe = tiny_pipeline("sd3")
    path = tmp_path / "sd3.safetensors"
    config = dit_accel.calibrate(pipe, dit_accel.DyDiTConfig(width_ratio=0.5, buckets=2), path=str(path),
                                 **{**_call("sd3"), "prompt": ["a red circle", "a blue square"]})
    assert config.calibration == str(path)
    grams = load_calibration(path, pipe.transformer)
    heads = pipe.transformer.transformer_blocks[0].attn.heads
    gram = grams["block0.attention0"]
    assert gram.shape == (2, heads, heads) and (gram.diagonal(dim1=1, dim2=2) > 0).all()
    torch.testing.assert_close(gram, gram.transpose(1, 2))
    assert grams["block0.mlp"].shape == (2, heads, heads)
    with dit_accel.apply(pipe, config) as handle:
        assert torch.isfinite(run(pipe, "sd3")).all()
        selection = _technique(handle).selection(0)["block0.attention0"]
    assert torch.equal(selection, select_units(gram[0], len(selection)))
    for other, reason in ((tiny_pipeline("sd3", seed=1), "other weights"), (tiny_pipeline("flux"), "model class")):
        with pytest.raises(dit_accel.ConfigError, match=reason):
            dit_accel.apply(other, config)
    with pytest.raises(dit_accel.ConfigError, match="no such file"):
        dit_accel.DyDiTConfig(calibration=str(tmp_path / "missing.safetensors"))
    with pytest.raises(dit_accel.ConfigError, match="path="):
        dit_accel.calibrate(pipe, dit_accel.DyDiTConfig(), **_call("sd3"))


def _call(family: str) -> dict:
    from dit_accel.testing import tiny_call_kwargs

    return tiny_call_kwargs(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_composes_with_ras_sparse_attention_and_a_step_cache(family):
    pipe = tiny_pipeline(family)
    before = model_state(pipe.transformer)
    ras = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())
    proxy = dit_accel.ProxyAttentionConfig(local_window=(1, 2, 2), dense_warmup=0.0)
    for others in ([ras], [proxy], parse_plan("fbcache:threshold=0.5"), [ras, proxy]):
        with dit_accel.apply(pipe, NARROW, *others) as handle:
            assert torch.isfinite(run(pipe, family)).all()
            assert handle.report()["flops_ratio"] < 0.8
    assert model_state(pipe.transformer) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_stacks_with_flexdit_pooled_blocks(family):
    """Stage 3 pools what the blocks see, stage 4 narrows them: both keep-alls together are dense,
    and the sparse settings save more together than either alone."""
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    with dit_accel.apply(pipe, dit_accel.FlexDiTConfig.keep_all(), dit_accel.DyDiTConfig.keep_all()):
        torch.testing.assert_close(run(pipe, family), baseline, rtol=1e-4, atol=1e-4)
    flex = dit_accel.FlexDiTConfig(pooled_kv_blocks=0, sparse_blocks=(0, 0))
    dydit = dit_accel.DyDiTConfig(width_ratio=0.5, token_ratio=0.5)
    ratios = {}
    for label, plan in (("flex", [flex]), ("dydit", [dydit]), ("both", [flex, dydit])):
        with dit_accel.apply(pipe, *plan) as handle:
            assert torch.isfinite(run(pipe, family)).all()
            ratios[label] = handle.report()["flops_ratio"]
    assert ratios["both"] < min(ratios["flex"], ratios["dydit"])


def test_selection_drops_the_units_whose_summed_contribution_is_smallest(monkeypatch):
    """Two heads that cancel each other are dropped together before a small lone one; past the
    exhaustive limit a greedy drop still keeps the strongest units."""
    contributions = torch.tensor([[1.0, 0.0], [-1.0, 0.1], [0.0, 0.5], [3.0, 3.0]])  # per unit, one token
    gram = contributions @ contributions.T
    assert select_units(gram, 2).tolist() == [2, 3]  # units 0 and 1 sum to (0, 0.1)
    assert select_units(gram, 4).tolist() == [0, 1, 2, 3]
    assert select_units(torch.diag(torch.tensor([1.0, 0.2, 3.0])), 1).tolist() == [2]
    monkeypatch.setattr("dit_accel.techniques.dydit.calibration._EXHAUSTIVE", 1)
    assert select_units(torch.diag(torch.tensor([1.0, 0.2, 3.0, 0.5])), 2).tolist() == [0, 2]
