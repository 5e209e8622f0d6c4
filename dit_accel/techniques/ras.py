"""Region-adaptive sampling (RAS, arXiv 2502.10389): recompute only the tokens in the model's focus.

After each step every image/video token is scored by how strongly the model output moves it (the
std or L2 norm of its output vector). At the next RAS step only the top `sample_ratio` tokens go
through the blocks (stage 2); the others keep the previous step's output. Their attention keys and
values come from a per-layer cache filled at dense steps and refreshed with the fresh K/V of the
computed tokens at every RAS step (stage 5), so computed tokens still attend to the whole image.
That cache is the big state (50 GiB for Wan 14B at 480p under CFG in bf16): `kv_cache` keeps it in fp8
(half) or in host memory instead.
Text tokens are always recomputed. Dense warm-up steps and periodic dense "error reset" steps bound
the drift.

Starvation: a token skipped k steps in a row has its score multiplied by exp(starvation_scale * k),
so tokens skipped many times become MORE likely to be recomputed (the official code raises the score
of often-dropped tokens and then drops the highest scores, the opposite of its own README).

The selection lives in transformer hooks, not in a scheduler, so any diffusers scheduler works.
Batches: every sample gets its own selection of the same size (static shapes), shared by its CFG
branches and by extra calls of the step on the samples alone (skip-layer guidance's third call has
batch B beside the batched call's 2B); families whose rotary tables are shared by the batch (Flux)
share one selection. A call reuses its branch's output of the step before; a branch that did not run
then (skip-layer guidance starts after the first steps) runs dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..attention.intercept import AttentionCall, borrowed_inputs, resize_key_mask
from ..config import AccelerationConfig, ConfigError, Stage, param
from ..tokens import gather_tokens, scatter_tokens
from ..runtime.context import StepContext
from ..runtime.call_state import CallState, TokenSelection
from ..runtime.estimate import CallShapes, attention_shapes
from ..runtime.registry import register_technique
from ..runtime.search_space import SearchContext, Setting
from ..runtime.stats import Stat, StatKind
from ..runtime.storage import StateStorage, StoredTensor, stored_bytes
from ..runtime.technique import Technique


@dataclass(frozen=True)
class RASConfig(AccelerationConfig):
    """Region-adaptive sampling: the image tokens outside the model's focus keep their last output."""

    sample_ratio: float = param(0.5, "fraction of image tokens recomputed at a RAS step (1.0 runs the machinery "
                                     "on every token)", low=0.0, high=1.0, low_open=True)
    final_sample_ratio: float | None = param(None, "if set, the ratio moves linearly from sample_ratio at the first "
                                                   "RAS step to this at the last (the paper's dynamic ratio)",
                                             low=0.0, high=1.0, low_open=True)
    warmup_steps: int = param(4, "first steps that always run dense (the model's focus is not stable yet)", low=0)
    error_reset_steps: tuple[int, ...] = param((12, 22), "steps that run dense to refresh outputs and the K/V "
                                                         "cache", low=0)
    metric: Literal["std", "l2norm"] = param("std", "focus score of a token: std or L2 norm of its output vector")
    starvation_scale: float = param(0.1, "strength of the push towards recomputing long-skipped tokens",
                                    low=0.0, high=100.0)
    cache_kv: bool = param(True, "attend to cached K/V of skipped tokens (the paper) rather than to the computed "
                                 "tokens only")
    kv_cache: StateStorage = param("device", "form of the K/V cache: 'device' (the dense call's own K/V, exact), "
                                             "'fp8' (e4m3, a scale per sample and head: half of bf16's bytes; "
                                             "on the tiny models it moves the latents by under 0.1% mean abs, "
                                             "at most 1% of what RAS itself moves them), "
                                             "'host' (host memory, pinned on CUDA, each block's entry copied back "
                                             "while the block before runs; exact)")

    name = "ras"

    def validate(self) -> None:
        if self.final_sample_ratio is not None and self.sample_ratio >= 1.0 and self.final_sample_ratio < 1.0:
            raise ConfigError("RASConfig.final_sample_ratio needs sample_ratio < 1 to move from")

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.TOKEN_SET, Stage.KV_SOURCE} if self.cache_kv else {Stage.TOKEN_SET})

    @classmethod
    def keep_all(cls) -> "RASConfig":
        """Every step after the first runs the whole machinery (selection, gather/scatter, K/V cache,
        output merge) on every token: equal to dense."""
        return cls(sample_ratio=1.0, warmup_steps=0, error_reset_steps=())

    @classmethod
    def for_steps(cls, num_inference_steps: int, sample_ratio: float = 0.5, **overrides) -> "RASConfig":
        """The paper's schedule scaled to `num_inference_steps`: SD3 used 4 warm-up steps and dense
        resets at steps 12 and 22 of 30 (warm-up ~13%, resets at 40% and 73%)."""
        n = num_inference_steps
        warmup = max(1, round(0.13 * n))
        resets = tuple(sorted({s for s in (round(0.4 * n), round(0.73 * n)) if warmup < s < n}))
        return cls(**{"sample_ratio": sample_ratio, "warmup_steps": warmup, "error_reset_steps": resets, **overrides})

    def ratio_at(self, step: int, num_steps: int | None) -> float:
        if self.final_sample_ratio is None or num_steps is None or num_steps - 1 <= self.warmup_steps:
            return self.sample_ratio
        progress = (step - self.warmup_steps) / (num_steps - 1 - self.warmup_steps)
        return self.sample_ratio + (self.final_sample_ratio - self.sample_ratio) * min(max(progress, 0.0), 1.0)


