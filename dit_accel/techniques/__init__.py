"""One file (or folder: `dydit/`) per technique: its config dataclass, state and technique class,
registered by config class with what the tools need (its `tune` search space, its calibration) and
the per-call stats it declares; `diffusers_caches` registers diffusers' own step caches the same way
(after ours, so plan names list dit-accel's techniques first)."""

from .ras import RASConfig  # isort: skip
from .flexdit import FlexDiTConfig  # isort: skip
from .dydit import DyDiTConfig  # isort: skip
from .svg2 import SVG2Config  # isort: skip
from .proxy import ProxyAttentionConfig  # isort: skip
from .fewer_steps import StepsConfig  # isort: skip
from .step_mask import StepMaskConfig  # isort: skip
from .model_check import ModelCheckConfig  # isort: skip
from . import diffusers_caches  # noqa: F401  isort: skip

__all__ = ["DyDiTConfig", "FlexDiTConfig", "ModelCheckConfig", "ProxyAttentionConfig", "RASConfig", "SVG2Config",
           "StepMaskConfig", "StepsConfig"]
