"""One file per technique: its config dataclass, state, hooks and technique class."""

from .dydit import DyDiTConfig
from .flexdit import FlexDiTConfig
from .proxy import ProxyAttentionConfig
from .ras import RASConfig
from .svg2 import SVG2Config

CONFIG_CLASSES = (RASConfig, FlexDiTConfig, DyDiTConfig, SVG2Config, ProxyAttentionConfig)

__all__ = ["CONFIG_CLASSES", "DyDiTConfig", "FlexDiTConfig", "ProxyAttentionConfig", "RASConfig", "SVG2Config"]
