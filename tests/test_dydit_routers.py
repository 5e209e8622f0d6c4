"""DyDiT's learned routers: a fine-tune trains them toward the FLOPs target, their file round-trips and is
refused for another model or config, the sliced execution of what they keep equals the gated full-width
execution training runs, routers that keep everything are dense, and nothing is left on the model."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from helpers import model_state, run
from safetensors import safe_open
from safetensors.torch import load_file

import dit_accel
from dit_accel.finetune import finetune
from dit_accel.models.base import TokenGrid
from dit_accel.runtime.estimate import CallShapes
from dit_accel.runtime.training import TrainingSettings
from dit_accel.techniques.dydit import routers as routers_module
from dit_accel.testing import tiny_call_kwargs, tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]
#: narrow at every step, tokens untouched: what the routers keep is compared with the gated execution
WIDTH_ONLY = dit_accel.DyDiTConfig(width_ratio=0.5, max_width_ratio=0.5, buckets=1)

#: the slice copies depend on the itemsize alone
SHAPES = CallShapes(samples=2, grid=TokenGrid(1, 16, 16), text_tokens=32, itemsize=4, hidden=64, output_channels=64)


def _train(pipe, family: str, config, out, steps: int, **overrides):
    """A short fine-tune, strong on the FLOPs constraint so that the routers cut within a few steps."""
    call = {k: v for k, v in tiny_call_kwargs(family).items() if k not in ("prompt", "generator", "output_type")}
    settings = dict(steps=steps, batch_size=4, learning_rate=0.05, flops_weight=10.0, progress=False)
    return finetune(pipe, config, prompts=PROMPTS, out=out, **{**call, **settings, **overrides})


def _technique(handle):
    (session,) = handle.sessions
    return session.techniques[0]


def test_finetune_pulls_the_flops_ratio_to_the_target_and_the_file_round_trips(tmp_path):
    pipe = tiny_pipeline("sd3")
    dense = run(pipe, "sd3")
    before, weights = model_state(pipe.transformer), {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    config = _train(pipe, "sd3", dit_accel.DyDiTConfig(width_ratio=0.5, token_ratio=0.5), tmp_path, steps=40)
    # the fine-tune's handle is gone: the model as it was, bit for bit
    assert model_state(pipe.transformer) == before
    assert all(torch.equal(weights[k], v) for k, v in pipe.transformer.state_dict().items())
    torch.testing.assert_close(run(pipe, "sd3"), dense, rtol=0, atol=0)
    # the routers start keeping nearly every unit (ratio ~0.7 against a target of ~0.45 with half the MLP
    # tokens: the penalty dominates the loss) and the constraint pulls them down within a few steps
    losses = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["losses"]
    assert losses[0] > 0.1 and min(losses[1:]) < losses[0] / 4
    assert config.routers == str((tmp_path / routers_module.ROUTERS_FILE).resolve()) and config.calibration is None
    with safe_open(config.routers, framework="pt") as file:
        metadata = file.metadata()
    assert json.loads(metadata["trained_for"]) == {"buckets": 4, "max_width_ratio": 1.0, "token_ratio": 0.5,
                                                   "width_ratio": 0.5}
    outputs = []
    with dit_accel.apply(pipe, config) as handle:
        for _ in range(2):
            outputs.append(run(pipe, "sd3"))
        report = handle.report()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    assert torch.isfinite(outputs[0]).all()
    calls = [call for step in report["steps"] for call in step["calls"]]
    assert all(call["dydit_mlp_tokens"] == 0.5 for call in calls)  # top half of the tokens by router score
    # they start keeping every head and group
    assert "dydit_bucket" not in calls[0] and min(min(c["dydit_heads"], c["dydit_groups"]) for c in calls) < 1.0
    assert report["flops_ratio"] < 0.9
    assert model_state(pipe.transformer) == before


def test_the_routers_file_is_refused_for_another_model_or_config(tmp_path):
    pipe = tiny_pipeline("sd3")
    config = _train(pipe, "sd3", WIDTH_ONLY, tmp_path, steps=1)
    with pytest.raises(dit_accel.ConfigError, match="other weights"):
        dit_accel.apply(tiny_pipeline("sd3", seed=1), config)
    with pytest.raises(dit_accel.ConfigError, match="another model class"):
        dit_accel.apply(tiny_pipeline("flux"), config)
    with pytest.raises(dit_accel.ConfigError, match=r"another config: width_ratio=0\.5 \(now 0\.4\)"):
        dit_accel.apply(pipe, dit_accel.DyDiTConfig(width_ratio=0.4, max_width_ratio=0.5, buckets=1,
                                                    routers=config.routers))
    with pytest.raises(dit_accel.ConfigError, match="routers or calibration, not both"):
        dit_accel.DyDiTConfig(routers=config.routers, calibration=config.routers)
    with pytest.raises(dit_accel.ConfigError, match=r"no such file.*dit_accel\.finetune"):
        dit_accel.DyDiTConfig(routers=str(tmp_path / "missing.safetensors"))
    with dit_accel.apply(pipe, config) as handle, pytest.raises(dit_accel.ConfigError, match="loaded already"):
        _technique(handle).start_training(TrainingSettings())
    with dit_accel.apply(pipe, dit_accel.DyDiTConfig.keep_all()) as handle, \
            pytest.raises(dit_accel.ConfigError, match="nothing to learn"):
        _technique(handle).start_training(TrainingSettings())


@pytest.mark.parametrize("family", ["sd3", "wan", "flux"])  # Wan: q/k norms over all heads; Flux: fused blocks
def test_routed_slices_equal_the_gated_full_width_training_execution(family, tmp_path, monkeypatch):
    """What the routers keep at each step, run sliced, equals training's full-width execution with its
    gates at their noiseless values (1 where the logit is > 0 or the largest of its part): zeroing a head's input to the output
    projection is dropping it. The ledger records the narrowing, and the estimate covers what is held."""
    pipe = tiny_pipeline(family)
    dense = run(pipe, family)
    config = _train(pipe, family, WIDTH_ONLY, tmp_path, steps=8)
    with dit_accel.apply(pipe, config) as handle:
        routed = run(pipe, family)
        report = handle.report()
        estimate = _technique(handle).estimate_bytes(SHAPES)
    heads = [call["dydit_heads"] for step in report["steps"] for call in step["calls"]]
    assert min(heads) < 1.0 and report["flops_ratio"] < 1.0
    assert not torch.allclose(routed, dense)
    trained = load_file(config.routers)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.startswith("corrections") and k.endswith("up.weight"))
    monkeypatch.setattr(routers_module, "logistic_noise", lambda logits: logits)
    with dit_accel.apply(pipe, WIDTH_ONLY) as handle:
        trainable = _technique(handle).start_training(TrainingSettings())
        trainable.routers.load_state_dict(load_file(config.routers))
        gated = run(pipe, family)
        trainable.stop()
    torch.testing.assert_close(routed, gated, rtol=1e-4, atol=1e-4)
    assert list(estimate) == ["slice_copies", "correction_weights"] and estimate["slice_copies"] > 0
    assert estimate["correction_weights"] == 4 * sum(v.numel() for k, v in trained.items() if k.startswith("corrections"))


def test_routers_that_keep_everything_are_dense(tmp_path):
    """The routers as training starts (every logit +3) keep every unit at inference: the slicing hooks run
    and cut nothing."""
    pipe = tiny_pipeline("wan")
    dense = run(pipe, "wan")
    config = dit_accel.DyDiTConfig(width_ratio=0.5)
    ratios = {}
    for rank in (0, 8):  # without corrections, and with corrections that add nothing yet
        with dit_accel.apply(pipe, config) as handle:
            trainable = _technique(handle).start_training(TrainingSettings(lora_rank=rank))
            trained = trainable.save(tmp_path, {})
            trainable.stop()
        with dit_accel.apply(pipe, trained) as handle:
            torch.testing.assert_close(run(pipe, "wan"), dense, rtol=1e-5, atol=1e-5)
            ratios[rank] = handle.report()
            estimate = _technique(handle).estimate_bytes(SHAPES)
            assert list(estimate) == ([] if rank == 0 else ["correction_weights"])
    assert ratios[0]["flops_ratio"] == pytest.approx(1.0)
    assert ratios[8]["flops_ratio"] > 1.0 and "overhead" in ratios[8]["work"]  # the corrections' work is counted


def test_a_handle_removed_during_training_takes_the_gates_off():
    """A fine-tune that fails ends with `handle.remove()` alone: the gate hooks go with it."""
    pipe = tiny_pipeline("sd3")
    dense, before = run(pipe, "sd3"), model_state(pipe.transformer)
    handle = dit_accel.apply(pipe, dit_accel.DyDiTConfig(width_ratio=0.5, token_ratio=0.5))
    _technique(handle).start_training(TrainingSettings())
    assert any(module._forward_pre_hooks for module in pipe.transformer.modules())
    handle.remove()
    assert not any(module._forward_pre_hooks for module in pipe.transformer.modules())
    assert model_state(pipe.transformer) == before
    torch.testing.assert_close(run(pipe, "sd3"), dense, rtol=0, atol=0)


def test_width_routers_run_beside_the_token_cache_at_any_token_ratio(tmp_path):
    """Routers trained at token_ratio 1 route widths only: applied with token_ratio < 1, the MLP tokens are
    skipped by the training-free cache heuristic (its cache counted), not refused."""
    pipe = tiny_pipeline("sd3")
    config = _train(pipe, "sd3", WIDTH_ONLY, tmp_path, steps=4)
    assert WIDTH_ONLY.token_ratio == 1.0
    with dit_accel.apply(pipe, dataclasses.replace(config, token_ratio=0.5)) as handle:
        run(pipe, "sd3")
        calls = [call for step in handle.report()["steps"] for call in step["calls"]]
        assert "token_cache" in _technique(handle).estimate_bytes(SHAPES)
    assert calls[0]["dydit_mlp_tokens"] == 1.0 and calls[-1]["dydit_mlp_tokens"] == 0.5  # the cache's first call
    with pytest.raises(dit_accel.ConfigError, match=r"another config: width_ratio"):
        dit_accel.apply(pipe, dataclasses.replace(config, width_ratio=0.4, max_width_ratio=0.5))
