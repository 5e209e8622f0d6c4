"""A config at its defaults never costs more than dense: where a layer's plan cannot save (too few
tokens, density near 1) it runs dense at no overhead, and `report()` says why."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import run

import dit_accel
from dit_accel.config import AccelerationConfig
from dit_accel.runtime.registry import plan_members
from dit_accel.testing import FAMILIES, tiny_pipeline

#: every config class dit-accel itself registers as a plan member
DEFAULT_CONFIGS = [r.config_class for r in plan_members() if issubclass(r.config_class, AccelerationConfig)
                   and r.config_class.__module__.startswith("dit_accel.")]


def _call(family: str, **overrides) -> dict:
    return {"num_inference_steps": 8, "output_type": "pt" if family == "dit" else "latent", **overrides}


def test_the_defaults_cover_every_technique():
    assert {c.__name__ for c in DEFAULT_CONFIGS} >= {"RASConfig", "FlexDiTConfig", "DyDiTConfig", "SVG2Config",
                                                      "ProxyAttentionConfig"}


@pytest.mark.parametrize("family", FAMILIES + ("sd3.5",))
def test_every_default_costs_at_most_dense(family):
    pipe = tiny_pipeline("sd3", variant="sd3.5") if family == "sd3.5" else tiny_pipeline(family)
    family = "sd3" if family == "sd3.5" else family
    for config_class in DEFAULT_CONFIGS:
        with dit_accel.apply(pipe, config_class()) as handle:
            assert torch.isfinite(run(pipe, family, **_call(family))).all()
            assert handle.report()["flops_ratio"] <= 1.0, config_class.__name__


ALL_STEPS = dict(dense_warmup=0.0, dense_first_blocks=0.0)


@pytest.mark.parametrize("config, size, reason", [
    # 256 tokens make one query cluster at the default cluster sizes
    (dit_accel.SVG2Config(**ALL_STEPS), 128, "too few tokens"),
    (dit_accel.SVG2Config(query_clusters=4, key_clusters=8, top_p=0.97, **ALL_STEPS), 128, "density near 1"),
    # the 8 x 8 local window holds a 64 x 64 image's whole 8 x 8 token grid
    (dit_accel.ProxyAttentionConfig(**ALL_STEPS), 64, "too few tokens"),
    # 12 x 12 tokens in 2 x 2 windows of 8 x 8, padded, and 36 proxies: more pairs than dense
    (dit_accel.ProxyAttentionConfig(**ALL_STEPS), 96, "saves under 10% of the pairs"),
])
def test_layers_that_cannot_save_run_dense_and_say_why(config, size, reason):
    """No k-means, no windows, no overhead; asked to plan every layer, they do (after the warm-up)."""
    pipe = tiny_pipeline("sd3")
    with dit_accel.apply(pipe, config) as handle:
        run(pipe, "sd3", **_call("sd3", height=size, width=size))
        report = handle.report()
    calls = [call for step in report["steps"] for call in step["calls"]]
    assert all(call["dense_layers"] == {reason: 2} for call in calls)  # both blocks' joint attention
    assert report["flops_ratio"] == 1.0 and "overhead" not in report["work"]
    with dit_accel.apply(pipe, dataclasses.replace(config, dense_warmup=0.5, plan_every_layer=True)) as handle:
        run(pipe, "sd3", **_call("sd3", height=size, width=size))
        calls = [call for step in handle.report()["steps"] for call in step["calls"]]
    assert calls[0]["dense_layers"] == {"warm-up step": 2} and calls[-1]["dense_layers"] == {}
