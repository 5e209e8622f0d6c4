"""DyDiT's config: the width of each bucket of steps and the MLP token ratio, its presets, which
bucket a call falls in, and what `tune` tries (the presets, and those that narrow the width once
more with calibrated heads and groups)."""

from __future__ import annotations

from dataclasses import dataclass

from ...config import AccelerationConfig, ConfigError, Stage, param
from ...runtime.call_state import CallState
from ...runtime.search_space import SearchContext, Setting, every_preset
from ...runtime.storage import StateStorage


@dataclass(frozen=True)
class DyDiTConfig(AccelerationConfig):
    """Timestep-wise dynamic width (TDW) and spatial dynamic tokens (SDT)."""

    width_ratio: float = param(0.7, "fraction of attention heads and MLP channel groups kept in the noisiest bucket "
                                    "of steps (rising linearly to max_width_ratio in the cleanest); sliced, not masked",
                               low=0.0, high=1.0, low_open=True)
    max_width_ratio: float = param(1.0, "fraction of heads and channel groups kept in the cleanest bucket",
                                   low=0.0, high=1.0, low_open=True)
    buckets: int = param(4, "equal parts of the steps, each with its own heads and channel groups", low=1, high=1000)
    token_ratio: float = param(1.0, "fraction of tokens per sample through each MLP; the others reuse their MLP "
                                    "output from when they were last computed", low=0.0, high=1.0, low_open=True)
    calibration: str | None = param(None, "safetensors file of head and group scores from dit_accel.calibrate "
                                          "(`dit-accel calibrate`); None ranks them by weight norms",
                                    file="dit_accel.calibrate(pipe, DyDiTConfig(), path=...) or `dit-accel calibrate`")
    routers: str | None = param(None, "safetensors file of timestep-wise width routers and MLP token routers "
                                      "learned for this config on this model (dit_accel.finetune / `dit-accel "
                                      "finetune`); None: the training-free choice (calibration or weight norms)",
                                file="dit_accel.finetune(pipe, DyDiTConfig(...), ...) or `dit-accel finetune`")
    token_cache: StateStorage = param("device", "form of the MLP outputs token skipping keeps: 'device' (the model's "
                                                "dtype on its device), 'fp8' (e4m3, a scale per token; half of "
                                                "bf16's bytes) or 'host' (host memory, fetched back ahead of use)")

    name = "dydit"
    #: measured on the reference image model (8 captions, CFG 4, 20 steps, calibrated): MLP token
    #: skipping costs far less than width there (4 heads a block: one head is a quarter of the width)
    presets = {
        "quality": dict(width_ratio=1.0, max_width_ratio=1.0, token_ratio=0.5),  # 43.7 dB, FLOPs 0.79
        "balanced": dict(width_ratio=1.0, max_width_ratio=1.0, token_ratio=0.25),  # 35.9 dB, FLOPs 0.69
        "fast": dict(width_ratio=0.75, max_width_ratio=1.0, token_ratio=0.25),  # 28.8 dB, FLOPs 0.61
    }

    def validate(self) -> None:
        if self.max_width_ratio < self.width_ratio:
            raise ConfigError(f"DyDiTConfig.max_width_ratio ({self.max_width_ratio}) must be >= width_ratio "
                              f"({self.width_ratio})")
        if self.routers is not None and self.calibration is not None:
            raise ConfigError("DyDiTConfig takes routers or calibration, not both: each chooses the heads and "
                              "channel groups")

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.WIDTH})

    def width_at(self, bucket: int) -> float:
        """The fraction of heads and groups kept in `bucket` (0: the noisiest steps)."""
        if self.buckets == 1:
            return self.width_ratio
        return self.width_ratio + (self.max_width_ratio - self.width_ratio) * bucket / (self.buckets - 1)

    def trained_for(self, tokens: bool = True) -> dict:
        """The fields routers are trained for (their file keeps them; loading checks them); `tokens`: whether
        they route tokens (routers trained at token_ratio 1 leave token skipping to the cache heuristic, at
        any token_ratio)."""
        fields = {"width_ratio": self.width_ratio, "max_width_ratio": self.max_width_ratio, "buckets": self.buckets}
        return {**fields, "token_ratio": self.token_ratio} if tokens else fields

    def keeps_everything(self) -> bool:
        return self.width_ratio == self.max_width_ratio == self.token_ratio == 1.0

    @classmethod
    def keep_all(cls) -> "DyDiTConfig":
        """Every head, group and token: the slicing hooks and the head count run and find nothing to cut,
        so every linear keeps its own weights; at token_ratio 1 no token hook is attached at all."""
        return cls(width_ratio=1.0, max_width_ratio=1.0, token_ratio=1.0)


def kept_count(ratio: float, units: int) -> int:
    return max(1, min(units, round(ratio * units)))


def bucket_of(call_state: CallState, buckets: int) -> int:
    """Equal parts of the run's steps; a run of unknown length counts as its noisiest part."""
    steps = call_state.ctx.num_steps
    return 0 if not steps else min(buckets - 1, call_state.ctx.step_index * buckets // steps)


def search_space(context: SearchContext) -> list[Setting]:
    """What `tune` tries: every preset, then each preset that narrows the width with its heads and
    groups calibrated on the first tuning batch (`<name>,calibrated`)."""

    def calibrated(name: str):
        def prepare(context: SearchContext) -> list:
            return [context.calibrate(DyDiTConfig.preset(name), f"DyDiT's heads and channel groups (for {name})",
                                      path=context.calibration_file(DyDiTConfig.name))]
        return prepare

    return every_preset(DyDiTConfig)(context) + [
        Setting(f"dydit:preset={name},calibrated", prepare=calibrated(name))
        for name, fields in DyDiTConfig.presets.items() if fields["width_ratio"] < 1]
