"""DyDiT dynamic width and token routing (configuration; the technique is its own issue)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AccelerationConfig, check_range


@dataclass
class DyDiTConfig(AccelerationConfig):
    """Timestep-wise dynamic width (TDW) and spatial dynamic tokens (SDT).

    Args:
        width_ratio: fraction of attention heads and MLP channel groups kept at the noisiest step
            (rising to `max_width_ratio` at the cleanest); heads are sliced, not masked.
        max_width_ratio: fraction kept at the cleanest step.
        token_ratio: fraction of image tokens that go through each MLP; the others reuse the
            previous step's MLP output.
        calibration_runs: pipeline calls used to rank heads and channel groups (training-free).
    """

    width_ratio: float = 0.7
    max_width_ratio: float = 1.0
    token_ratio: float = 1.0
    calibration_runs: int = 2

    resources = frozenset({"width"})
    name = "dydit"

    def validate(self) -> None:
        check_range(self, "width_ratio", 0.0, 1.0, low_open=True)
        check_range(self, "max_width_ratio", self.width_ratio, 1.0)
        check_range(self, "token_ratio", 0.0, 1.0, low_open=True)
        check_range(self, "calibration_runs", 0, 1000)

    @classmethod
    def keep_all(cls) -> "DyDiTConfig":
        return cls(width_ratio=1.0, max_width_ratio=1.0, token_ratio=1.0, calibration_runs=0)
