"""One file per technique: its config dataclass, state and technique class, registered by config
class; `diffusers_caches` registers diffusers' own step caches the same way."""

from . import diffusers_caches  # noqa: F401  (registration)
from .dydit import DyDiTConfig
from .flexdit import FlexDiTConfig
from .proxy import ProxyAttentionConfig
from .ras import RASConfig
from .svg2 import SVG2Config

__all__ = ["DyDiTConfig", "FlexDiTConfig", "ProxyAttentionConfig", "RASConfig", "SVG2Config"]
