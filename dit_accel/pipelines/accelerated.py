"""Drop-in diffusers pipeline classes with an `acceleration=` argument.

    pipe = AcceleratedFluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev",
                                                   acceleration=[RASConfig(sample_ratio=0.5),
                                                                 FirstBlockCacheConfig(threshold=0.08)])
    image = pipe(prompt).images[0]                    # accelerated (the standing plan)
    pipe.acceleration_report()["flops_ratio"]
    image = pipe(prompt, acceleration=[]).images[0]   # this call dense, the plan stays
    pipe.set_acceleration(None)                       # dense from now on

Every class is `AccelerationMixin` + the diffusers class, generated from one table. The parent's
`__init__` is untouched because diffusers reads its signature to know the components; every method
the mixin overrides shows the parent's signature (plus a keyword-only `acceleration` where it takes
one), because diffusers and its users read those too (`joint_attention_kwargs`, `callback_on_step_end`,
`num_images_per_prompt`, ...). Folders written by `save_pretrained` are plain diffusers folders (the
parent class name, no hooks), loadable with or without dit-accel.

The standing plan belongs to the transformer, where its hooks live, so pipelines sharing components
share it: `AcceleratedX.from_pipe(pipe)` and `AcceleratedX(**pipe.components)` run under `pipe`'s
plan, a plain diffusers pipeline built from them does too, and `set_acceleration` on any of them (or
`from_pipe(pipe, acceleration=...)`) replaces the plan for all of them, as `enable_cache` or a LoRA on
a shared transformer would. A per-call `acceleration=` stays that call's own.
"""

from __future__ import annotations

import inspect
import json
import types
import weakref
from dataclasses import dataclass
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
from torch import nn

from ..api import AccelerationHandle, apply
from ..models import pipeline_transformers
from ..plan_spec import parse_plan

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


@dataclass
class _StandingPlan:
    """The plan every call of the pipelines built on one transformer uses unless it passes its own."""

    configs: tuple[Any, ...] = ()
    #: its hooks, while they are on (a per-call plan takes them off for its call)
    handle: AccelerationHandle | None = None


#: keyed by the pipelines' (first) transformer, so the plan lives and dies with the components
_STANDING: "weakref.WeakKeyDictionary[nn.Module, _StandingPlan]" = weakref.WeakKeyDictionary()


class AccelerationMixin:
    """Adds a standing acceleration plan, per-call plans and a report to a diffusers pipeline."""

    _acceleration_report: dict[str, Any] | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, acceleration: Acceleration = None, **kwargs):
        """`DiffusionPipeline.from_pretrained`, then `set_acceleration(acceleration)`."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.set_acceleration(acceleration)
        return pipe

    @classmethod
    def from_pipe(cls, pipeline: DiffusionPipeline, *, acceleration: Acceleration = None, **kwargs):
        """`DiffusionPipeline.from_pipe` (same components, no copy): without `acceleration` the new pipeline
        runs under the shared transformer's plan; with it, that plan is replaced for both."""
        pipe = super().from_pipe(pipeline, **kwargs)
        if acceleration is not None:
            pipe.set_acceleration(acceleration)
        return pipe

    @property
    def acceleration(self) -> list[Any]:
        """The standing plan: the configs every call uses unless it passes its own."""
        return list(self._standing_plan().configs)

    def set_acceleration(self, acceleration: Acceleration) -> None:
        """Make `acceleration` the standing plan (None or [] for dense) of this pipeline and of every
        pipeline sharing its transformer; the old plan stays if it fails."""
        standing = self._standing_plan()
        configs = tuple(as_config_list(acceleration))
        try:
            self._put_on(standing, configs)
        except Exception:
            self._put_on(standing, standing.configs)
            raise
        standing.configs = configs

    def acceleration_report(self) -> dict[str, Any] | None:
        """`AccelerationHandle.report()` of this pipeline's last call (None if it ran without acceleration)."""
        return self._acceleration_report

    def __call__(self, *args, acceleration: Acceleration = None, **kwargs):
        """`acceleration` (a config, a list, [] for dense) replaces the standing plan for this call only;
        the standing plan is back afterwards, even on errors."""
        standing = self._standing_plan()
        per_call = acceleration is not None
        handle = None
        try:
            if per_call:
                handle = self._put_on(standing, tuple(as_config_list(acceleration)))
            else:
                handle = standing.handle
            if handle is None:
                return super().__call__(*args, **kwargs)
            with handle.running(self):
                return super().__call__(*args, **kwargs)
        finally:
            self._acceleration_report = None if handle is None else handle.report()
            if per_call:
                self._put_on(standing, standing.configs)

    def save_pretrained(self, *args, **kwargs):
        """Save the plain pipeline: techniques may reshape modules (DyDiT slices weights), so the
        plan comes off while saving and goes back on after."""
        standing = self._standing_plan()
        self._put_on(standing, ())
        try:
            return super().save_pretrained(*args, **kwargs)
        finally:
            self._put_on(standing, standing.configs)

    def to_json_string(self) -> str:
        """Record the diffusers parent as `_class_name`, so saved folders load without dit-accel."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = self.diffusers_class().__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    @classmethod
    def diffusers_class(cls) -> type[DiffusionPipeline]:
        """The diffusers pipeline class this class accelerates."""
        return next(c for c in cls.__mro__ if issubclass(c, DiffusionPipeline) and not issubclass(c, AccelerationMixin))

    def _standing_plan(self) -> _StandingPlan:
        transformer = pipeline_transformers(self)[0][0]
        if transformer not in _STANDING:
            _STANDING[transformer] = _StandingPlan()
        return _STANDING[transformer]

    def _put_on(self, standing: _StandingPlan, configs: tuple[Any, ...]) -> AccelerationHandle | None:
        """Take the plan on the transformer off and put `configs` on (nothing for an empty plan)."""
        if standing.handle is not None:
            standing.handle.remove()
            standing.handle = None
        if configs:
            standing.handle = apply(self, *configs)
        return standing.handle


def _with_acceleration(signature: inspect.Signature) -> inspect.Signature:
    """`signature` with a keyword-only `acceleration=None` before its `**kwargs`, if any."""
    parameters = list(signature.parameters.values())
    end = len(parameters) - (bool(parameters) and parameters[-1].kind is inspect.Parameter.VAR_KEYWORD)
    parameters.insert(end, inspect.Parameter("acceleration", inspect.Parameter.KEYWORD_ONLY, default=None,
                                             annotation=Acceleration))
    return signature.replace(parameters=parameters)


def _showing(method: types.FunctionType, parent_method: Any, signature: inspect.Signature) -> types.FunctionType:
    """A copy of the mixin's `method` that shows `signature` and the mixin's doc above the parent's."""
    copy = types.FunctionType(method.__code__, method.__globals__, method.__name__, method.__defaults__,
                              method.__closure__)
    copy.__kwdefaults__ = method.__kwdefaults__
    copy.__signature__ = signature
    copy.__doc__ = "\n\n".join(d for d in (inspect.cleandoc(method.__doc__ or ""), inspect.getdoc(parent_method)) if d)
    return copy


