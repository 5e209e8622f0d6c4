"""FlexDiT token-density control (configuration; the technique is its own issue)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AccelerationConfig, ConfigError, Stage, param
from ..runtime.registry import register_config


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

    def stages(self) -> frozenset[Stage]:
        stages = set()
        if self.sparse_blocks is not None or self.min_density < 1.0:
            stages.add(Stage.TOKEN_TRANSFORM)
        if self.pooled_kv_blocks > 0 and self.pool_size > 1:
            stages.add(Stage.KV_SOURCE)
        return frozenset(stages)

    @classmethod
    def keep_all(cls) -> "FlexDiTConfig":
        return cls(pooled_kv_blocks=0, pool_size=1, sparse_blocks=None, min_density=1.0)


# no technique yet: plans name it, and applying it says so
register_config(FlexDiTConfig, name=FlexDiTConfig.name, stages=FlexDiTConfig.stages, summary="FlexDiT token density: pooled K/V, pooled middle blocks, fewer tokens at noisy steps")
