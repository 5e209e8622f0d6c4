"""Drop-in diffusers pipeline classes with an `acceleration=` argument.

    pipe = AcceleratedFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",
                                                   acceleration=[RASConfig(sample_ratio=0.5),
                                                                 FirstBlockCacheConfig(threshold=0.08)])
    image = pipe(prompt).images[0]                    # accelerated (the standing plan)
    pipe.acceleration_report()["flops_ratio"]
    image = pipe(prompt, acceleration=[]).images[0]   # this call dense, the plan stays
    pipe.set_acceleration(None)                       # dense from now on

Every class is `AccelerationMixin` + the diffusers class, and nothing else: the parent's
`__init__` is untouched because diffusers reads its signature to know the components, so a
pipeline built from components gets its plan with `from_pipe(pipe, acceleration=...)` or
`set_acceleration(...)`. Folders written by `save_pretrained` are plain diffusers folders (the
parent class name, no hooks), loadable with or without dit-accel.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import (
    CogVideoXPipeline,
    DiffusionPipeline,
    DiTPipeline,
    FluxPipeline,
    HunyuanVideoPipeline,
    PixArtAlphaPipeline,
    PixArtSigmaPipeline,
    StableDiffusion3Pipeline,
    WanPipeline,
)

from dit_accel import AccelerationHandle, apply
from dit_accel.plans import parse_plan

#: one config (dit-accel's or a diffusers cache config), a sequence of them, a plan spec or plan file
#: path (`dit-accel tune`'s), or None
Acceleration = Any


def as_config_list(acceleration: Acceleration) -> list[Any]:
    """None, one config, a sequence of configs, a plan spec or a plan file's path -> a list (empty means
    dense); a plan file made for another model is refused when the plan is applied."""
    if acceleration is None:
        return []
    if isinstance(acceleration, (str, Path)):
        return parse_plan(str(acceleration))
    if isinstance(acceleration, (list, tuple)):
        return list(acceleration)
    return [acceleration]


class AccelerationMixin:
    """Adds a standing acceleration plan, per-call plans and a report to a diffusers pipeline.

    The plan's hooks live on the pipeline's transformer(s), which `from_pipe` shares with the
    source pipeline: accelerate one of the pipelines sharing a transformer at a time.
    """

    _acceleration_configs: tuple[Any, ...] = ()
    _acceleration_handle: AccelerationHandle | None = None
    _acceleration_report: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, acceleration: Acceleration = None, **kwargs):
        """`DiffusionPipeline.from_pretrained`, then `set_acceleration(acceleration)`."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.set_acceleration(acceleration)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, *, acceleration: Acceleration = None, **kwargs):
        """`DiffusionPipeline.from_pipe` (same components, no copy), then `set_acceleration(acceleration)`."""
        pipe = super().from_pipe(pipeline, **kwargs)
        pipe.set_acceleration(acceleration)
        return pipe

    @property
    def acceleration(self) -> list[Any]:
        """The standing plan: the configs every call uses unless it passes its own."""
        return list(self._acceleration_configs)

    def set_acceleration(self, acceleration: Acceleration) -> None:
        """Make `acceleration` the standing plan (None or [] for dense); the old plan stays if it fails."""
        configs = tuple(as_config_list(acceleration))
        try:
            self._attach(configs)
        except Exception:
            self._attach(self._acceleration_configs)
            raise
        self._acceleration_configs = configs

    def acceleration_report(self) -> dict[str, Any] | None:
        """`AccelerationHandle.report()` of the last call (None if it ran without acceleration)."""
        return self._acceleration_report

    def __call__(self, *args, acceleration: Acceleration = None, **kwargs):
        """The parent's `__call__`; `acceleration` (a config, a list, [] for dense) replaces the
        standing plan for this call only, and the standing plan is back afterwards, even on errors."""
        per_call = acceleration is not None
        handle = None
        try:
            if per_call:
                self._attach(tuple(as_config_list(acceleration)))
            handle = self._acceleration_handle
            return super().__call__(*args, **kwargs)
        finally:
            self._acceleration_report = None if handle is None else handle.report()
            if per_call:
                self._attach(self._acceleration_configs)

    def save_pretrained(self, *args, **kwargs):
        """Save the plain pipeline: techniques may reshape modules (DyDiT slices weights), so the
        plan comes off while saving and goes back on after."""
        self._attach(())
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self._attach(self._acceleration_configs)

    def to_json_string(self) -> str:
        """Record the diffusers parent as `_class_name`, so saved folders load without dit-accel."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = self.diffusers_class().__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def diffusers_class(cls) -> type[DiffusionPipeline]:
        """The diffusers pipeline class this class accelerates."""
        return next(c for c in cls.__mro__ if issubclass(c, DiffusionPipeline) and not issubclass(c, AccelerationMixin))

    def _attach(self, configs: tuple[Any, ...]) -> None:
        """Take the attached plan off and put `configs` on (nothing for an empty plan)."""
        if self._acceleration_handle is not None:
            self._acceleration_handle.remove()
            self._acceleration_handle = None
        if configs:
            self._acceleration_handle = apply(self, *configs)


class AcceleratedStableDiffusion3Pipeline(AccelerationMixin, StableDiffusion3Pipeline):
    """`StableDiffusion3Pipeline` (SD3, SD3.5) with `acceleration=`."""


class AcceleratedFluxPipeline(AccelerationMixin, FluxPipeline):
    """`FluxPipeline` (FLUX.1) with `acceleration=`."""


class AcceleratedPixArtAlphaPipeline(AccelerationMixin, PixArtAlphaPipeline):
    """`PixArtAlphaPipeline` with `acceleration=`."""


class AcceleratedPixArtSigmaPipeline(AccelerationMixin, PixArtSigmaPipeline):
    """`PixArtSigmaPipeline` with `acceleration=`."""


class AcceleratedDiTPipeline(AccelerationMixin, DiTPipeline):
    """`DiTPipeline` (class-conditional DiT) with `acceleration=`."""


class AcceleratedWanPipeline(AccelerationMixin, WanPipeline):
    """`WanPipeline` (Wan 2.1 / 2.2) with `acceleration=`."""


class AcceleratedHunyuanVideoPipeline(AccelerationMixin, HunyuanVideoPipeline):
    """`HunyuanVideoPipeline` with `acceleration=`."""


class AcceleratedCogVideoXPipeline(AccelerationMixin, CogVideoXPipeline):
    """`CogVideoXPipeline` with `acceleration=`."""
