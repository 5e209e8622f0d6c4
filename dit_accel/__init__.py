"""dit-accel: make diffusers diffusion-transformer pipelines faster without retraining.

    handle = dit_accel.apply(pipe, dit_accel.RASConfig(sample_ratio=0.5), FirstBlockCacheConfig(threshold=0.08))
    image = pipe(prompt).images[0]
    print(handle.report()["flops_ratio"])
    handle.remove()

    result = dit_accel.tune(pipe, prompts, target="psnr=30", budget="20m", path="plan.json")
    dit_accel.apply(pipe, *dit_accel.load_plan("plan.json"))

    flexdit = dit_accel.finetune(pipe, dit_accel.FlexDiTConfig(sparse_blocks=(1, 4), schedule=None),
                                 prompts=prompts, minutes=40, out="runs/flexdit")  # reads its LoRA adapters
"""

from .api import AccelerationHandle, apply, estimate, measure
from .calibration import calibrate
from .comparison import PlanRun, compare
from .config import AccelerationConfig, ConfigError, Stage
from .finetune import finetune
from .techniques import (DyDiTConfig, FlexDiTConfig, ProxyAttentionConfig, RASConfig, StepMaskConfig, StepsConfig,
                         SVG2Config)
from .models import UnsupportedModelError, adapter_for, supported_families
from .plan_files import load_plan, save_plan
from .tuning import Budget, Target, TuneResult, tune

__version__ = "0.1.0"

__all__ = [
    "AccelerationConfig",
    "AccelerationHandle",
    "Budget",
    "ConfigError",
    "DyDiTConfig",
    "PlanRun",
    "FlexDiTConfig",
    "ProxyAttentionConfig",
    "RASConfig",
    "SVG2Config",
    "StepMaskConfig",
    "StepsConfig",
    "Stage",
    "Target",
    "TuneResult",
    "UnsupportedModelError",
    "adapter_for",
    "apply",
    "calibrate",
    "compare",
    "load_plan",
    "estimate",
    "finetune",
    "measure",
    "save_plan",
    "supported_families",
    "tune",
]
