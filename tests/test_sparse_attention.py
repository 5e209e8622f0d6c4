"""SVG2 and proxy attention through the runtime: dense through their real paths at keep-all, sparse
at small budgets on every family, with batches, CFG, RAS, and a step cache."""

from __future__ import annotations

import pytest
import torch
from helpers import model_state, run

import dit_accel
from dit_accel.plan_spec import parse_plan
from dit_accel.testing import FAMILIES, tiny_pipeline

#: small clusters and windows so the tiny models (64-256 tokens) have several of each; SVG2 planned on
#: every layer (at these sizes its plans save too little for it to run them by itself)
SVG2_SPARSE = dict(query_clusters=4, key_clusters=8, top_p=0.5, min_key_cluster_ratio=0.1, dense_warmup=0.25,
                   dense_first_blocks=0.0, kmeans_iters_first=10, plan_every_layer=True)
PROXY_SPARSE = dict(local_window=(1, 2, 2), proxy_window=(1, 1, 2), shift_windows=True, dense_warmup=0.25,
                    dense_first_blocks=0.0)
SPARSE = {"svg2": dit_accel.SVG2Config(**SVG2_SPARSE), "proxy": dit_accel.ProxyAttentionConfig(**PROXY_SPARSE)}
#: keep-all, and a dense setting that still cuts the tokens into several clusters / windows (planned on
#: every layer: by default a layer that cannot save runs dense)
DENSE = {
    "svg2": (dit_accel.SVG2Config.keep_all(),
             dit_accel.SVG2Config(**{**SVG2_SPARSE, "top_p": 1.0, "min_key_cluster_ratio": 1.0, "dense_warmup": 0.0,
                                     "plan_every_layer": True})),
    "proxy": (dit_accel.ProxyAttentionConfig.keep_all(),
              dit_accel.ProxyAttentionConfig(**{**PROXY_SPARSE, "proxy_window": (1, 1, 1), "dense_warmup": 0.0,
                                                "plan_every_layer": True})),
}


@pytest.mark.parametrize("technique", ["svg2", "proxy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_runs_the_sparse_kernel_and_equals_dense(technique, family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    for config in DENSE[technique]:
        with dit_accel.apply(pipe, config) as handle:
            torch.testing.assert_close(run(pipe, family), baseline, rtol=1e-4, atol=1e-4)
            report = handle.report()
        calls = [call for s in report["steps"] for call in s["calls"]]
        if technique == "svg2":
            assert report["work"]["overhead"] > 0  # k-means ran at every step
            assert all(call["attention_density"] == pytest.approx(1.0) for call in calls)
        else:  # the local and proxy parts both ran: padding and proxies cost pairs of their own
            assert all(call["attention_density"] >= 1.0 for call in calls)


@pytest.mark.parametrize("technique", ["svg2", "proxy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_settings_skip_pairs_and_compose_with_ras(technique, family):
    pipe = tiny_pipeline(family)
    before = model_state(pipe.transformer)
    with dit_accel.apply(pipe, SPARSE[technique], details=True) as handle:
        out = run(pipe, family)
        report = handle.report()
    assert torch.isfinite(out).all()
    assert report["steps"][0]["calls"][0]["attention_density"] == 1.0  # the dense warm-up step
    later = [call for s in report["steps"][1:] for call in s["calls"]]
    assert max(call["attention_density"] for call in later) < 1.0 and report["flops_ratio"] < 1.0
    assert all(min(call["attention_density_by_block"].values()) < 1.0 for call in later)
    if technique == "svg2":  # the query clusters of one head over the grid, for the UI
        labels = torch.tensor(later[0]["svg2_query_clusters"]["labels"])
        assert labels.ndim == 3 and labels.numel() >= 64
        assert 0 <= int(labels.min()) and int(labels.max()) < SVG2_SPARSE["query_clusters"]
    ras = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())
    with dit_accel.apply(pipe, SPARSE[technique], ras) as handle:
        assert torch.isfinite(run(pipe, family)).all()
        assert handle.report()["flops_ratio"] < report["flops_ratio"]
    assert model_state(pipe.transformer) == before


@pytest.mark.parametrize("technique", ["svg2", "proxy"])
def test_batch_two_with_cfg_equals_each_prompt_alone(technique):
    """Windows and clusters are per (sample, head): batching prompts changes nothing."""
    pipe = tiny_pipeline("sd3")
    prompts = ["a red circle", "a blue square"]
    seeds = lambda *s: [torch.Generator().manual_seed(i) for i in s]  # noqa: E731
    with dit_accel.apply(pipe, SPARSE[technique]) as handle:
        out = run(pipe, "sd3", prompt=prompts, generator=seeds(0, 1))
        assert out.shape[0] == 2 and handle.report()["flops_ratio"] < 1.0
        alone = torch.cat([run(pipe, "sd3", prompt=p, generator=seeds(i)) for i, p in enumerate(prompts)])
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-4)


def test_proxy_composes_with_a_diffusers_step_cache():
    pipe = tiny_pipeline("wan")
    cache = parse_plan("fbcache:threshold=0.5")
    with dit_accel.apply(pipe, SPARSE["proxy"], *cache) as handle:
        assert torch.isfinite(run(pipe, "wan")).all()
        assert handle.report()["flops_ratio"] < 1.0
