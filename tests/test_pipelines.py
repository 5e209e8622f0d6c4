"""The Accelerated<Name>Pipeline classes: dense equivalence, save/load, standing and per-call plans."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

from dit_accel import ProxyAttentionConfig, RASConfig, SVG2Config
from dit_accel.config import ConfigError
from dit_accel.runtime.hooks import HOOK_PREFIX
from dit_accel.pipelines import AcceleratedFluxPipeline, AcceleratedStableDiffusion3Pipeline
from dit_accel.testing import FAMILIES, VIDEO_FAMILIES, tiny_call_kwargs, tiny_pipeline
from helpers import ACCELERATED

SPARSE = RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())


def quick_kwargs(family: str, **overrides):
    """Two steps, latents out (DiT cannot skip its decoder), small videos: the loop is what differs."""
    kwargs = {"num_inference_steps": 2, "output_type": "pt" if family == "dit" else "latent"}
    if family in VIDEO_FAMILIES:
        kwargs.update(height=64, width=64, num_frames=5)
    return tiny_call_kwargs(family, **{**kwargs, **overrides})


def first_output(output) -> torch.Tensor:
    return torch.as_tensor(output[0])


def has_dit_accel_hooks(pipe) -> bool:
    registry = getattr(pipe.transformer, "_diffusers_hook", None)
    return registry is not None and any(name.startswith(HOOK_PREFIX) for name in registry.hooks)


def stop_mid_run(pipe, step, timestep, callback_kwargs):
    raise RuntimeError("stop mid-run")


def test_every_family_has_its_class():
    assert set(ACCELERATED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_acceleration_equals_parent_bit_for_bit(family):
    parent = tiny_pipeline(family)
    accelerated = ACCELERATED[family](**parent.components)
    accelerated.set_progress_bar_config(disable=True)
    assert accelerated.diffusers_class() is type(parent)
    expected = first_output(parent(**quick_kwargs(family)))
    got = first_output(accelerated(**quick_kwargs(family)))
    assert torch.equal(got, expected)
    assert accelerated.acceleration_report() is None
    assert not has_dit_accel_hooks(accelerated)


def test_save_and_from_pretrained_round_trip_offline(tmp_path):
    source = AcceleratedStableDiffusion3Pipeline(**tiny_pipeline("sd3").components)
    source.set_acceleration(SPARSE)
    source.save_pretrained(tmp_path)
    assert has_dit_accel_hooks(source), "saving must put the standing plan back"
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert "acceleration" not in index

    loaded = AcceleratedStableDiffusion3Pipeline.from_pretrained(tmp_path, acceleration=SPARSE)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.acceleration == [SPARSE]
    assert not any("dit_accel" in path.read_text() for path in tmp_path.rglob("*.json"))
    reference, reloaded = source.transformer.state_dict(), loaded.transformer.state_dict()
    assert reloaded.keys() == reference.keys()
    assert all(torch.equal(value, reference[key]) for key, value in reloaded.items())
    loaded(**quick_kwargs("sd3"))
    assert loaded.acceleration_report()["flops_ratio"] < 1
    assert type(DiffusionPipeline.from_pretrained(tmp_path)) is StableDiffusion3Pipeline


def test_per_call_acceleration_is_applied_then_removed():
    pipe = AcceleratedStableDiffusion3Pipeline(**tiny_pipeline("sd3").components)
    pipe.set_progress_bar_config(disable=True)
    dense = first_output(pipe(**quick_kwargs("sd3")))

    sparse = first_output(pipe(**quick_kwargs("sd3"), acceleration=SPARSE))
    report = pipe.acceleration_report()
    assert report["techniques"] == ["RASConfig"] and report["flops_ratio"] < 1
    assert not torch.equal(sparse, dense)
    assert not has_dit_accel_hooks(pipe)
    assert "set_timesteps" not in vars(pipe.scheduler)

    assert torch.equal(first_output(pipe(**quick_kwargs("sd3"))), dense)
    assert pipe.acceleration_report() is None


def test_standing_plan_survives_per_call_plans_and_errors():
    pipe = AcceleratedFluxPipeline.from_pipe(tiny_pipeline("flux"), acceleration=SPARSE)
    pipe.set_progress_bar_config(disable=True)
    assert has_dit_accel_hooks(pipe)
    sparse = first_output(pipe(**quick_kwargs("flux")))
    assert pipe.acceleration_report()["flops_ratio"] < 1

    dense = first_output(pipe(**quick_kwargs("flux"), acceleration=[]))
    assert pipe.acceleration_report() is None and not torch.equal(dense, sparse)
    with pytest.raises(ConfigError, match="stage 6"):
        pipe(**quick_kwargs("flux"), acceleration=[SVG2Config(), ProxyAttentionConfig()])
    with pytest.raises(RuntimeError, match="stop mid-run"):
        pipe(**quick_kwargs("flux", callback_on_step_end=stop_mid_run), acceleration=RASConfig(sample_ratio=0.25))
    assert pipe.acceleration == [SPARSE] and has_dit_accel_hooks(pipe)
    assert torch.equal(first_output(pipe(**quick_kwargs("flux"))), sparse)

    with pytest.raises(ConfigError, match="stage 6"):
        pipe.set_acceleration([SVG2Config(), ProxyAttentionConfig()])
    assert pipe.acceleration == [SPARSE] and has_dit_accel_hooks(pipe)
    pipe.set_acceleration(None)
    assert not has_dit_accel_hooks(pipe) and "set_timesteps" not in vars(pipe.scheduler)
