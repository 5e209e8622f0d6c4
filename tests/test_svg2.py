"""SVG2 sparse attention through the runtime: dense through its real path at keep-all, sparse at its
defaults, with batches, CFG and RAS."""

from __future__ import annotations

import pytest
import torch
from helpers import model_state, run

import dit_accel
from dit_accel.testing import FAMILIES, tiny_pipeline

#: small clusters so the tiny models (64-256 tokens) have several of each
SPARSE = dict(query_clusters=4, key_clusters=8, top_p=0.5, min_key_cluster_ratio=0.1, dense_warmup=0.25,
              dense_first_blocks=0.0, kmeans_iters_first=10)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_runs_kmeans_and_the_sparse_kernel_and_equals_dense(family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    several_clusters = dit_accel.SVG2Config(**{**SPARSE, "top_p": 1.0, "min_key_cluster_ratio": 1.0,
                                               "dense_warmup": 0.0})
    for config in (dit_accel.SVG2Config.keep_all(), several_clusters):
        with dit_accel.apply(pipe, config) as handle:
            torch.testing.assert_close(run(pipe, family), baseline, rtol=1e-4, atol=1e-4)
            report = handle.report()
        assert report["work"]["overhead"] > 0  # k-means ran at every step
        assert all(call["attention_density"] == pytest.approx(1.0) for s in report["steps"] for call in s["calls"])


@pytest.mark.parametrize("family", ["sd3", "flux", "wan", "hunyuan_video", "cogvideox", "pixart", "dit"])
def test_sparse_defaults_skip_pairs_and_compose_with_ras(family):
    pipe = tiny_pipeline(family)
    before = model_state(pipe.transformer)
    with dit_accel.apply(pipe, dit_accel.SVG2Config(**SPARSE)) as handle:
        out = run(pipe, family)
        report = handle.report()
    assert torch.isfinite(out).all()
    densities = [call["attention_density"] for s in report["steps"][1:] for call in s["calls"]]
    assert max(densities) < 1.0 and report["flops_ratio"] < 1.0
    ras = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())
    with dit_accel.apply(pipe, dit_accel.SVG2Config(**SPARSE), ras) as handle:
        assert torch.isfinite(run(pipe, family)).all()
        assert handle.report()["flops_ratio"] < report["flops_ratio"]
    assert model_state(pipe.transformer) == before


def test_batch_two_with_cfg():
    pipe = tiny_pipeline("sd3")
    with dit_accel.apply(pipe, dit_accel.SVG2Config(**SPARSE)) as handle:
        out = run(pipe, "sd3", prompt=["a red circle", "a blue square"])
        assert out.shape[0] == 2 and torch.isfinite(out).all()
        assert handle.report()["flops_ratio"] < 1.0
