"""What a tuned plan must keep against dense (`Target`) and when the search stops (`Budget`)."""

from __future__ import annotations

import dataclasses
import re

from ..config import ConfigError


@dataclasses.dataclass(frozen=True)
class Target:
    """The quality a plan must keep against dense: mean per-frame PSNR (dB) or SSIM, at least `value`."""

    metric: str = "psnr"
    value: float = 30.0

    METRICS = ("psnr", "ssim")

    def __post_init__(self) -> None:
        if self.metric not in self.METRICS:
            raise ConfigError(f"target metric {self.metric!r}: valid metrics: {', '.join(self.METRICS)}")
        if self.metric == "ssim" and not 0 < self.value <= 1:
            raise ConfigError(f"target ssim={self.value}: SSIM targets lie in (0, 1]")

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        """`"psnr=30"`, `"ssim=0.9"` (or a Target)."""
        if isinstance(text, Target):
            return text
        metric, equals, value = str(text).partition("=")
        try:
            number = float(value if equals else metric)
        except ValueError:
            raise ConfigError(f"target {text!r}: expected metric=value, e.g. psnr=30 or ssim=0.9") from None
        return cls(metric.strip().lower(), number) if equals else cls(value=number)

    @property
    def margin(self) -> float:
        """How far below the target a first batch may be and still be worth the other batches."""
        return 1.0 if self.metric == "psnr" else 0.02

    def __str__(self) -> str:
        return f"{self.metric}>={self.value:g}"


@dataclasses.dataclass(frozen=True)
class Budget:
    """When the search stops: after `seconds` of wall clock and/or `generations` pipeline calls."""

    seconds: float | None = 45 * 60
    generations: int | None = None

    @classmethod
    def parse(cls, text: str | Budget | float | None) -> Budget:
        """`"45m"`, `"90s"`, `"1.5h"`, `"120gen"` (pipeline calls), a number of seconds, or a Budget."""
        if text is None or isinstance(text, Budget):
            return text or cls()
        if isinstance(text, (int, float)):
            return cls(seconds=float(text))
        match = re.fullmatch(r"\s*([0-9.]+)\s*(s|m|h|gen)?\s*", str(text))
        if match is None:
            raise ConfigError(f"budget {text!r}: expected e.g. 45m, 90s, 1h or 120gen")
        amount, unit = float(match.group(1)), match.group(2) or "s"
        if amount <= 0:
            raise ConfigError(f"budget {text!r} must be > 0")
        if unit == "gen":
            return cls(seconds=None, generations=int(amount))
        return cls(seconds=amount * {"s": 1, "m": 60, "h": 3600}[unit])
