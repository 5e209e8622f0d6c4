"""The contract every technique's configuration dataclass follows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .runtime.session import Session
    from .runtime.technique import Technique


class ConfigError(ValueError):
    """A configuration value that no technique can honour."""


@dataclass
class AccelerationConfig:
    """Base of `RASConfig`, `FlexDiTConfig`, `DyDiTConfig`, `SVG2Config`, `ProxyAttentionConfig`.

    Each subclass documents its budget fields, checks them in `validate()` (called on construction),
    and returns from `keep_all()` the setting that must reproduce the dense output.
    """

    #: What the technique changes: two configs sharing a resource cannot be applied together.
    resources: ClassVar[frozenset[str]] = frozenset()
    #: Short name used on the command line (`--accel ras:sample_ratio=0.5`) and in reports.
    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` naming the field and the allowed range."""

    @classmethod
    def keep_all(cls) -> "AccelerationConfig":
        raise NotImplementedError

    def build(self, session: "Session") -> "Technique":
        raise NotImplementedError(f"the {type(self).__name__} technique is not implemented yet")


def check_range(config: AccelerationConfig, field: str, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise `ConfigError` unless `low <= config.field <= high` (open ends when asked)."""
    value = getattr(config, field)
    too_low = value <= low if low_open else value < low
    too_high = value >= high if high_open else value > high
    if isinstance(value, bool) or not isinstance(value, (int, float)) or too_low or too_high:
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ConfigError(f"{type(config).__name__}.{field} must be in {left}{low}, {high}{right}, got {value!r}")


def check_compatible(configs: list[AccelerationConfig]) -> None:
    """Raise `ConfigError` when two configs change the same thing (two attention methods, say)."""
    for i, first in enumerate(configs):
        if not isinstance(first, AccelerationConfig):
            raise ConfigError(f"expected acceleration configs (RASConfig, SVG2Config, ...), got {first!r}")
        for second in configs[i + 1 :]:
            if not isinstance(second, AccelerationConfig):
                raise ConfigError(f"expected acceleration configs (RASConfig, SVG2Config, ...), got {second!r}")
            shared = first.resources & second.resources
            if shared:
                raise ConfigError(
                    f"{type(first).__name__} and {type(second).__name__} cannot be combined: "
                    f"both change the {', '.join(sorted(shared))}"
                )
