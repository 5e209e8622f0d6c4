"""FlexDiT token-density control (configuration; the technique is its own issue)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AccelerationConfig, ConfigError, check_range


@dataclass
class FlexDiTConfig(AccelerationConfig):
    """Spatial and temporal token density.

    Args:
        pooled_kv_blocks: the first blocks attend to K/V average-pooled over `pool_size` x
            `pool_size` windows of the token grid (the training-free stand-in for Poolingformer).
        pool_size: side of the pooling window on the token grid.
        sparse_blocks: (first, last) block range that runs on pooled tokens (pool -> blocks ->
            unpool residual), the stand-in for the sparse-dense token modules; None for none.
        min_density: token density at the noisiest step of the temporal schedule; 1.0 disables it.
        dense_fraction: last fraction of the steps that always runs at full density.
    """

    pooled_kv_blocks: int = 2
    pool_size: int = 2
    sparse_blocks: tuple[int, int] | None = None
    min_density: float = 1.0
    dense_fraction: float = 0.25

    resources = frozenset({"image tokens"})
    name = "flexdit"

    def validate(self) -> None:
        if not isinstance(self.pooled_kv_blocks, int) or self.pooled_kv_blocks < 0:
            raise ConfigError(f"FlexDiTConfig.pooled_kv_blocks must be an int >= 0, got {self.pooled_kv_blocks!r}")
        if not isinstance(self.pool_size, int) or self.pool_size < 1:
            raise ConfigError(f"FlexDiTConfig.pool_size must be an int >= 1, got {self.pool_size!r}")
        if self.sparse_blocks is not None:
            first, last = self.sparse_blocks
            if not 0 <= first <= last:
                raise ConfigError(f"FlexDiTConfig.sparse_blocks must be (first, last) with 0 <= first <= last, "
                                  f"got {self.sparse_blocks!r}")
        check_range(self, "min_density", 0.0, 1.0, low_open=True)
        check_range(self, "dense_fraction", 0.0, 1.0)

    @classmethod
    def keep_all(cls) -> "FlexDiTConfig":
        return cls(pooled_kv_blocks=0, pool_size=1, sparse_blocks=None, min_density=1.0)
