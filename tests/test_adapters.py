"""Model adapters of every family: geometry, token order, gather/scatter of rotary rows and masks, FLOPs.

The backbone is a permutation test: a technique that runs the blocks on a random permutation of ALL
image tokens (scattered back after the last block) must reproduce the untouched pipeline, because
attention is permutation-equivariant only when the rotary rows, masks and per-token modulations are
permuted with the tokens. The same technique with the tokens in order must be bit-identical.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import dit_accel
from dit_accel.config import AccelerationConfig, Stage
from dit_accel.metrics.flops import transformer_flops
from dit_accel.models import TokenGrid, adapter_for
from dit_accel.models.cogvideox import CogVideoXAdapter
from dit_accel.models.dit import DiTAdapter
from dit_accel.models.flux import FluxAdapter
from dit_accel.models.hunyuan_video import HunyuanVideoAdapter
from dit_accel.models.pixart import PixArtAdapter
from dit_accel.models.sd3 import SD3Adapter
from dit_accel.models.wan import WanAdapter
from dit_accel.runtime.call_state import TokenSelection
from dit_accel.runtime.registry import register_technique
from dit_accel.runtime.technique import Technique
from dit_accel.testing import FAMILIES, VIDEO_FAMILIES, tiny_call_kwargs, tiny_pipeline

STEPS = 3
ADAPTERS = {
    "sd3": SD3Adapter, "flux": FluxAdapter, "pixart": PixArtAdapter, "pixart_sigma": PixArtAdapter,
    "dit": DiTAdapter, "wan": WanAdapter, "hunyuan_video": HunyuanVideoAdapter, "cogvideox": CogVideoXAdapter,
}
# Small sizes keep the suite fast: 64x64 images (8x8 tokens), 9 frames of 64x64 video (3x4x4 tokens);
# DiT's size is fixed by its sample_size (16x16 tokens).
EXPECTED_GRID = {family: TokenGrid(3, 4, 4) if family in VIDEO_FAMILIES else TokenGrid(1, 8, 8) for family in FAMILIES}
EXPECTED_GRID["dit"] = TokenGrid(1, 16, 16)
# Variants whose positions / modulation / batch reach the blocks differently from the family default:
# name -> (family, transformer config overrides, call overrides).
VARIANTS = {
    # Wan 2.2 TI2V's `expand_timesteps`: one timestep per token (all equal in text-to-video)
    "wan_ti2v": ("wan", {}, {}),
    # two videos: per-sample rotary rows (B, n, 1, D) with a different permutation per sample
    "wan_batch2": ("wan", {}, {"num_videos_per_prompt": 2}),
    # CogVideoX-5b: rotary tables instead of sin-cos positions
    "cogvideox_rotary": ("cogvideox", {"use_rotary_positional_embeddings": True}, {}),
    # CogVideoX 1.5: rotary and temporal patches (the pipeline pads 3 latent frames to 4)
    "cogvideox_1_5": ("cogvideox", {"use_rotary_positional_embeddings": True, "patch_size_t": 2}, {}),
    # HunyuanVideo I2V blocks: the first-frame tokens are modulated apart
    "hunyuan_token_replace": ("hunyuan_video", {"image_condition_type": "token_replace"}, {}),
}


# ---------------------------------------------------------------- running pipelines


def _family(name: str) -> str:
    return VARIANTS[name][0] if name in VARIANTS else name


def _kwargs(name: str, **overrides) -> dict:
    family = _family(name)
    size = {} if family == "dit" else {"height": 64, "width": 64}
    latent = {} if family == "dit" else {"output_type": "latent"}  # DiTPipeline always decodes
    variant = VARIANTS[name][2] if name in VARIANTS else {}
    return tiny_call_kwargs(family, **{"num_inference_steps": STEPS, **size, **latent, **variant, **overrides})


@functools.cache
def _pipe(name: str):
    family, overrides, _ = VARIANTS.get(name, (name, {}, {}))
    pipe = tiny_pipeline(family, **overrides)
    if name == "wan_ti2v":
        pipe.register_to_config(expand_timesteps=True)
    return pipe


@dataclass
class Generation:
    output: torch.Tensor
    #: every transformer call's output, in call order
    calls: list[torch.Tensor]
    #: the first transformer call's (args, kwargs)
    first_call: tuple


def _generate(name: str, **overrides) -> Generation:
    pipe = _pipe(name)
    calls, first = [], []

    def pre(module, args, kwargs):
        if not first:
            first.append((args, dict(kwargs)))

    def post(module, args, kwargs, output):
        calls.append((output[0] if isinstance(output, tuple) else output.sample).clone())

    handles = [pipe.transformer.register_forward_pre_hook(pre, with_kwargs=True),
               pipe.transformer.register_forward_hook(post, with_kwargs=True)]
    try:
        out = pipe(**_kwargs(name, **overrides))
    finally:
        for handle in handles:
            handle.remove()
    images = out.frames if hasattr(out, "frames") else out.images
    return Generation(torch.as_tensor(images).float(), calls, first[0])


@functools.cache
def _baseline(name: str) -> Generation:
    return _generate(name)


def _assert_close(result: Generation, baseline: Generation, rtol: float = 1e-4) -> None:
    assert len(result.calls) == len(baseline.calls)
    for got, want in zip(result.calls + [result.output], baseline.calls + [baseline.output]):
        assert got.shape == want.shape
        scale = want.abs().max().item() + 1e-6
        assert (got - want).abs().max().item() <= rtol * scale, (got - want).abs().max().item() / scale


def _assert_equal(result: Generation, baseline: Generation) -> None:
    assert len(result.calls) == len(baseline.calls)
    assert all(torch.equal(a, b) for a, b in zip(result.calls, baseline.calls))
    assert torch.equal(result.output, baseline.output)


# ---------------------------------------------------------------- a permuting technique


@dataclass(frozen=True)
class PermuteConfig(AccelerationConfig):
    """mode: "shuffle" (a random permutation per call and sample), "in_order", "first_frame_first"."""

    mode: str = "shuffle"
    calls: list = field(default_factory=list)
    name = "permute"

    def stages(self):
        return frozenset({Stage.TOKEN_SET})


@register_technique(PermuteConfig, "test: blocks run on all image tokens in a random order")
class _Permute(Technique):
    """Runs the blocks on all image tokens in a random order; the scatter after the last block undoes it."""

    def __init__(self, config, session):
        super().__init__(config, session)
        self.generator = torch.Generator().manual_seed(1234)

    def _order(self, grid: TokenGrid) -> torch.Tensor:
        n = grid.num_tokens
        if self.config.mode == "in_order":
            return torch.arange(n)
        if self.config.mode == "first_frame_first":  # shuffle within the first frame and within the rest
            first = grid.rows * grid.cols
            return torch.cat([torch.randperm(first, generator=self.generator),
                              first + torch.randperm(n - first, generator=self.generator)])
        return torch.randperm(n, generator=self.generator)

    def begin_call(self, call_state):
        self.config.calls.append(call_state.ctx.step_index)
        if self.adapter.per_sample_positions:
            index = torch.stack([self._order(call_state.grid) for _ in range(call_state.batch)])
        else:
            index = self._order(call_state.grid)
        call_state.tokens = TokenSelection(index, call_state.grid)


# ---------------------------------------------------------------- 1. geometry and token order


def _final_linear(transformer: nn.Module) -> nn.Linear:
    return transformer.proj_out_2 if hasattr(transformer, "proj_out_2") else transformer.proj_out


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_geometry_and_token_order(family):
    pipe = _pipe(family)
    adapter = adapter_for(pipe.transformer)
    assert type(adapter) is ADAPTERS[family]
    assert adapter.family == ("pixart" if family == "pixart_sigma" else family)
    assert family in dit_accel.supported_families() or family == "pixart_sigma"

    args, kwargs = _baseline(family).first_call
    info = adapter.call_info(args, kwargs)
    grid = EXPECTED_GRID[family]
    assert info.grid == grid
    latents = info.latents
    # the grid covers the latents exactly: tokens x patch volume x channels == latent elements
    assert grid.num_tokens * math.prod(adapter.patch_size()) * pipe.transformer.config.in_channels == latents[0].numel()
    assert info.batch_size == latents.shape[0]
    assert info.text_tokens == (0 if family == "dit" else kwargs["encoder_hidden_states"].shape[1])

    blocks = adapter.blocks()
    assert blocks and all(adapter.self_attentions(block) for block in blocks)
    for block in blocks:
        linears = {name for name, m in block.named_modules() if isinstance(m, nn.Linear)}
        assert set(adapter.linear_streams(block)) == linears
        attentions = {id(m) for m in block.modules() if hasattr(m, "to_q")}
        assert {id(attn) for attn, _, _ in adapter.attention_streams(block)} == attentions
        for attention in adapter.self_attentions(block):
            assert adapter.attention_layout(block, attention) in ("image_text", "text_image", "image")

    # output <-> tokens is a bijection on the output shape
    output = _baseline(family).calls[0]
    x = torch.randn(output.shape, generator=torch.Generator().manual_seed(0))
    tokens = adapter.output_to_tokens(x, grid)
    assert tokens.shape[:2] == (output.shape[0], grid.num_tokens)
    assert torch.equal(adapter.tokens_to_output(tokens, grid), x)

    # ... and its token order is the blocks' order: mark each token at the model's last linear
    def mark(module, inputs, out):
        n = out.shape[1]
        return torch.arange(n, dtype=out.dtype).view(1, n, 1).expand_as(out).clone()

    handle = _final_linear(pipe.transformer).register_forward_hook(mark)
    try:
        with torch.no_grad():
            marked = pipe.transformer(*args, **{**kwargs, "return_dict": False})[0]
    finally:
        handle.remove()
    tokens = adapter.output_to_tokens(marked, grid)
    assert torch.equal(tokens, torch.arange(grid.num_tokens, dtype=tokens.dtype).view(1, -1, 1).expand_as(tokens))


# ---------------------------------------------------------------- 2. gather/scatter


@pytest.mark.parametrize("name", list(FAMILIES) + list(VARIANTS))
def test_permuted_tokens_reproduce_the_baseline(name):
    pipe = _pipe(name)
    baseline = _baseline(name)
    mode = "first_frame_first" if name == "hunyuan_token_replace" else "shuffle"
    config = PermuteConfig(mode=mode)
    with dit_accel.apply(pipe, config):
        result = _generate(name)
    assert len(config.calls) == len(baseline.calls)
    if name == "wan_batch2":
        assert baseline.calls[0].shape[0] == 2
    _assert_close(result, baseline)


@pytest.mark.parametrize("name", list(FAMILIES) + ["cogvideox_rotary"])
def test_all_tokens_in_order_is_bit_identical(name):
    pipe = _pipe(name)
    with dit_accel.apply(pipe, PermuteConfig(mode="in_order")):
        result = _generate(name)
    _assert_equal(result, _baseline(name))


def test_shared_positions_refuse_per_sample_subsets():
    for name in ("hunyuan_video", "cogvideox_rotary"):
        adapter = adapter_for(_pipe(name).transformer)
        assert not adapter.per_sample_positions
        with pytest.raises(ValueError, match="shared by the batch"):
            adapter.gather_rotary((torch.zeros(48, 16), torch.zeros(48, 16)), torch.zeros(2, 5, dtype=torch.long), 0)
    assert adapter_for(_pipe("cogvideox").transformer).per_sample_positions  # sin-cos positions: per sample ok


def test_hunyuan_mask_keeps_text_columns():
    adapter = adapter_for(_pipe("hunyuan_video").transformer)
    mask = torch.tensor([[True] * 6 + [True, True, False]]).view(1, 1, 1, 9)
    mask[..., 2] = False  # an image column that must move with its token
    gathered = adapter.gather_mask(mask, torch.tensor([5, 2, 0]), text_tokens=3)
    assert gathered.view(-1).tolist() == [True, False, True, True, True, False]


def test_wan_per_token_timesteps_are_permuted_with_the_tokens():
    """Wan 2.2 TI2V: the conditioning frame's tokens have timestep 0, the others t (per-token modulation)."""
    transformer = _pipe("wan").transformer
    args, kwargs = _baseline("wan").first_call
    grid = EXPECTED_GRID["wan"]
    timestep = torch.full((1, grid.num_tokens), 900.0)
    timestep[:, : grid.rows * grid.cols] = 0.0
    kwargs = {**kwargs, "timestep": timestep, "return_dict": False}
    info = adapter_for(transformer).call_info(args, kwargs)
    assert info.timestep.tolist() == [900.0]  # the noise level of the generated frames
    with torch.no_grad():
        baseline = transformer(*args, **kwargs)[0]
        config = PermuteConfig()
        with dit_accel.apply(transformer, config):
            permuted = transformer(*args, **kwargs)[0]
    assert len(config.calls) == 1
    assert (permuted - baseline).abs().max() <= 1e-4 * baseline.abs().max()


