"""FlexDiT's pooled K/V (stage 5) through the runtime: dense at 1 x 1 pooling through its real path on
every family, fewer key pairs when pooling, and composition with RAS, the sparse kernels and a step
cache."""

from __future__ import annotations

import pytest
import torch
from helpers import model_state, run

import dit_accel
from dit_accel.plans import parse_plan
from dit_accel.testing import FAMILIES, tiny_pipeline


def _attention_pairs(report: dict) -> float:
    return sum(w for block in report["blocks"].values() for name, w in block.items() if "attention" in name)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_pools_every_block_one_to_one_and_equals_dense(family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    with dit_accel.apply(pipe, dit_accel.FlexDiTConfig.keep_all()) as handle:
        torch.testing.assert_close(run(pipe, family), baseline, rtol=1e-4, atol=1e-4)
        report = handle.report()
    assert report["work"]["overhead"] > 0  # the pooling ran in every block
    assert report["flops_ratio"] >= 1.0


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_kv_attends_to_fewer_keys_and_composes(family):
    pipe = tiny_pipeline(family)
    before = model_state(pipe.transformer)
    dense_run = dit_accel.measure(pipe)
    baseline = run(pipe, family)
    dense_report = dense_run.report()
    dense_run.remove()
    pooled = dit_accel.FlexDiTConfig(pooled_kv_blocks=1, pool_size=2)
    with dit_accel.apply(pipe, pooled) as handle:
        out = run(pipe, family)
        report = handle.report()
    assert torch.isfinite(out).all() and not torch.allclose(out, baseline)
    assert report["flops_ratio"] < 1.0
    first = report["blocks"][0]
    assert any("attention" in name for name in first)
    assert _attention_pairs(report) < _attention_pairs(dense_report)
    ras = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=(), cache_kv=False)
    for others in ([ras], [dit_accel.ProxyAttentionConfig(local_window=(1, 2, 2), dense_warmup=0.0)],
                   parse_plan("fbcache:threshold=0.5")):
        with dit_accel.apply(pipe, pooled, *others) as handle:
            assert torch.isfinite(run(pipe, family)).all()
            assert handle.report()["flops_ratio"] < 1.0
    assert model_state(pipe.transformer) == before


def test_stage_three_fields_are_refused_until_built():
    for fields in (dict(sparse_blocks=(1, 1)), dict(min_density=0.5)):
        with pytest.raises(dit_accel.ConfigError, match="not built yet"):
            dit_accel.FlexDiTConfig(**fields)
