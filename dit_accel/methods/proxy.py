"""Proxy-token attention (PT-DiT) (configuration; the technique is its own issue)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AccelerationConfig, Stage, param
from ..runtime.registry import register_config


@dataclass(frozen=True)
class ProxyAttentionConfig(AccelerationConfig):
    """Global attention to one proxy per window plus exact local-window attention, merged by LSE."""

    proxy_window: tuple[int, int, int] = param((1, 2, 2), "(frames, rows, cols) window summarised by one proxy "
                                                          "token; (1, 1, 1) is exact global attention", low=1)
    local_window: tuple[int, int, int] | None = param((1, 8, 8), "(frames, rows, cols) window of exact local "
                                                                 "attention; None for none", low=1)
    dense_first_blocks: int = param(0, "number of first blocks left dense", low=0)

    name = "proxy"

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.ATTENTION_KERNEL})

    @classmethod
    def keep_all(cls) -> "ProxyAttentionConfig":
        return cls(proxy_window=(1, 1, 1), local_window=None)


# no technique yet: plans name it, and applying it says so
register_config(ProxyAttentionConfig, name=ProxyAttentionConfig.name, stages=ProxyAttentionConfig.stages, summary="proxy-token attention: global attention through one proxy per window")