def test_wan_gathers_per_sample_rotary_rows_and_per_token_modulation():
    adapter = adapter_for(_pipe("wan").transformer)
    block = adapter.blocks()[0]
    temb = torch.randn(2, 6, 6, 4)
    rotary = (torch.randn(1, 6, 1, 8), torch.randn(1, 6, 1, 8))
    index = torch.tensor([[5, 0], [1, 3]])
    bound = adapter.gather_block_inputs(block, {"hidden_states": torch.randn(2, 6, 4), "temb": temb,
                                                "rotary_emb": rotary}, index, 0, gather_hidden=True)
    assert torch.equal(bound["temb"][1, 1], temb[1, 3])
    assert bound["rotary_emb"][0].shape == (2, 2, 1, 8) and torch.equal(bound["rotary_emb"][0][1, 0], rotary[0][0, 1])


def test_hunyuan_token_replace_counts_the_kept_first_frame_tokens():
    adapter = adapter_for(_pipe("hunyuan_token_replace").transformer)
    block = adapter.blocks()[0]
    bound = {"hidden_states": torch.randn(1, 48, 4), "num_tokens": 16}
    gathered = adapter.gather_block_inputs(block, bound, torch.tensor([0, 3, 20, 30]), 0, gather_hidden=True)
    assert gathered["num_tokens"] == 2 and gathered["hidden_states"].shape == (1, 4, 4)
    with pytest.raises(ValueError, match="first-frame tokens first"):
        adapter.gather_block_inputs(block, bound, torch.tensor([20, 0]), 0, gather_hidden=True)


