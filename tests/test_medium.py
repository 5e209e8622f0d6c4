"""`medium:<family>`: the tiny pipelines with a 4-block, hidden-384 transformer at 4,096 tokens."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from dit_accel.loading import UsageError, check_model_spec, load_model  # noqa: E402
from dit_accel.testing import MEDIUM_FAMILIES, tiny_pipeline  # noqa: E402

TOKENS = 4096


class _Stop(Exception):
    pass


def _first_call_tokens(pipe, call) -> tuple[int, int]:
    """(batch, image/video tokens) of the transformer's first input; the call stops there, so no
    transformer work is done."""
    seen = {}

    def spy(module, args, kwargs):
        seen["shape"] = (kwargs.get("hidden_states") if "hidden_states" in kwargs else args[0]).shape
        raise _Stop

    patch = pipe.transformer.config.patch_size
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
    handle = pipe.transformer.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        with pytest.raises(_Stop):
            pipe(**call)
    finally:
        handle.remove()
    shape = seen["shape"]
    grid = (1, *shape[-2:]) if len(shape) == 4 else shape[-3:]
    tokens = 1
    for side, step in zip(grid, patch):
        tokens *= side // step
    return shape[0], tokens


@pytest.mark.parametrize("family", MEDIUM_FAMILIES)
def test_medium_model_is_the_tiny_pipeline_with_a_medium_transformer_at_4096_tokens(family):
    pipe, call = load_model(f"medium:{family}", "cpu", torch.float32)
    tiny = tiny_pipeline(family)
    assert type(pipe) is type(tiny) and type(pipe.transformer) is type(tiny.transformer)
    config = pipe.transformer.config
    assert (config.num_layers, config.num_attention_heads, config.attention_head_dim) == (4, 6, 64)
    assert call["num_inference_steps"] == 20 and call["guidance_scale"] == 1.0
    assert _first_call_tokens(pipe, call) == (1, TOKENS)  # batch 1: no CFG


def test_medium_sd3_runs_a_step_at_a_128x128_latent():
    pipe, call = load_model("medium:sd3", "cpu", torch.float32)
    latents = pipe(**{**call, "num_inference_steps": 1, "output_type": "latent"})[0]
    assert latents.shape == (1, 16, 128, 128)  # 64 x 64 patches of 2
    assert torch.isfinite(latents).all()


@pytest.mark.parametrize("spec, valid", [("medium:flux", "sd3, wan, pixart"), ("medium:", "sd3, wan, pixart"),
                                         ("tiny:sdxl", "sd3, flux, pixart")])
def test_an_unknown_family_is_refused_naming_the_valid_ones(spec, valid, monkeypatch):
    def no_model_work(*args, **kwargs):
        raise AssertionError("a model was built")
    monkeypatch.setattr("dit_accel.testing.tiny_pipeline", no_model_work)
    monkeypatch.setattr("dit_accel.testing.medium_pipeline", no_model_work)
    with pytest.raises(UsageError, match=f"unknown {spec.partition(':')[0]} family .*valid: {valid}"):
        check_model_spec(spec)
    with pytest.raises(UsageError, match="valid: "):
        load_model(spec, "cpu", torch.float32)