@dataclass
class _StepSelection:
    """The selection of one step, shared by all CFG branches of that step."""

    run_index: int
    step_index: int
    #: per sample (S, n) sorted token indices, or (n,) shared by the batch; None: dense step
    index: torch.Tensor | None
    #: samples S of the step (a call holds S, or 2S under batched CFG)
    samples: int
    #: the step whose outputs this one reuses (the last one that wrote any), -1 for none
    previous: int


@dataclass
class RASState:
    """Everything RAS remembers between calls of one pipeline run (freed when the run ends)."""

    run_index: int = -1
    #: per branch slot: the last full per-token output (B_call, N, C'), and the step that wrote it
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    output_steps: dict[str, int] = field(default_factory=dict)
    #: per (slot, block, attention id): the keys and values (B, H, S, D) of the last dense call, text
    #: included, in `kv_cache` form, refreshed with every computed token
    kv: dict[tuple, tuple[StoredTensor, StoredTensor]] = field(default_factory=dict)
    #: the entry a call of the slot reads after each one, from `(slot,)`, in the order the slot's last dense
    #: call filled them: what to prefetch next from host memory
    kv_next: dict[tuple, tuple] = field(default_factory=dict)
    #: per sample and token: steps skipped in a row
    skipped: torch.Tensor | None = None
    selection: _StepSelection | None = None


def _per_sample(tokens: torch.Tensor, samples: int) -> torch.Tensor | None:
    """(branches, samples, ...) view of a call's batch of `samples` or of both CFG halves of them
    (None: neither)."""
    if tokens.shape[0] == samples:
        return tokens.unsqueeze(0)
    return tokens.unflatten(0, (2, samples)) if tokens.shape[0] == 2 * samples else None


#: an fp8 K/V cache keeps one scale per (sample, head) of its (B, H, S, D) tensors
_KV_SCALE_DIMS = (2, 3)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B, S, H, D) view."""
    return x.transpose(1, 2)


def _writable(x: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, D) tensor stored as (B, H, S, D) or (B, S, H, D), the processors' two layouts: the
    call's own tensor when it already is (it is not read again), else a copy."""
    return x if x.is_contiguous() or _rows(x).is_contiguous() else x.contiguous()


def _kept(x: torch.Tensor) -> torch.Tensor:
    """A dense call's key or value to keep past the call: `_writable`, and a copy where a compiled graph owns
    the call's tensors (it reuses their memory once the call returns)."""
    x = _writable(x)
    return torch.empty_like(x).copy_(x) if borrowed_inputs() else x


