"""DyDiT dynamic width and token routing (configuration; the technique is its own issue)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AccelerationConfig, ConfigError, Stage, param
from ..runtime.registry import register_config


@dataclass(frozen=True)
class DyDiTConfig(AccelerationConfig):
    """Timestep-wise dynamic width (TDW) and spatial dynamic tokens (SDT)."""

    width_ratio: float = param(0.7, "fraction of attention heads and MLP channel groups kept at the noisiest step "
                                    "(rising to max_width_ratio at the cleanest); sliced, not masked",
                               low=0.0, high=1.0, low_open=True)
    max_width_ratio: float = param(1.0, "fraction of heads and channel groups kept at the cleanest step",
                                   low=0.0, high=1.0, low_open=True)
    token_ratio: float = param(1.0, "fraction of image tokens that go through each MLP; the others reuse the "
                                    "previous step's MLP output", low=0.0, high=1.0, low_open=True)
    calibration_runs: int = param(2, "pipeline calls used to rank heads and channel groups", low=0, high=1000)

    name = "dydit"

    def validate(self) -> None:
        if self.max_width_ratio < self.width_ratio:
            raise ConfigError(f"DyDiTConfig.max_width_ratio ({self.max_width_ratio}) must be >= width_ratio "
                              f"({self.width_ratio})")

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.WIDTH})

    @classmethod
    def keep_all(cls) -> "DyDiTConfig":
        return cls(width_ratio=1.0, max_width_ratio=1.0, token_ratio=1.0, calibration_runs=0)


# no technique yet: plans name it, and applying it says so
register_config(DyDiTConfig, name=DyDiTConfig.name, stages=DyDiTConfig.stages, summary="DyDiT dynamic width: attention heads and MLP channels per timestep, MLP tokens")
