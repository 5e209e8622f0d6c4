"""`calibrate(pipe, config, path=..., **call)`: a config completed with what it learns from one run.

Which configs need a calibration, and how, each technique's registration says (its `calibrate`
entry, `runtime/registry.py`): MagCache (diffusers' calibration mode, `techniques/diffusers_caches.py`)
and DyDiT (head and channel-group scores written to a file, `techniques/dydit/calibration.py`). This
module only dispatches, handing the entry `apply` (techniques sit below the api).
"""

from __future__ import annotations

from typing import Any

from .api import apply
from .config import ConfigError
from .runtime.registry import registration, registrations


def calibrate(pipe: Any, config: Any, *, path: str | None = None, **call_kwargs) -> Any:
    """`config` completed with what it must learn from one run of `pipe(**call_kwargs)`.

    MagCache: its per-step magnitude ratios (diffusers' own calibration mode), for the run's steps.
    DyDiT: every attention head's and MLP channel group's mean contribution to its block's output,
    per bucket of steps, over the run (give a list of prompts to calibrate on several), written to
    `path` as safetensors with the transformer's identity; the config returned reads that file.
    """
    entry = registration(config).calibrate
    if entry is None:
        takes = " or a ".join(r.config_class.__name__ for r in registrations() if r.calibrate is not None)
        raise ConfigError(f"{type(config).__name__} needs no calibration (calibrate takes a {takes})")
    return entry(pipe, config, apply=apply, path=path, call_kwargs=call_kwargs)