def _row_view(x: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(rows, D) view of a `_writable` tensor, and whether its rows run over heads before tokens."""
    if x.is_contiguous():
        return x.view(-1, x.shape[-1]), True
    return _rows(x).view(-1, x.shape[-1]), False


def search_space(context: SearchContext) -> list[Setting]:
    """What `tune` tries: the paper's schedule at three ratios; the last (0.25), while it holds, goes on
    at 0.6 times its ratio, down to 0.05."""

    def ras(ratio: float) -> Setting:
        return Setting(f"ras:sample_ratio={ratio:.3g}", (RASConfig.for_steps(context.steps, sample_ratio=ratio),),
                       knob="ras", bolder=lambda: ras(ratio * 0.6) if ratio * 0.6 >= 0.05 else None)

    return [ras(ratio) for ratio in (0.75, 0.5, 0.25)]


@register_technique(RASConfig, "region-adaptive sampling: recompute only the image tokens in the model's focus",
                    search_space=search_space)
class RAS(Technique):
    #: where a processor never calls torch's SDPA, RAS is its `cache_kv=False` self there: the computed tokens
    #: attend to each other and the text (`report()["notes"]` says where)
    kv_source_optional = True
    stats = (Stat("image_tokens", StatKind.VALUE), Stat("total_image_tokens", StatKind.VALUE),
             Stat("computed_tokens", StatKind.TOKEN_SET, "RAS: how often each region was recomputed", grid="grid"),
             Stat("grid", StatKind.DETAIL))

    def __init__(self, config: RASConfig, session):
        super().__init__(config, session)
        self.state = RASState()
        #: per step of the last run: bool (samples, N) of the tokens computed, for pictures of what was skipped
        self.computed: dict[int, torch.Tensor] = {}
        #: (cache geometry, rows of the computed tokens in a (rows, D) view of the K/V cache) of the running call
        self._kv_rows: tuple | None = None
        #: the K/V entry the running call filled last (`(slot,)` before its first): links `RASState.kv_next`
        self._filled_kv: tuple = ()

    # -- selection -----------------------------------------------------------------------------
    def _is_ras_step(self, ctx: StepContext) -> bool:
        return ctx.step_index >= self.config.warmup_steps and ctx.step_index not in self.config.error_reset_steps

    def _scores(self, samples: int, previous: int) -> tuple[torch.Tensor | None, int]:
        """((samples, N) focus scores summed over the outputs every branch wrote at step `previous`,
        or None; the output elements read)."""
        total, read = None, 0
        for slot, tokens in self.state.outputs.items():
            branches = _per_sample(tokens, samples)
            if self.state.output_steps.get(slot) != previous or branches is None:
                continue
            score = branches.float().std(dim=-1) if self.config.metric == "std" else branches.float().norm(dim=-1)
            total = score.sum(0) if total is None else total + score.sum(0)
            read += tokens.numel()
        return total, read

    def _select(self, call_state: CallState) -> _StepSelection:
        ctx, state = call_state.ctx, self.state
        if state.selection is not None and (state.selection.run_index, state.selection.step_index) == \
                (ctx.run_index, ctx.step_index):
            return state.selection
        index = None
        num_tokens = ctx.call.grid.num_tokens
        keep = max(1, math.ceil(self.config.ratio_at(ctx.step_index, ctx.num_steps) * num_tokens - 1e-9))
        samples = ctx.call.batch_size // 2 if ctx.cfg_batched else ctx.call.batch_size
        previous = max((s for s in state.output_steps.values() if s < ctx.step_index), default=-1)
        scores, read = self._scores(samples, previous) if self._is_ras_step(ctx) else (None, 0)
        if scores is not None and scores.shape[-1] == num_tokens:
            call_state.record_overhead("ras scoring", 3.0 * read, num_tokens)
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
            self.computed[ctx.step_index] = computed
            if not self.adapter.per_sample_positions:
                index = index[0]
        else:
            state.skipped = None
        state.selection = _StepSelection(ctx.run_index, ctx.step_index, index, samples, previous)
        return state.selection

    def _call_index(self, call_state: CallState) -> torch.Tensor | None:
        """Index for this call's batch: per-sample rows, repeated for both halves of batched CFG; None
        (dense) where the branch has no output of the previous step to merge into."""
        selection = self._select(call_state)
        index, ctx, state = selection.index, call_state.ctx, self.state
        if index is None or state.output_steps.get(ctx.slot) != selection.previous:
            return None
        batch = ctx.call.batch_size
        if state.outputs[ctx.slot].shape[0] != batch or batch not in (selection.samples, 2 * selection.samples):
            return None
        return index if index.ndim == 1 or batch == selection.samples else torch.cat([index, index])

    # -- per call ------------------------------------------------------------------------------
    def begin_call(self, call_state: CallState) -> None:
        if call_state.ctx.run_index != self.state.run_index:
            self.state = RASState(run_index=call_state.ctx.run_index)
            self.computed = {}
        index = self._call_index(call_state)
        call_state.tokens = None if index is None else TokenSelection(index, call_state.grid)
        self._kv_rows = None
        self._filled_kv = (call_state.ctx.slot,)
        if call_state.tokens is not None:
            self._prefetch_kv(self._filled_kv)

    def end_call(self, call_state: CallState, output: torch.Tensor) -> torch.Tensor:
        ctx = call_state.ctx
        tokens = self.adapter.output_to_tokens(output, ctx.call.grid)
        if call_state.tokens is not None:
            fresh = gather_tokens(tokens, call_state.tokens.index)
            tokens = scatter_tokens(self.state.outputs[ctx.slot], call_state.tokens.index, fresh)
            output = self.adapter.tokens_to_output(tokens, ctx.call.grid)
        self.state.outputs[ctx.slot] = tokens
        self.state.output_steps[ctx.slot] = ctx.step_index
        self._kv_rows = None
        return output

    def end_run(self) -> None:
        self.state = RASState(run_index=self.state.run_index)
        self._kv_rows = None

    def state_bytes(self) -> int:
        outputs = sum(t.numel() * t.element_size() for t in self.state.outputs.values())
        return outputs + sum(stored.nbytes() for kv in self.state.kv.values() for stored in kv)

    def estimate_bytes(self, shapes: CallShapes) -> dict[str, int]:
        """Every branch's last output, and one K/V entry per self-attention and branch in `kv_cache` form."""
        estimate = {"outputs": shapes.samples * shapes.tokens * shapes.output_channels * shapes.itemsize}
        if not self.config.cache_kv:
            return estimate
        for attention in attention_shapes(self.adapter):
            numel = shapes.samples * attention.heads * attention.keys(shapes) * attention.head_dim
            scales = shapes.samples * attention.heads
            kind, held = stored_bytes("kv_cache", numel, shapes.itemsize, self.config.kv_cache, scales)
            estimate[kind] = estimate.get(kind, 0) + 2 * held  # keys and values
        return estimate

    def smaller_forms(self) -> list[str]:
        """The K/V cache forms that hold less on the device than the configured one."""
        if not self.config.cache_kv:
            return []
        texts = {"fp8": "RASConfig(kv_cache='fp8'): the K/V cache at one byte an element",
                 "host": "RASConfig(kv_cache='host'): the K/V cache in host memory"}
        cheaper = {"device": ("fp8", "host"), "fp8": ("host",), "host": ()}[self.config.kv_cache]
        return [texts[form] for form in cheaper]

    # -- stage 5: keys and values of the tokens not computed -----------------------------------------
    def kv_source(self, call_state: CallState, call: AttentionCall, query, key, value, attn_mask):
        """Keys/values of skipped image tokens come from the cache; computed ones (and the text) refresh
        it. In "device" form the cache is the last dense call's own key/value tensors, written into in
        place from then on, so neither a dense nor a RAS step copies or concatenates whole key sets; the
        other forms load a copy, write into it and save it back."""
        cache_key = (call_state.ctx.slot, call.block_index, call.attention_index)
        tokens = call_state.tokens
        if tokens is None:
            self._fill_kv(cache_key, key, value)
            return key, value, None, attn_mask
        stored = self.state.kv.get(cache_key)
        if stored is not None and stored[0].shape[1] != key.shape[1]:
            # stage 4 changed the heads since the cache was filled (DyDiT's next bucket): the computed
            # tokens attend to each other until the next dense call fills it again
            del self.state.kv[cache_key]
            stored = None
        if stored is None:
            return key, value, None, attn_mask
        cached = tuple(_writable(entry.load()) for entry in stored)
        self._prefetch_kv(cache_key)
        length = cached[0].shape[2]
        cached_image = call.image_slice(length)
        fresh_image = call.image_slice(key.shape[2])
        for cache, fresh in zip(cached, (key, value)):
            rows, heads_first = _row_view(cache)
            index = self._kv_index(tokens, cache, cached_image.start, heads_first)
            part = fresh[:, :, fresh_image]
            part = part.reshape(-1, part.shape[-1]) if heads_first else _rows(part).reshape(-1, part.shape[-1])
            rows.index_copy_(0, index, part)
            if cached_image.start:
                cache[:, :, : cached_image.start].copy_(fresh[:, :, : fresh_image.start])
            if cached_image.stop < length:
                cache[:, :, cached_image.stop:].copy_(fresh[:, :, fresh_image.stop:])
        for entry, cache in zip(stored, cached):
            entry.save(cache)
        attn_mask = resize_key_mask(attn_mask, key.shape[2], fresh_image, cached_image.stop - cached_image.start)
        return cached[0], cached[1], None, attn_mask

    def _fill_kv(self, cache_key: tuple, key: torch.Tensor, value: torch.Tensor) -> None:
        """A dense call's keys and values become the cache entry (into the entry's host buffers, where it has
        them), linked after the entry the call filled before."""
        stored = self.state.kv.get(cache_key)
        if stored is None:
            self.state.kv[cache_key] = tuple(StoredTensor(_kept(t), self.config.kv_cache, _KV_SCALE_DIMS)
                                             for t in (key, value))
        else:
            for entry, tensor in zip(stored, (key, value)):
                entry.save(_kept(tensor))
        self.state.kv_next[self._filled_kv] = cache_key
        self._filled_kv = cache_key

    def _prefetch_kv(self, after: tuple) -> None:
        """Start bringing back the entry read after `after` ("host" form: it copies while this block runs)."""
        for entry in self.state.kv.get(self.state.kv_next.get(after), ()):
            entry.prefetch()

    def _kv_index(self, tokens: TokenSelection, cache: torch.Tensor, offset: int, heads_first: bool) -> torch.Tensor:
        """Rows of the computed tokens in a (rows, D) view of a (B, H, S, D) cache, for the call."""
        batch, heads, length = cache.shape[:3]
        memo = (batch, heads, length, offset, heads_first)
        if self._kv_rows is None or self._kv_rows[0] != memo:
            index = tokens.index if tokens.index.ndim == 2 else tokens.index.unsqueeze(0).expand(batch, -1)
            b = torch.arange(batch, device=index.device).view(batch, 1, 1)
            h = torch.arange(heads, device=index.device).view(1, heads, 1)
            position = (index + offset).unsqueeze(1)  # (B, 1, n)
            rows = (b * heads + h) * length + position if heads_first else \
                ((b * length + position) * heads + h).transpose(1, 2)  # (B, n, H): the rows layout's order
            self._kv_rows = (memo, rows.reshape(-1))
        return self._kv_rows[1]

    # -- report --------------------------------------------------------------------------------
    def call_stats(self, call_state: CallState) -> dict[str, Any]:
        """Token counts, and which tokens of the first sample were computed (None: all; a device tensor
        until `report()`), for the UI."""
        total = call_state.grid.num_tokens
        computed = None
        if call_state.tokens is not None:
            computed = call_state.tokens.index if call_state.tokens.shared else call_state.tokens.index[0]
        return {"image_tokens": total if call_state.tokens is None else call_state.tokens.count, "total_image_tokens": total,
                "computed_tokens": computed, "grid": [call_state.grid.frames, call_state.grid.rows, call_state.grid.cols]}
