"""Proxy-token attention (PT-DiT) (configuration; the technique is its own issue)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AccelerationConfig, ConfigError


def _check_window(name: str, window) -> None:
    if (not isinstance(window, tuple) or len(window) != 3
            or not all(isinstance(v, int) and v >= 1 for v in window)):
        raise ConfigError(f"ProxyAttentionConfig.{name} must be (frames, rows, cols) of ints >= 1, got {window!r}")


@dataclass
class ProxyAttentionConfig(AccelerationConfig):
    """Global attention to one proxy per window plus exact local-window attention, merged by LSE.

    Args:
        proxy_window: (frames, rows, cols) window summarised by one proxy token; (1, 1, 1) makes
            every token its own proxy, i.e. exact global attention.
        local_window: (frames, rows, cols) window of exact local attention; None for none.
        dense_first_blocks: number of first blocks left dense.
    """

    proxy_window: tuple[int, int, int] = (1, 2, 2)
    local_window: tuple[int, int, int] | None = (1, 8, 8)
    dense_first_blocks: int = 0

    resources = frozenset({"attention"})
    name = "proxy"

    def validate(self) -> None:
        _check_window("proxy_window", self.proxy_window)
        if self.local_window is not None:
            _check_window("local_window", self.local_window)
        if not isinstance(self.dense_first_blocks, int) or self.dense_first_blocks < 0:
            raise ConfigError(f"ProxyAttentionConfig.dense_first_blocks must be an int >= 0, "
                              f"got {self.dense_first_blocks!r}")

    @classmethod
    def keep_all(cls) -> "ProxyAttentionConfig":
        return cls(proxy_window=(1, 1, 1), local_window=None)
