"""FlexDiT through the runtime: sparse-dense blocks (stage 3) and pooled K/V (stage 5), dense at 1 x 1
pooling through the real path on every family, fewer tokens and key pairs when pooling, the density
schedule keeping its promise, rotary tables at the groups' mean positions, and composition with RAS,
the sparse kernels and a step cache."""

from __future__ import annotations

import pytest
import torch
from helpers import RecordingConfig, model_state, run

import dit_accel
from dit_accel.techniques.flexdit import token_groups, window_count
from dit_accel.models import TokenGrid, adapter_for
from dit_accel.tokens import pool_tokens
from dit_accel.plan_spec import parse_plan
from dit_accel.testing import FAMILIES, tiny_pipeline

SPARSE = dit_accel.FlexDiTConfig(sparse_blocks=(0, 1), pooled_kv_blocks=0, schedule=None)
#: pooled K/V alone
POOLED_KV = dict(sparse_blocks=None, schedule=None)


def _attention_pairs(report: dict) -> float:
    return sum(w for block in report["blocks"].values() for name, w in block.items() if "attention" in name)


def _calls(report: dict) -> list[dict]:
    return [call for step in report["steps"] for call in step["calls"]]


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_pools_every_block_one_to_one_and_equals_dense(family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    with dit_accel.apply(pipe, dit_accel.FlexDiTConfig.keep_all()) as handle:
        torch.testing.assert_close(run(pipe, family), baseline, rtol=1e-4, atol=1e-4)
        report = handle.report()
        blocks = len(handle.sessions[0].adapter.blocks())
    assert report["work"]["overhead"] > 0  # K/V pooling, token pooling and unpooling ran in every block
    assert report["flops_ratio"] >= 1.0
    for call in _calls(report):  # every block ran on its 1 x 1 groups: as many as tokens
        assert sorted(call["flexdit_tokens_by_block"]) == list(range(blocks))
        assert set(call["flexdit_density_by_block"].values()) == {1.0}


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_blocks_run_on_pooled_tokens_and_remove_cleanly(family):
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    before = model_state(pipe.transformer)  # after a plain run: Flux's pipeline leaves a registry of its own
    with dit_accel.apply(pipe, SPARSE) as handle:
        out = run(pipe, family)
        report = handle.report()
    assert torch.isfinite(out).all() and not torch.allclose(out, baseline)
    assert report["flops_ratio"] < 1.0
    assert all(set(call["flexdit_density_by_block"].values()) == {0.25} for call in _calls(report))  # 2 x 2 windows
    assert model_state(pipe.transformer) == before


@pytest.mark.parametrize("family, pool_frames", [("sd3", 1), ("wan", 2)])
def test_schedule_gives_the_token_counts_it_promises(family, pool_frames):
    """Stage 3 in block 1 and pooled K/V in block 0 at the promised counts, read from the ledger; the last
    quarter of the steps is dense. Wan's 3 latent frames in windows of 2 frames leave partial windows."""
    pipe = tiny_pipeline(family)
    start, end = 1 / (4 * pool_frames), 0.5
    config = dit_accel.FlexDiTConfig(sparse_blocks=(1, 1), pooled_kv_blocks=1, pool_frames=pool_frames,
                                     schedule=(start, end))
    probe = RecordingConfig()
    with dit_accel.apply(pipe, config, probe) as handle:
        run(pipe, family)
        records = handle.sessions[0].records
    grid = probe.seen[0].call.grid
    dense, windows = grid.num_tokens, window_count(grid, config.window)
    for record in records:
        step = record.ctx.step_index
        promised = config.tokens_at(step, record.ctx.num_steps, dense, windows)
        density = start + (end - start) * (step / 4) / 0.75
        assert promised == (dense if step == 3 else max(round(density * dense), windows))
        tokens = min(w.tokens for w in record.works if w.kind == "linear" and w.block == 1)
        [attention] = [w for w in record.works if w.kind == "self_attention" and w.block == 0]
        image_keys = attention.keys - (attention.tokens - dense)  # joint attention: the text keys come on top
        assert tokens == promised and image_keys == promised
        assert record.stats["flexdit_tokens_by_block"] == ({} if step == 3 else {1: promised})
        assert record.stats["flexdit_density"] == (1.0 if step == 3 else pytest.approx(density))
    if pool_frames == 2:  # partial windows: more groups than ceil(n / 8) at the least density
        assert windows > -(-dense // 8)
    with dit_accel.apply(pipe, dit_accel.FlexDiTConfig(sparse_blocks=(1, 1), schedule=(0.5, 1.0, 0.25, 1.0))) \
            as handle:
        run(pipe, family)
        per_step = [r.stats["flexdit_tokens_by_block"] for r in handle.sessions[0].records]
    assert [step.get(1) for step in per_step[::len(per_step) // 4]] == [dense // 2, None, dense // 4, None]


def test_pooled_rotary_tables_are_the_rotation_at_the_mean_position():
    """Flux: the pooled table equals Flux's own rotary embedding evaluated at the groups' mean (fractional)
    coordinates, text rows untouched; Wan: per-sample groups give per-sample tables, each the one its
    sample gets alone; HunyuanVideo: a pooled key may be attended where any member may."""
    flux = tiny_pipeline("flux").transformer
    grid = TokenGrid(1, 4, 6)
    image_ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(6.0), indexing="ij"),
                            -1).reshape(-1, 3)
    text_ids = torch.zeros(3, 3)
    tables = flux.pos_embed(torch.cat([text_ids, image_ids]))
    groups, count = token_groups(grid, (1, 2, 2), 0.25)
    assert count == 6
    pooled = adapter_for(flux).pool_rotary(tables, groups, count, text_tokens=3)
    at_mean = flux.pos_embed(torch.cat([text_ids, pool_tokens(image_ids, groups, count, dim=0)]))
    for table, expected in zip(pooled, at_mean):
        torch.testing.assert_close(table, expected, rtol=0, atol=1e-6)

    wan = tiny_pipeline("wan").transformer
    adapter, grid = adapter_for(wan), TokenGrid(2, 4, 4)
    tables = wan.rope(torch.zeros(1, 16, 2, 8, 8))
    index = torch.stack([torch.randperm(32, generator=torch.Generator().manual_seed(i))[:20].sort().values
                         for i in range(2)])
    groups, count = token_groups(grid, (1, 2, 2), 0.4, index)
    both = adapter.pool_rotary(adapter.gather_rotary(tables, index, 0), groups, count, 0)
    assert both[0].shape == (2, count, 1, tables[0].shape[-1])
    for sample in range(2):
        alone = adapter.pool_rotary(adapter.gather_rotary(tables, index[sample], 0), groups[sample], count, 0)
        for table, expected in zip(both, alone):
            torch.testing.assert_close(table[sample:sample + 1], expected)
    torch.testing.assert_close(both[0].square() + both[1].square(), torch.ones_like(both[0]))  # still rotations

    hunyuan = adapter_for(tiny_pipeline("hunyuan_video").transformer)
    mask = torch.tensor([True, False, False, False, True, True, False])[None, None, None]  # 4 image keys, 3 text
    pooled = hunyuan.pool_mask(mask, torch.tensor([0, 0, 1, 1]), 2, text_tokens=3)
    assert pooled.tolist() == [[[[True, False, True, True, False]]]]


def test_token_groups_are_batch_consistent_windows_or_runs():
    grid = TokenGrid(3, 5, 5)
    groups, count = token_groups(grid, (2, 2, 2), 1 / 8)  # the windows, partial at the edges
    assert count == window_count(grid, (2, 2, 2)) == 18 and torch.bincount(groups).min() == 1
    index = torch.stack([torch.randperm(75, generator=torch.Generator().manual_seed(i))[:40].sort().values
                         for i in range(3)])
    groups, count = token_groups(grid, (2, 2, 2), 0.3, index)
    assert count == 12 and groups.shape == (3, 40)
    for row in groups:  # every sample has 12 groups of 3 or 4 tokens, numbered by their first token
        sizes = torch.bincount(row, minlength=count)
        assert sizes.min() >= 3 and sizes.max() <= 4
        first = torch.full((count,), 99).scatter_reduce(0, row, torch.arange(40), "amin")
        assert torch.equal(first, first.sort().values)
    ones, count = token_groups(grid, (2, 2, 2), 1.0, index[0])  # one token per group: the tokens in order
    assert count == 40 and torch.equal(ones, torch.arange(40))


@pytest.mark.parametrize("family", FAMILIES)
def test_sparse_blocks_compose_with_ras_a_sparse_kernel_and_a_step_cache(family):
    pipe = tiny_pipeline(family)
    before = model_state(pipe.transformer)
    sparse = dit_accel.FlexDiTConfig(sparse_blocks=(0, 1), schedule=(0.25, 0.5))
    ras = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=(), cache_kv=False)
    proxy = dit_accel.ProxyAttentionConfig(local_window=(1, 2, 2), dense_warmup=0.0)
    for others in ([ras], [proxy], parse_plan("fbcache:threshold=0.5"), [ras, proxy]):
        with dit_accel.apply(pipe, sparse, *others) as handle:
            assert torch.isfinite(run(pipe, family)).all()
            report = handle.report()
        assert report["flops_ratio"] < 1.0
        assert any(call.get("flexdit_tokens_by_block") for call in _calls(report))
    assert model_state(pipe.transformer) == before


def _generators(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def test_batch_two_with_cfg_equals_each_prompt_alone():
    """Groups are per sample under RAS's per-sample token sets: batching prompts changes nothing."""
    pipe = tiny_pipeline("sd3")
    prompts = ["a red circle", "a blue square"]
    ras = dit_accel.RASConfig(sample_ratio=0.5, warmup_steps=1, error_reset_steps=(), cache_kv=False)
    with dit_accel.apply(pipe, dit_accel.FlexDiTConfig(sparse_blocks=(0, 1), schedule=(0.25, 0.6)), ras) as handle:
        out = run(pipe, "sd3", prompt=prompts, generator=_generators(0, 1))
        assert out.shape[0] == 2 and handle.report()["flops_ratio"] < 1.0
        alone = torch.cat([run(pipe, "sd3", prompt=p, generator=_generators(i)) for i, p in enumerate(prompts)])
    torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_kv_attends_to_fewer_keys_and_composes(family):
    pipe = tiny_pipeline(family)
    before = model_state(pipe.transformer)
    dense_run = dit_accel.measure(pipe)
    baseline = run(pipe, family)
    dense_report = dense_run.report()
    dense_run.remove()
    pooled = dit_accel.FlexDiTConfig(pooled_kv_blocks=1, pool_size=2, **POOLED_KV)
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


@pytest.mark.parametrize("fields, field", [
    ({"schedule": (0.1, 0.5)}, "schedule"),  # below one group per 2 x 2 window
    ({"schedule": (0.5, 1.5)}, "schedule"),
    ({"schedule": (0.5,)}, "schedule"),
    ({"pool_size": 1, "schedule": (0.5, 1.0)}, "schedule"),  # 1 x 1 windows: density 1 only
    ({"pool_frames": 0}, "pool_frames"),
    ({"sparse_blocks": (3, 1)}, "sparse_blocks"),
    ({"dense_fraction": 1.5}, "dense_fraction"),
])
def test_bad_values_name_the_field(fields, field):
    with pytest.raises(dit_accel.ConfigError, match=f"FlexDiTConfig.{field}"):
        dit_accel.FlexDiTConfig(**fields)


def test_refusals_at_apply_and_run():
    pipe = tiny_pipeline("sd3")
    before = model_state(pipe.transformer)
    sparse = dit_accel.FlexDiTConfig(sparse_blocks=(0, 0), pooled_kv_blocks=0)
    with pytest.raises(dit_accel.ConfigError, match="sparse_blocks .* past the model's last block"):
        dit_accel.apply(pipe, dit_accel.FlexDiTConfig(sparse_blocks=(2, 3)))
    with pytest.raises(dit_accel.ConfigError, match="RASConfig's K/V source"):
        dit_accel.apply(pipe, sparse, dit_accel.RASConfig())
    with pytest.raises(dit_accel.ConfigError, match="stage 5"):  # RAS's K/V cache and FlexDiT's pooled K/V
        dit_accel.apply(pipe, dit_accel.FlexDiTConfig.preset("quality"), dit_accel.RASConfig())
    with pytest.raises(dit_accel.ConfigError, match="pooled blocks"):  # PAB caches attention outputs
        dit_accel.apply(pipe, sparse, *parse_plan("pab"))
    with dit_accel.apply(pipe, dit_accel.FlexDiTConfig(sparse_blocks=(0, 0), schedule=(0.5, 0.5, 0.5))), \
            pytest.raises(dit_accel.ConfigError, match="schedule gives 3 densities.* 4 steps"):
        run(pipe, "sd3")
    assert model_state(pipe.transformer) == before


@pytest.mark.parametrize("family", FAMILIES)
def test_mean_v_poolingformer_gives_every_query_the_mean_value(family):
    """The paper's Poolingformer in the bottom block: a uniform attention, one key for all."""
    pipe = tiny_pipeline(family)
    baseline = run(pipe, family)
    config = dit_accel.FlexDiTConfig(pooled_kv_blocks=1, bottom_attention="mean_v", **POOLED_KV)
    with dit_accel.apply(pipe, config) as handle:
        out = run(pipe, family)
        report = handle.report()
    assert torch.isfinite(out).all() and not torch.allclose(out, baseline)
    assert any("attention" in work for work in report["blocks"][0]) and report["flops_ratio"] < 1.0


def test_mean_v_keys_make_sdpa_the_mean_of_the_allowed_values():
    from dit_accel.attention.intercept import dense_attention
    from dit_accel.techniques.flexdit import FlexDiT

    class Plan:  # the one thing _mean_value asks of a plan
        def record_overhead(self, *args):
            pass

    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    key, value, bias, mask = FlexDiT._mean_value(Plan(), k, v, None)
    torch.testing.assert_close(dense_attention(q, key, value, bias, attn_mask=mask), v.mean(2, keepdim=True).expand_as(q))
    allowed = torch.tensor([True, True, False, True, False])
    expected = v[:, :, allowed].mean(2, keepdim=True).expand_as(q)
    for per_key_mask in (allowed, allowed.view(1, 1, 1, 5).expand(2, 1, 1, 5)):
        key, value, bias, mask = FlexDiT._mean_value(Plan(), k, v, per_key_mask)
        assert key.shape[2] == 1 and mask is None
        torch.testing.assert_close(dense_attention(q, key, value, bias, attn_mask=mask), expected)
    per_query = allowed.expand(5, 5).clone()
    key, value, bias, mask = FlexDiT._mean_value(Plan(), k, v, per_query)
    torch.testing.assert_close(dense_attention(q, key, value, bias, attn_mask=mask), expected)


def test_the_default_pools_every_block_at_the_noisy_steps():
    """Every block at half the tokens at the first step, rising to all of them where the last quarter
    of the steps runs dense; without the run's step count (a bare transformer) it runs dense, and says so."""
    pipe = tiny_pipeline("sd3")
    with dit_accel.apply(pipe, dit_accel.FlexDiTConfig()) as handle:
        run(pipe, "sd3", num_inference_steps=8)
        report = handle.report()
    calls = _calls(report)
    assert [call["flexdit_density"] for call in calls] == pytest.approx([0.5 + 0.5 * s / 6 for s in range(6)] + [1, 1])
    assert sorted(calls[0]["flexdit_tokens_by_block"]) == list(range(len(pipe.transformer.transformer_blocks)))
    assert report["flops_ratio"] < 0.85
    transformer = pipe.transformer
    inputs = dict(hidden_states=torch.randn(1, 16, 32, 32), encoder_hidden_states=torch.randn(1, 8, 64),
                  pooled_projections=torch.randn(1, 64), timestep=torch.tensor([500.0]))
    with dit_accel.apply(transformer, dit_accel.FlexDiTConfig()) as handle, \
            pytest.warns(UserWarning, match="schedule needs the run's step count"):
        transformer(**inputs)
        assert handle.report()["flops_ratio"] == 1.0
