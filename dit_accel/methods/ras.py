"""Region-adaptive sampling (RAS, arXiv 2502.10389): recompute only the tokens in the model's focus.

After each step every image/video token is scored by how strongly the model output moves it (the
std or L2 norm of its output vector). At the next RAS step only the top `sample_ratio` tokens go
through the blocks; the others keep the previous step's output. Their attention keys and values
come from a per-layer cache filled at dense steps and refreshed with the fresh K/V of the computed
tokens at every RAS step, so computed tokens still attend to the whole image. Text tokens are always
recomputed. Dense warm-up steps and periodic dense "error reset" steps bound the drift.

Starvation: a token skipped k steps in a row has its score multiplied by exp(starvation_scale * k),
so tokens skipped many times become MORE likely to be recomputed (the official code raises the score
of often-dropped tokens and then drops the highest scores, the opposite of its own README).

The selection lives in transformer hooks, not in a scheduler, so any diffusers scheduler works.
Batches: every sample gets its own selection of the same size (static shapes), shared by its CFG
branches; families whose rotary tables are shared by the batch (Flux) share one selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attention.intercept import SDPA, AttentionCall
from ..config import AccelerationConfig, ConfigError, check_range
from ..metrics.flops import BlockWork
from ..models.base import gather_tokens, scatter_tokens
from ..runtime.context import StepContext
from ..runtime.technique import Technique
from ..runtime.token_subset import TokenSubset


@dataclass
class RASConfig(AccelerationConfig):
    """Region-adaptive sampling.

    Args:
        sample_ratio: fraction of image tokens recomputed at a RAS step (1.0 = dense).
        final_sample_ratio: if set, the ratio moves linearly from `sample_ratio` at the first RAS
            step to this value at the last step (the paper's dynamic ratio); None keeps it constant.
        warmup_steps: first steps that always run dense (the model's focus is not stable yet).
        error_reset_steps: steps that run dense to refresh outputs and the K/V cache.
        metric: "std" or "l2norm" of a token's output vector, the focus score.
        starvation_scale: strength of the push towards recomputing long-skipped tokens.
        cache_kv: attend to cached K/V of skipped tokens (True, as the paper) or to the computed
            tokens only (False).
    """

    sample_ratio: float = 0.5
    final_sample_ratio: float | None = None
    warmup_steps: int = 4
    error_reset_steps: tuple[int, ...] = (12, 22)
    metric: str = "std"
    starvation_scale: float = 0.1
    cache_kv: bool = True

    resources = frozenset({"image tokens"})
    name = "ras"

    def validate(self) -> None:
        check_range(self, "sample_ratio", 0.0, 1.0, low_open=True)
        if self.final_sample_ratio is not None:
            check_range(self, "final_sample_ratio", 0.0, 1.0, low_open=True)
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ConfigError(f"RASConfig.warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        self.error_reset_steps = tuple(self.error_reset_steps)
        if not all(isinstance(s, int) and s >= 0 for s in self.error_reset_steps):
            raise ConfigError(f"RASConfig.error_reset_steps must be step indices >= 0, got {self.error_reset_steps!r}")
        if self.metric not in ("std", "l2norm"):
            raise ConfigError(f"RASConfig.metric must be 'std' or 'l2norm', got {self.metric!r}")
        check_range(self, "starvation_scale", 0.0, 100.0)

    @classmethod
    def keep_all(cls) -> "RASConfig":
        return cls(sample_ratio=1.0)

    @classmethod
    def for_steps(cls, num_inference_steps: int, sample_ratio: float = 0.5, **overrides) -> "RASConfig":
        """The paper's schedule scaled to `num_inference_steps`: SD3 used 4 warm-up steps and dense
        resets at steps 12 and 22 of 30 (warm-up ~13%, resets at 40% and 73%)."""
        n = num_inference_steps
        warmup = max(1, round(0.13 * n))
        resets = tuple(sorted({s for s in (round(0.4 * n), round(0.73 * n)) if warmup < s < n}))
        return cls(**{"sample_ratio": sample_ratio, "warmup_steps": warmup, "error_reset_steps": resets, **overrides})

    @property
    def is_dense(self) -> bool:
        return self.sample_ratio >= 1.0 and (self.final_sample_ratio is None or self.final_sample_ratio >= 1.0)

    def ratio_at(self, step: int, num_steps: int | None) -> float:
        if self.final_sample_ratio is None or num_steps is None or num_steps - 1 <= self.warmup_steps:
            return self.sample_ratio
        progress = (step - self.warmup_steps) / (num_steps - 1 - self.warmup_steps)
        return self.sample_ratio + (self.final_sample_ratio - self.sample_ratio) * min(max(progress, 0.0), 1.0)

    def build(self, session):
        return RAS(self, session)


@dataclass
class _StepPlan:
    """The selection of one step, shared by all CFG branches of that step."""

    run_index: int
    step_index: int
    #: per sample (S, n) sorted token indices, or (n,) shared by the batch; None: dense step
    index: torch.Tensor | None


@dataclass
class RASState:
    """Everything RAS remembers between calls of one pipeline run."""

    run_index: int = -1
    #: per CFG branch: the last full per-token output (B_call, N, C')
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: per (branch, block, attention id): cached image-token keys and values (B, H, N, D)
    kv: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    #: per sample and token: steps skipped in a row
    skipped: torch.Tensor | None = None
    plan: _StepPlan | None = None
    #: per step: bool (samples, N) of the tokens computed, for pictures of what was skipped
    computed: dict[int, torch.Tensor] = field(default_factory=dict)

    def reset(self, run_index: int) -> None:
        self.__init__(run_index=run_index)


def _samples_view(tokens: torch.Tensor, cfg_batched: bool) -> torch.Tensor:
    """(branches, samples, ...) view of a call's batch: batched CFG holds two halves."""
    return tokens.unflatten(0, (2, -1)) if cfg_batched else tokens.unsqueeze(0)


class RAS(Technique):
    def __init__(self, config: RASConfig, session):
        super().__init__(config, session)
        self.state = RASState()
        self.subset = TokenSubset(session, "ras", self._call_index)
        #: image tokens the blocks computed in the call that just ended
        self._computed_tokens = 0

    # -- hooks ---------------------------------------------------------------------------------
    def attach(self) -> None:
        if not self.config.is_dense:
            self.subset.attach()

    def attention_core(self):
        return None if self.config.is_dense or not self.config.cache_kv else self._attend

    # -- selection -----------------------------------------------------------------------------
    def _is_ras_step(self, ctx: StepContext) -> bool:
        cfg = self.config
        return (not cfg.is_dense and ctx.step_index >= cfg.warmup_steps
                and ctx.step_index not in cfg.error_reset_steps)

    def _scores(self) -> torch.Tensor | None:
        """(samples, N) focus scores from the previous step's outputs of every CFG branch."""
        total = None
        for branch, tokens in self.state.outputs.items():
            score = tokens.float().std(dim=-1) if self.config.metric == "std" else tokens.float().norm(dim=-1)
            score = _samples_view(score, branch == "batched").sum(0)
            if total is not None and total.shape != score.shape:
                return None
            total = score if total is None else total + score
        return total

    def _plan(self, ctx: StepContext) -> _StepPlan:
        state = self.state
        if state.plan is not None and (state.plan.run_index, state.plan.step_index) == (ctx.run_index, ctx.step_index):
            return state.plan
        index = None
        num_tokens = ctx.call.grid.num_tokens
        keep = max(1, math.ceil(self.config.ratio_at(ctx.step_index, ctx.num_steps) * num_tokens - 1e-9))
        scores = self._scores() if self._is_ras_step(ctx) and keep < num_tokens else None
        if scores is not None and scores.shape[-1] == num_tokens:
            samples = scores.shape[0]
            if state.skipped is None or state.skipped.shape != scores.shape:
                state.skipped = torch.zeros_like(scores)
            scores = scores * torch.exp(self.config.starvation_scale * state.skipped)
            if not self.adapter.per_sample_positions:
                scores = scores.sum(0, keepdim=True)
            index = scores.topk(keep, dim=-1).indices.sort(dim=-1).values
            computed = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
            computed.scatter_(1, index, True)
            computed = computed.expand(samples, -1)
            state.skipped = torch.where(computed, torch.zeros_like(state.skipped), state.skipped + 1)
            state.computed[ctx.step_index] = computed.cpu()
            if not self.adapter.per_sample_positions:
                index = index[0]
        else:
            state.skipped = None
        state.plan = _StepPlan(ctx.run_index, ctx.step_index, index)
        return state.plan

    def _call_index(self, ctx: StepContext) -> torch.Tensor | None:
        """Index for this call's batch: per-sample rows repeated for both halves of batched CFG."""
        index = self._plan(ctx).index
        if ctx.branch not in self.state.outputs:
            return None
        if index is None or index.ndim == 1 or not ctx.cfg_batched:
            return index
        return torch.cat([index, index])

    # -- per call ------------------------------------------------------------------------------
    def on_call_start(self, ctx: StepContext) -> None:
        if ctx.run_index != self.state.run_index:
            self.state.reset(ctx.run_index)
        self.subset.begin_call(ctx)

    def on_call_end(self, ctx: StepContext, output: torch.Tensor) -> torch.Tensor:
        index = self.subset.active_index
        self.subset.end_call()
        self._computed_tokens = ctx.call.grid.num_tokens if index is None else index.shape[-1]
        tokens = self.adapter.output_to_tokens(output, ctx.call.grid)
        if index is not None:
            fresh = gather_tokens(tokens, index)
            tokens = scatter_tokens(self.state.outputs[ctx.branch], index, fresh)
            output = self.adapter.tokens_to_output(tokens, ctx.call.grid)
        if not self.config.is_dense:
            self.state.outputs[ctx.branch] = tokens
        return output

    def _attend(self, call: AttentionCall, query, key, value, next_sdpa: SDPA, **kwargs) -> torch.Tensor:
        """Keys/values of skipped image tokens come from the cache; computed ones refresh it."""
        ctx = self.session.context
        cache_key = (ctx.branch, call.block_index, call.attention_index)
        image = call.image_slice(key.shape[2])
        index = self.subset.active_index
        if index is None:
            self.state.kv[cache_key] = (key[:, :, image].clone(), value[:, :, image].clone())
            return next_sdpa(query, key, value, **kwargs)
        if cache_key not in self.state.kv:
            return next_sdpa(query, key, value, **kwargs)
        cached_k, cached_v = self.state.kv[cache_key]
        cached_k = scatter_tokens(cached_k, index, key[:, :, image], dim=2)
        cached_v = scatter_tokens(cached_v, index, value[:, :, image], dim=2)
        self.state.kv[cache_key] = (cached_k, cached_v)
        full_key = torch.cat([key[:, :, : image.start], cached_k, key[:, :, image.stop :]], dim=2)
        full_value = torch.cat([value[:, :, : image.start], cached_v, value[:, :, image.stop :]], dim=2)
        mask = kwargs.get("attn_mask")
        if mask is not None and mask.shape[-1] == key.shape[2]:
            image_columns = mask[..., image][..., :1].expand(*mask.shape[:-1], cached_k.shape[2])
            kwargs["attn_mask"] = torch.cat([mask[..., : image.start], image_columns, mask[..., image.stop :]], -1)
        return next_sdpa(query, full_key, full_value, **kwargs)

    # -- report --------------------------------------------------------------------------------
    def plan_work(self, ctx: StepContext, works: list[BlockWork]) -> list[BlockWork]:
        kept = self._computed_tokens
        if kept == ctx.call.grid.num_tokens:
            return works
        return [w.with_(image_tokens=kept, kv_image_tokens=w.kv_image_tokens if self.config.cache_kv else kept)
                for w in works]

    def call_stats(self, ctx: StepContext) -> dict[str, Any]:
        return {"image_tokens": self._computed_tokens, "total_image_tokens": ctx.call.grid.num_tokens}
