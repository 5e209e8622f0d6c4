"""DyDiT through the runtime: keep-all equals dense through the sliced path on every family, sliced
execution equals masked execution of the same heads and groups, the weights used shrink, token
skipping, calibration files, and composition."""

from __future__ import annotations

import pytest
import torch
from helpers import model_state, run

import dit_accel
from dit_accel.techniques.dydit import load_calibration, select_units
from dit_accel.models import adapter_for
from dit_accel.plan_spec import parse_plan
from dit_accel.testing import FAMILIES, tiny_pipeline

NARROW = dit_accel.DyDiTConfig(width_ratio=0.5, max_width_ratio=0.5, buckets=1)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


def _calls(report: dict) -> list[dict]:
    return [call for step in report["steps"] for call in step["calls"]]


def _technique(handle):
    (session,) = handle.sessions
    return session.techniques[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_runs_the_sliced_path_and_equals_dense(family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    before, weights = model_state(pipe.transformer), _weights(pipe.transformer)
    with dit_accel.apply(pipe, dit_accel.DyDiTConfig.keep_all()) as handle:
        torch.testing.assert_close(run(pipe, family), baseline, rtol=1e-5, atol=1e-5)
        report = handle.report()
    stats = _calls(report)[-1]
    assert stats["dydit_heads"] == stats["dydit_groups"] == 1.0
    assert stats["dydit_mlp_tokens"] == 1.0  # the token gather/scatter ran
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
