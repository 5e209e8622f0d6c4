"""FlexDiT token density (after FlexDiT / SparseDiT, arXiv 2412.06028), training-free.

Image tokens are pooled into groups over windows of `pool_frames` x `pool_size` x `pool_size`
tokens of the grid, in two places, as densely as the temporal schedule says:

- Sparse-dense blocks (stage 3, `sparse_blocks`): every block of the range runs on the groups' mean
  tokens, with rotary tables at the groups' mean positions, and each token gets its group's change
  back at the block's exit (`runtime/token_transform.py`). Text tokens are never pooled.
- Pooled K/V (stage 5, `pooled_kv_blocks`): in the first blocks every self-attention attends to the
  image keys and values pooled into groups, each pooled key biased by log(its group's size) so that
  the softmax weighs it as the keys it stands for; text keys are never pooled, queries stay exact.
  Where every key carries the same bias (windows that tile the grid, no text keys: Wan) it cancels in
  the softmax and is left out, so the dense kernel runs without a mask (flash on CUDA).
  `bottom_attention="mean_v"` is the paper's Poolingformer instead: a uniform attention, every
  query gets the mean of all values (image and text; one zero key stands for them all).
  In a block that runs on pooled tokens the keys are pooled already and are not pooled again (the
  runtime cannot place them; at one token per group they are the tokens and are pooled as usual).
- The schedule: a step's density d gives M = round(d * n) groups over the n image tokens present,
  at least ceil(n / window size) (the number of windows on the full grid) and at most n. `schedule`
  None: full windows at every step; (start, end): linear from `start` at the noisiest step to `end`
  where the last `dense_fraction` of the steps begins, and those run dense (nothing pooled); a longer
  tuple: each step's density, 1.0 = dense. A schedule runs dense when the run's step count is unknown.

Fine-tuned (`adapters`, from `dit_accel.finetune`): LoRA adapters on the pooled blocks and the blocks next
to them, trained (as peft LoRA layers) by self-distillation for this config on this model. They run
merged, each adapted linear on a copy of its weight plus B A, held while applied (`adapter_weights`):
a plain linear's cost, the model's own weights untouched; only at the steps that pool (a dense step
runs the model as it is).

Groups: on the full grid at the least density, the windows themselves (partial at the grid's edges).
Otherwise (a higher density, or stage 2's token subset) the present tokens, window by window and by
position within a window, are cut into M runs of equal size (within one token), so every sample has
M groups (static shapes); the groups are per sample under a per-sample subset and shared where it is
(families with batch-shared rotary tables). Groups are numbered by their first token, so M = n gives
the tokens in their own order, which stages 5 and 6 can place.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from ..attention import pooling
from ..attention.intercept import mask_bias, per_key, resize_key_mask
from ..config import AccelerationConfig, ConfigError, Stage, param
from ..models.base import TokenGrid
from ..models.identity import model_identity
from ..runtime.call_state import CallState, TokenSelection
from ..runtime.estimate import CallShapes
from ..runtime.registry import register_technique
from ..runtime.search_space import every_preset
from ..runtime.stats import Stat, StatKind
from ..runtime.technique import Technique
from ..runtime.training import Trainable, TrainingSettings, changed_fields
from .lora import LoraAdapters, MergedAdapters, MergedLinear, load_adapters, save_adapters


#: a `sparse_blocks` range over every block of any model (the last is clamped to the model's last block)
EVERY_BLOCK = (0, 1 << 16)


@dataclass(frozen=True)
class FlexDiTConfig(AccelerationConfig):
    """Spatial and temporal token density, training-free.

    The default runs every block on 2 x 2 pooled tokens at the noisy steps, from half the tokens at the
    first step up to all of them where the last quarter of the steps begins (those run dense). On the
    reference image model (SD3 classes, 6 blocks, 256 tokens; 64 captions, CFG 4, 20 steps; 2-core AMD
    EPYC, 2 threads) it computes 0.787 of dense's FLOPs at 31.9 dB PSNR vs dense (SSIM 0.959, the
    judge's caption accuracy as dense's), 1.24x faster (16 captions, medians of 3 rounds). The presets,
    same run: "quality" (pooled K/V in the first 2 blocks) 0.939 at 36.7 dB (1.02x), "balanced" (blocks
    1-4, density 0.5 -> 1) 0.858 at 33.3 dB, "fast" (blocks 1-4, 0.25 -> 1) 0.795 at 30.2 dB (1.24x);
    every block at 0.25 -> 1 gives 0.692 at 28.7 dB. The paper fine-tunes the model to its pooling;
    nothing here is trained, so fewer tokens cost quality fast. A schedule needs the run's step count
    (a pipeline's scheduler): a bare transformer runs dense.
    """

    pooled_kv_blocks: int = param(0, "the first blocks attend to K/V average-pooled over the pooling windows of the "
                                     "token grid", low=0)
    bottom_attention: Literal["pooled_kv", "mean_v"] = param(
        "pooled_kv", "what the first pooled_kv_blocks attend to: pooled K/V, or the paper's Poolingformer "
                     "(every query gets the mean of all values)")
    pool_size: int = param(2, "side (rows and cols) of the pooling window on the token grid", low=1)
    pool_frames: int = param(1, "frames of the pooling window (1: each frame on its own, 2: pairs of frames)", low=1)
    sparse_blocks: tuple[int, int] | None = param(
        EVERY_BLOCK, "(first, last) block range, inclusive, whose blocks run on pooled tokens (pool -> block -> "
                     "unpool residual); last is clamped to the model's last block; None for none", low=0)
    schedule: tuple[float, ...] | None = param(
        (0.5, 1.0), "token density per step: None = full windows at every step; (start, end) = linear from the "
                    "noisiest step to the dense last steps; longer = one density per step", low=0.0, high=1.0,
        low_open=True)
    dense_fraction: float = param(0.25, "last fraction of the steps that runs dense under a (start, end) schedule",
                                  low=0.0, high=1.0)
    adapters: str | None = param(None, "safetensors file of LoRA adapters fine-tuned for this config on this model "
                                       "(dit_accel.finetune / `dit-accel finetune`); None: training-free",
                                 file="dit_accel.finetune(pipe, FlexDiTConfig(...), ...) or `dit-accel finetune`")

    name = "flexdit"
    #: measured on the reference image model (64 captions, CFG 4, 20 steps; see the class doc)
    presets = {
        "quality": dict(pooled_kv_blocks=2, sparse_blocks=None, schedule=None),  # 36.7 dB, FLOPs 0.939
        "balanced": dict(pooled_kv_blocks=0, sparse_blocks=(1, 4), schedule=(0.5, 1.0)),  # 33.3 dB, FLOPs 0.858
        "fast": dict(pooled_kv_blocks=0, sparse_blocks=(1, 4), schedule=(0.25, 1.0)),  # 30.2 dB, FLOPs 0.795
    }

    @property
    def window(self) -> tuple[int, int, int]:
        """(frames, rows, cols) of the pooling window."""
        return (self.pool_frames, self.pool_size, self.pool_size)

    def validate(self) -> None:
        if self.sparse_blocks is not None and self.sparse_blocks[0] > self.sparse_blocks[1]:
            raise ConfigError(f"FlexDiTConfig.sparse_blocks must be (first, last) with first <= last, "
                              f"got {self.sparse_blocks!r}")
        if self.schedule is not None:
            if len(self.schedule) < 2:
                raise ConfigError(f"FlexDiTConfig.schedule must be (start, end) or one density per step, got "
                                  f"{self.schedule!r}")
            size = math.prod(self.window)
            if min(self.schedule) < 1.0 / size:
                raise ConfigError(f"FlexDiTConfig.schedule densities must lie in [1/{size}, 1] (one group per "
                                  f"{'x'.join(map(str, self.window))} pooling window at the least), got "
                                  f"{min(self.schedule)!r}")

    def pooling(self) -> dict:
        """The fields adapters are trained for: every one but `adapters` (JSON's types)."""
        return json.loads(json.dumps({f.name: getattr(self, f.name) for f in fields(self) if f.name != "adapters"}))

    def stages(self) -> frozenset[Stage]:
        stages = set()
        if self.sparse_blocks is not None:
            stages.add(Stage.TOKEN_TRANSFORM)
        if self.pooled_kv_blocks > 0:
            stages.add(Stage.KV_SOURCE)
        return frozenset(stages)

    @classmethod
    def keep_all(cls) -> FlexDiTConfig:
        """Every block runs on pooled tokens and pools its K/V, over 1 x 1 x 1 windows: pooling, rotary
        pooling, unpooling, the log-count bias and the new key set all run, and the result is dense."""
        return cls(pooled_kv_blocks=1 << 16, pool_size=1, pool_frames=1, sparse_blocks=EVERY_BLOCK, schedule=None)

    def density_at(self, step: int, num_steps: int | None) -> float | None:
        """The token density at `step` of `num_steps`, for stage 3's groups and stage 5's pooled keys;
        None: the step runs dense. Full windows without a schedule; dense under a schedule when the
        step count is unknown (where the call sits in it is unknown too)."""
        if self.schedule is None:
            return 1.0 / math.prod(self.window)
        if num_steps is None:
            return None
        if len(self.schedule) > 2:
            if len(self.schedule) != num_steps:
                raise ConfigError(f"FlexDiTConfig.schedule gives {len(self.schedule)} densities, one per step, but "
                                  f"this run has {num_steps} steps")
            density = self.schedule[step]
        else:
            progress, pooled = step / num_steps, 1.0 - self.dense_fraction
            if progress >= pooled - 1e-9:
                return None
            start, end = self.schedule
            density = start + (end - start) * progress / pooled
        return None if density >= 1.0 else density

    def tokens_at(self, step: int, num_steps: int | None, tokens: int, windows: int | None = None) -> int:
        """The promise: image tokens a pooled block runs on (and image keys a pooled-K/V attention keeps)
        at `step` of `num_steps` when `tokens` are present; `windows`: the number of pooling windows when
        they are the full grid (partial windows at its edges count)."""
        density = self.density_at(step, num_steps)
        if density is None:
            return tokens
        return group_count(density, tokens, windows if windows is not None else -(-tokens // math.prod(self.window)))


def group_count(density: float, tokens: int, least: int) -> int:
    """round(density * tokens) groups, at least `least` and at most one per token."""
    return min(max(round(density * tokens), least), tokens)


def window_count(grid: TokenGrid, window: tuple[int, int, int]) -> int:
    """Pooling windows that cover the grid, partial ones at its edges included."""
    return math.prod(-(-extent // side) for extent, side in zip((grid.frames, grid.rows, grid.cols), window))


def token_groups(grid: TokenGrid, window: tuple[int, int, int], density: float,
                 index: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(every present token's group, (n,) or (B, n) like `index`; the number of groups M) at `density`:
    the whole grid (`index` None) or a token subset (sorted indices, shared or per sample)."""
    full = index is None
    positions = torch.arange(grid.num_tokens) if full else index
    frame, row, col = TokenSelection(positions, grid).coordinates().unbind(-1)
    rows, cols = -(-grid.rows // window[1]), -(-grid.cols // window[2])
    windows = ((frame // window[0]) * rows + row // window[1]) * cols + col // window[2]
    tokens = positions.shape[-1]
    least = window_count(grid, window) if full else -(-tokens // math.prod(window))
    count = group_count(density, tokens, least)
    if full and count == least:  # the windows, numbered in window order = by their first token
        return windows, count
    order = (windows * grid.num_tokens + positions).argsort(-1)  # window by window, by position within one
    ranks = torch.arange(tokens, device=positions.device).expand_as(order)
    groups = torch.empty_like(order).scatter_(-1, order, ranks) * count // tokens
    first = positions.new_full((*positions.shape[:-1], count), grid.num_tokens)
    first = first.scatter_reduce(-1, groups, positions, "amin")
    numbers = torch.arange(count, device=positions.device).expand_as(first)
    return torch.empty_like(first).scatter_(-1, first.argsort(-1), numbers).gather(-1, groups), count


def _with_pooled(x: torch.Tensor, part: slice, pooled: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, D) key or value sequence with its image part replaced by the pooled one."""
    return torch.cat([x[:, :, : part.start], pooled, x[:, :, part.stop:]], 2)


@register_technique(FlexDiTConfig, "FlexDiT token density: sparse-dense blocks, pooled K/V in the bottom blocks, "
                                   "a density schedule", search_space=every_preset(FlexDiTConfig))
class FlexDiT(Technique):
    stats = (Stat("pooled_kv_blocks", StatKind.VALUE), Stat("kv_pool_size", StatKind.DETAIL),
             Stat("flexdit_density", StatKind.VALUE), Stat("flexdit_tokens_by_block", StatKind.BY_BLOCK),
             Stat("flexdit_density_by_block", StatKind.BLOCK_FRACTION, "FlexDiT token density"))
    trains = "LoRA adapters (peft) on its pooled blocks and the blocks next to them"

    def __init__(self, config: FlexDiTConfig, session):
        super().__init__(config, session)
        #: (placement key, density) -> (groups, M); full-grid ones are kept for the run, subset ones for a call
        self._groups: dict[tuple, tuple[torch.Tensor, int]] = {}
        #: this call's density; None: a dense step
        self._density: float | None = None
        #: block -> (groups, tokens present) of the blocks that ran pooled this call
        self._pooled: dict[int, tuple[int, int]] = {}
        self._warned = False
        #: the trained adapters (`config.adapters`), merged; or peft's LoRA layers while a fine-tune trains them
        self._merged: MergedAdapters | None = None
        self._adapters: LoraAdapters | None = None

    def check_plan(self) -> None:
        width = self.session.by_stage.get(Stage.WIDTH)
        if self.config.adapters is not None and width is not None:
            raise ConfigError(f"FlexDiTConfig.adapters put LoRA layers on linears that {width.label} slices: apply "
                              "them without it")

    def attach(self) -> None:
        blocks = len(self.adapter.blocks())
        sparse = self.config.sparse_blocks
        if sparse is not None and sparse[0] >= blocks:
            raise ConfigError(f"FlexDiTConfig.sparse_blocks {sparse!r} starts past the model's last block "
                              f"({blocks - 1})")
        kv_source = self.session.by_stage.get(Stage.KV_SOURCE)
        if Stage.TOKEN_TRANSFORM in self.stages and kv_source is not None and kv_source is not self:
            raise ConfigError(f"FlexDiTConfig.sparse_blocks cannot be combined with {kv_source.label}'s K/V source "
                              "(stage 5): the keys of a pooled block change length with the density")
        if self.config.adapters is not None:
            self._load_adapters(self.config.adapters)

    def _load_adapters(self, path: str) -> None:
        state, metadata = load_adapters(path, self.session.transformer, "FlexDiTConfig.adapters")
        changed = changed_fields(metadata["trained_for"], self.config.pooling())
        if changed is not None:
            raise ConfigError(f"FlexDiTConfig.adapters {path!r} were trained for another pooling: {changed}")
        self._merged = MergedAdapters(self.session.transformer, state)
        for name, linear in self._merged.linears.items():
            self.session.hooks.add(linear, MergedLinear(self._merged, name), f"flexdit.adapters.{name}")

    def detach(self) -> None:
        if self._adapters is not None:
            self._adapters.unload()
            self._adapters = None
        self._merged = None

    def start_training(self, settings: TrainingSettings) -> Trainable:
        """LoRA adapters of `settings.lora_rank` on every linear of the pooled blocks (those with pooled
        K/V too) and of the blocks next to them, trained from zero (B = 0: the plan as it was)."""
        if self._merged is not None:
            raise ConfigError("FlexDiTConfig.adapters are loaded already: fine-tune a config without them")
        blocks = self.adapter.blocks()
        pooled = set(self.transformed_blocks()) if self.config.sparse_blocks is not None else set()
        pooled |= set(range(min(self.config.pooled_kv_blocks, len(blocks))))
        chosen = sorted({b + d for b in pooled for d in (-1, 0, 1)} & set(range(len(blocks))))
        names = {module: name for name, module in self.session.transformer.named_modules()}
        targets = [names[module] for b in chosen for module in blocks[b].modules() if type(module) is nn.Linear]
        identity = model_identity(self.session.transformer)
        self._adapters = LoraAdapters(self.session.transformer, targets, settings.lora_rank)
        self._adapters.inject()
        return _AdapterTraining(self, identity)

    def transformed_blocks(self) -> frozenset[int]:
        first, last = self.config.sparse_blocks
        return frozenset(range(first, min(last, len(self.adapter.blocks()) - 1) + 1))

    def begin_call(self, call_state: CallState) -> None:
        self._groups = {k: v for k, v in self._groups.items() if k[0][0] == "grid"}
        self._density = self.config.density_at(call_state.ctx.step_index, call_state.ctx.num_steps)
        # the adapters correct pooling: a dense step runs the model as it is
        if self._merged is not None:
            self._merged.active = self._density is not None
        if self._adapters is not None:
            self._adapters.enable(self._density is not None)
        self._pooled = {}
        if self.config.schedule is not None and call_state.ctx.num_steps is None and not self._warned:
            self._warned = True
            warnings.warn("FlexDiTConfig.schedule needs the run's step count, which a transformer called without "
                          "its pipeline's scheduler does not give: it runs dense. Pass schedule=None to pool at "
                          "every step.", stacklevel=2)

    def state_bytes(self) -> int:
        return 0 if self._merged is None else self._merged.nbytes()

    def estimate_bytes(self, shapes: CallShapes) -> dict[str, int]:
        """The adapters' merged weights: a copy of every adapted linear's weight."""
        if self._merged is None:
            return {}
        return {"adapter_weights": self._merged.weight_elements() * shapes.itemsize}

    def end_run(self) -> None:
        self._groups = {}

    def _groups_of(self, call_state: CallState, count: int, device) -> tuple[torch.Tensor, int] | None:
        """(groups, M) of a sequence of `count` image tokens at this call's density, or None when they
        cannot be placed (pooled tokens)."""
        placed = call_state.placed(count)
        if placed is None:
            return None
        cache_key, tokens = placed
        key = (cache_key, self._density)
        if key not in self._groups:
            index = None if cache_key[0] == "grid" else tokens.index
            groups, groups_count = token_groups(call_state.grid, self.config.window, self._density, index)
            self._groups[key] = (groups.to(device), groups_count)
        return self._groups[key]

    # -- stage 3: sparse-dense blocks ----------------------------------------------------------------
    def token_groups(self, call_state: CallState, block_index: int, tokens: int) -> tuple[torch.Tensor, int] | None:
        if self._density is None:
            return None
        groups = self._groups_of(call_state, tokens, call_state.ctx.call.latents.device)
        if groups is not None:
            self._pooled[block_index] = (groups[1], tokens)
        return groups

    # -- stage 5: pooled K/V -------------------------------------------------------------------------
    def kv_source(self, call_state, call, query, key, value, attn_mask):
        if call.block_index >= self.config.pooled_kv_blocks:
            return key, value, None, attn_mask
        if self.config.bottom_attention == "mean_v":
            return self._mean_value(call_state, key, value, attn_mask)
        if self._density is None or not per_key(attn_mask):
            return key, value, None, attn_mask
        part = call.image_slice(key.shape[2])
        image_keys = part.stop - part.start
        groups = self._groups_of(call_state, image_keys, key.device)
        if groups is None:  # a pooled block's keys: pooled already
            return key, value, None, attn_mask
        ids, count = groups
        grid, window = call_state.grid, self.config.window
        extent = (grid.frames, grid.rows, grid.cols)
        tiled = image_keys == grid.num_tokens and count == window_count(grid, window) and \
            all(e % w == 0 for e, w in zip(extent, window))
        if tiled:  # windows that tile the grid: successive sums, every pooled key biased by log(window size)
            pooled_k = pooling.tiled_mean(key[:, :, part], extent, window)
            pooled_v = pooling.tiled_mean(value[:, :, part], extent, window)
            log_size = torch.full((1, 1, 1, count), float(math.prod(window)), device=key.device).log()
        else:
            pooled_k, pooled_v, log_size = pooling.pool(key[:, :, part], value[:, :, part],
                                                        ids if ids.ndim == 2 else ids.unsqueeze(0), count)
        call_state.record_overhead("flexdit K/V pooling", 2.0 * key.shape[0] * key.shape[1] * image_keys * key.shape[-1],
                                   image_keys)
        attn_mask = resize_key_mask(attn_mask, key.shape[2], part, count)
        keys, values = _with_pooled(key, part, pooled_k), _with_pooled(value, part, pooled_v)
        if tiled and image_keys == key.shape[2]:  # the same bias on every key cancels in the softmax
            return keys, values, None, attn_mask
        text = log_size.new_zeros(*log_size.shape[:3], key.shape[2])  # text keys: no bias
        return keys, values, torch.cat([text[..., : part.start], log_size, text[..., part.stop:]], -1), attn_mask

    @staticmethod
    def _mean_value(call_state: CallState, key, value, attn_mask):
        """Uniform attention: one zero key whose value is the mean of the values, weighted as a per-key
        mask weighs uniform logits (softmax of its bias: the mean of the keys it allows). A mask that
        differs per query keeps every key, all of them zero."""
        call_state.record_overhead("flexdit mean of values", float(value.numel()), key.shape[2])
        if not per_key(attn_mask):
            return torch.zeros_like(key), value, None, attn_mask
        if attn_mask is None:
            mean = value.mean(2, keepdim=True)
        else:
            weights = mask_bias(attn_mask, value.dtype).reshape(*attn_mask.shape[:-2], 1, -1).softmax(-1)
            mean = weights @ value
        return key.new_zeros(*key.shape[:2], 1, key.shape[-1]), mean, None, None

    def call_stats(self, call_state: CallState) -> dict:
        """The step's density; with sparse-dense blocks, per block the tokens the pooled ones ran on and
        the density of every block (1.0: dense), which the UI draws."""
        blocks = len(self.adapter.blocks())
        stats = {"pooled_kv_blocks": min(self.config.pooled_kv_blocks, blocks), "kv_pool_size": self.config.pool_size,
                 "flexdit_density": 1.0 if self._density is None else self._density}
        if Stage.TOKEN_TRANSFORM in self.stages:
            stats["flexdit_tokens_by_block"] = {b: m for b, (m, _) in sorted(self._pooled.items())}
            stats["flexdit_density_by_block"] = {b: m / n for b, (m, n) in
                                                 ((b, self._pooled.get(b, (1, 1))) for b in range(blocks))}
        return stats


class _AdapterTraining(Trainable):
    """FlexDiT's LoRA adapters while `dit_accel.finetune` trains them."""

    def __init__(self, technique: FlexDiT, identity: dict[str, str]):
        self.technique, self.identity = technique, identity
        self.adapters: LoraAdapters = technique._adapters

    def parameters(self) -> list[nn.Parameter]:
        return self.adapters.parameters

    def learns_at(self, step_index: int, num_steps: int | None) -> bool:
        """The adapters run only where the step pools."""
        return self.technique.config.density_at(step_index, num_steps) is not None

    def save(self, directory: Path, details: dict[str, Any]) -> FlexDiTConfig:
        path = (directory / "flexdit_adapters.safetensors").resolve()
        config = self.technique.config
        save_adapters(path, self.adapters, self.identity, config.pooling(), details)
        return dataclasses.replace(config, adapters=str(path))