#: mixin method -> whether it takes `acceleration`; each is shown with its parent's signature
_OVERRIDDEN = {"__call__": True, "from_pretrained": True, "from_pipe": True, "save_pretrained": False,
               "to_json_string": False}


def accelerated_class(parent: type[DiffusionPipeline], models: str) -> type:
    """`AccelerationMixin` + `parent`, named `Accelerated<parent>`, its overridden methods showing the
    parent's signatures."""
    name = f"Accelerated{parent.__name__}"
    namespace: dict[str, Any] = {"__module__": __name__, "__qualname__": name,
                                 "__doc__": f"`{parent.__name__}` ({models}) with `acceleration=`."}
    for method_name, takes_acceleration in _OVERRIDDEN.items():
        member = AccelerationMixin.__dict__[method_name]
        is_classmethod = isinstance(member, classmethod)
        function = member.__func__ if is_classmethod else member
        parent_method = getattr(parent, method_name)
        signature = inspect.signature(parent_method)
        if is_classmethod:  # the parent's bound signature, with `cls` back in front
            signature = signature.replace(parameters=[inspect.Parameter("cls", inspect.Parameter.POSITIONAL_ONLY),
                                                      *signature.parameters.values()])
        if takes_acceleration:
            signature = _with_acceleration(signature)
        shown = _showing(function, parent_method, signature)
        shown.__qualname__ = f"{name}.{method_name}"
        namespace[method_name] = classmethod(shown) if is_classmethod else shown
    return type(name, (AccelerationMixin, parent), namespace)


AcceleratedStableDiffusion3Pipeline = accelerated_class(StableDiffusion3Pipeline, "SD3, SD3.5")
AcceleratedFluxPipeline = accelerated_class(FluxPipeline, "FLUX.1")
AcceleratedPixArtAlphaPipeline = accelerated_class(PixArtAlphaPipeline, "PixArt-α")
AcceleratedPixArtSigmaPipeline = accelerated_class(PixArtSigmaPipeline, "PixArt-Σ")
AcceleratedDiTPipeline = accelerated_class(DiTPipeline, "class-conditional DiT")
AcceleratedWanPipeline = accelerated_class(WanPipeline, "Wan 2.1 / 2.2")
AcceleratedHunyuanVideoPipeline = accelerated_class(HunyuanVideoPipeline, "HunyuanVideo")
AcceleratedCogVideoXPipeline = accelerated_class(CogVideoXPipeline, "CogVideoX")
