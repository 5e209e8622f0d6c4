"""FlexDiT token density (after FlexDiT / SparseDiT, arXiv 2412.06028), training-free.

Built so far: pooled K/V in the bottom blocks (stage 5). In the first `pooled_kv_blocks` blocks,
every self-attention attends to the image keys and values average-pooled over `pool_size` x
`pool_size` windows of each frame, each pooled key biased by log(its window's size) so the softmax
weighs it as the keys it stands for; text keys are never pooled, queries stay exact. With a token
set (RAS without its K/V cache) the present keys are pooled by their grid position. Not built yet:
the sparse-dense middle blocks and the temporal density schedule (`sparse_blocks`, `min_density`),
which a config refuses when set.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..attention import pooling
from ..attention.intercept import per_key, resize_key_mask
from ..config import AccelerationConfig, ConfigError, Stage, param
from ..runtime.plan import CallPlan
from ..runtime.registry import register_technique
from ..runtime.technique import Technique


@dataclass(frozen=True)
class FlexDiTConfig(AccelerationConfig):
    """Spatial and temporal token density."""

    pooled_kv_blocks: int = param(2, "the first blocks attend to K/V average-pooled over pool_size x pool_size "
                                     "windows of the token grid", low=0)
    pool_size: int = param(2, "side of the pooling window on the token grid", low=1)
    sparse_blocks: tuple[int, int] | None = param(None, "(first, last) block range that runs on pooled tokens "
                                                        "(pool -> blocks -> unpool residual); None for none", low=0)
    min_density: float = param(1.0, "token density at the noisiest step of the temporal schedule; 1.0 disables it",
                               low=0.0, high=1.0, low_open=True)
    dense_fraction: float = param(0.25, "last fraction of the steps that always runs at full density",
                                  low=0.0, high=1.0)

    name = "flexdit"

    def validate(self) -> None:
        if self.sparse_blocks is not None and self.sparse_blocks[0] > self.sparse_blocks[1]:
            raise ConfigError(f"FlexDiTConfig.sparse_blocks must be (first, last) with first <= last, "
                              f"got {self.sparse_blocks!r}")
        if Stage.TOKEN_TRANSFORM in self.stages():
            raise ConfigError("FlexDiTConfig: the sparse-dense blocks (sparse_blocks) and the temporal density "
                              "schedule (min_density < 1) are not built yet; pooled K/V (pooled_kv_blocks, "
                              "pool_size) is")

    def stages(self) -> frozenset[Stage]:
        stages = set()
        if self.sparse_blocks is not None or self.min_density < 1.0:
            stages.add(Stage.TOKEN_TRANSFORM)
        if self.pooled_kv_blocks > 0:
            stages.add(Stage.KV_SOURCE)
        return frozenset(stages)

    @classmethod
    def keep_all(cls) -> "FlexDiTConfig":
        """Every block pools K/V over 1 x 1 windows: pooling, the log-count bias and the new key set all
        run, and the attention is the dense one."""
        return cls(pooled_kv_blocks=1 << 16, pool_size=1, sparse_blocks=None, min_density=1.0)


def _with_pooled(x: torch.Tensor, part: slice, pooled: torch.Tensor) -> torch.Tensor:
    """A (B, H, S, D) key or value sequence with its image part replaced by the pooled one."""
    return torch.cat([x[:, :, : part.start], pooled, x[:, :, part.stop:]], 2)


@register_technique(FlexDiTConfig, "FlexDiT token density: pooled K/V in the bottom blocks")
class FlexDiT(Technique):
    def __init__(self, config: FlexDiTConfig, session):
        super().__init__(config, session)
        self._windows: dict[tuple, tuple[torch.Tensor, int]] = {}

    def begin_call(self, plan: CallPlan) -> None:
        self._windows = {k: v for k, v in self._windows.items() if k[0] == "grid"}

    def _pool_windows(self, plan: CallPlan, count: int, device) -> tuple[torch.Tensor, int] | None:
        """((S, count) pooling window of every image key, windows), or None if the keys cannot be placed."""
        grid, size = plan.grid, self.config.pool_size
        placed = plan.placed(count)
        if placed is None:
            return None
        cache_key, tokens = placed
        if cache_key not in self._windows:
            coordinates = tokens.coordinates()
            coordinates = coordinates.unsqueeze(0) if coordinates.ndim == 2 else coordinates
            rows, cols = -(-grid.rows // size), -(-grid.cols // size)
            ids = (coordinates[..., 0] * rows + coordinates[..., 1] // size) * cols + coordinates[..., 2] // size
            self._windows[cache_key] = (ids.to(device), grid.frames * rows * cols)
        return self._windows[cache_key]

    def kv_source(self, plan, call, query, key, value, attn_mask):
        if call.block_index >= self.config.pooled_kv_blocks or not per_key(attn_mask):
            return key, value, None, attn_mask
        part = call.image_slice(key.shape[2])
        image_keys = part.stop - part.start
        placed = self._pool_windows(plan, image_keys, key.device)
        if placed is None:
            return key, value, None, attn_mask
        ids, windows = placed
        size, grid = self.config.pool_size, plan.grid
        if image_keys == grid.num_tokens and grid.rows % size == 0 and grid.cols % size == 0:
            extent, window = (grid.frames, grid.rows, grid.cols), (1, size, size)
            pooled_k = pooling.tiled_mean(key[:, :, part], extent, window)
            pooled_v = pooling.tiled_mean(value[:, :, part], extent, window)
            log_size = key.new_full((1, 1, 1, windows), float(size * size)).log()
        else:
            pooled_k, pooled_v, log_size = pooling.pool(key[:, :, part], value[:, :, part], ids, windows)
        plan.record_overhead("flexdit K/V pooling", 2.0 * key.shape[0] * key.shape[1] * image_keys * key.shape[-1],
                             image_keys)
        text = log_size.new_zeros(*log_size.shape[:3], key.shape[2])  # text keys: no bias
        bias = torch.cat([text[..., : part.start], log_size, text[..., part.stop:]], -1)
        attn_mask = resize_key_mask(attn_mask, key.shape[2], part, windows)
        return _with_pooled(key, part, pooled_k), _with_pooled(value, part, pooled_v), bias, attn_mask

    def call_stats(self, plan: CallPlan) -> dict:
        return {"pooled_kv_blocks": min(self.config.pooled_kv_blocks, len(self.adapter.blocks())),
                "kv_pool_size": self.config.pool_size}
