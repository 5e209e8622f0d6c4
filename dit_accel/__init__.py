"""dit-accel: make diffusers diffusion-transformer pipelines faster without retraining.

    handle = dit_accel.apply(pipe, dit_accel.RASConfig(sample_ratio=0.5), FirstBlockCacheConfig(threshold=0.08))
    image = pipe(prompt).images[0]
    print(handle.report()["flops_ratio"])
    handle.remove()
"""

from .api import AccelerationHandle, PlanRun, apply, calibrate, compare, measure
from .config import AccelerationConfig, ConfigError, Stage
from .methods import DyDiTConfig, FlexDiTConfig, ProxyAttentionConfig, RASConfig, SVG2Config
from .models import UnsupportedModelError, adapter_for, supported_families

__version__ = "0.1.0"

__all__ = [
    "AccelerationConfig",
    "AccelerationHandle",
    "ConfigError",
    "DyDiTConfig",
    "PlanRun",
    "FlexDiTConfig",
    "ProxyAttentionConfig",
    "RASConfig",
    "SVG2Config",
    "Stage",
    "UnsupportedModelError",
    "adapter_for",
    "apply",
    "calibrate",
    "compare",
    "measure",
    "supported_families",
]