# ---------------------------------------------------------------- 3. RAS on every family


RAS_HALF = dict(sample_ratio=0.5, warmup_steps=1, error_reset_steps=())


@pytest.mark.parametrize("name", list(FAMILIES) + list(VARIANTS))
def test_ras_on_every_family(name):
    pipe = _pipe(name)
    baseline = _baseline(name)
    with dit_accel.apply(pipe, dit_accel.RASConfig.keep_all()):
        _assert_equal(_generate(name), baseline)

    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF)) as handle:
        result = _generate(name)
        report = handle.report()
    assert torch.isfinite(result.output).all()
    n = EXPECTED_GRID[_family(name)].num_tokens
    if name == "cogvideox_1_5":
        n = 2 * 4 * 4  # 3 latent frames padded to 4, patched by 2 in time
    assert len(report["steps"]) == STEPS
    for step in report["steps"]:
        expected = n if step["step"] < 1 else math.ceil(n / 2)
        assert step["calls"] and all(call["image_tokens"] == expected for call in step["calls"])
        assert all(call["total_image_tokens"] == n for call in step["calls"])
        assert (step["flops_ratio"] == 1.0) if step["step"] < 1 else (step["flops_ratio"] < 1.0)
    assert report["flops_ratio"] < 1.0


def test_ras_on_wan22_two_experts():
    """Each expert has its own session (RAS state, K/V cache); they share the step count."""
    pipe = tiny_pipeline("wan", two_transformers=True)
    with dit_accel.apply(pipe, dit_accel.RASConfig(**RAS_HALF)) as handle:
        out = pipe(**_kwargs("wan", num_inference_steps=4)).frames
        report = handle.report()
    n = EXPECTED_GRID["wan"].num_tokens
    assert torch.isfinite(out).all()
    assert [len(session.records) for session in handle.sessions] == [4, 4]  # 2 steps x (cond, uncond) each
    assert [step["step"] for step in report["steps"]] == [0, 1, 2, 3]
    assert all(call["image_tokens"] in (n, math.ceil(n / 2)) for step in report["steps"] for call in step["calls"])
    for session in handle.sessions:
        assert any(record.stats["image_tokens"] == math.ceil(n / 2) for record in session.records)
    assert report["flops_ratio"] < 1.0


# ---------------------------------------------------------------- 4. FLOPs by hand


def test_flops_sd3_joint_attention_by_hand():
    transformer = _pipe("sd3").transformer
    c = transformer.config
    d = c.num_attention_heads * c.attention_head_dim  # 64; text is projected to the same width
    assert c.caption_projection_dim == d
    batch, n, t = 2, 64, 30
    total = 0
    for layer in range(c.num_layers):
        last = layer == c.num_layers - 1  # context_pre_only: no text output projection nor text MLP
        pooled = 2 * d * 6 * d + 2 * d * (2 * d if last else 6 * d)  # norm1.linear, norm1_context.linear
        image = 2 * n * (4 * d * d + 2 * d * 4 * d)  # q, k, v, out; ff d -> 4d -> d
        text = 2 * t * (3 * d * d + (0 if last else d * d + 2 * d * 4 * d))  # add_q/k/v; to_add_out, ff_context
        attention = 4 * d * (n + t) ** 2
        total += pooled + image + text + attention
    assert transformer_flops(adapter_for(transformer), batch, n, t) == batch * total


def test_flops_pixart_cross_attention_by_hand():
    transformer = _pipe("pixart").transformer
    c = transformer.config
    d = c.num_attention_heads * c.attention_head_dim  # 64
    cross = c.cross_attention_dim  # 64
    batch, n, t = 2, 64, 30
    self_attention = 2 * n * 4 * d * d + 4 * d * n * n
    cross_attention = 2 * n * 2 * d * d + 2 * t * 2 * cross * d + 4 * d * n * t  # q, out; k, v; scores
    mlp = 2 * n * 2 * d * 4 * d
    expected = batch * c.num_layers * (self_attention + cross_attention + mlp)
    assert transformer_flops(adapter_for(transformer), batch, n, t) == expected
