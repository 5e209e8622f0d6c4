"""Which technique carries out which config, and what the tools need from it: a registry keyed by
config class, as adapters are.

Techniques register themselves (`@register_technique(RASConfig, summary, ...)`); diffusers' cache
configs are registered the same way with their plan names. A registration declares, besides the
stages its configs occupy, what `tune` may try (`search_space`, `runtime/search_space.py`) and how
`dit_accel.calibrate` completes a config (`calibrate`); the technique class declares its per-call
numbers (`Technique.stats`, `runtime/stats.py`). Tuning, calibration and the UI iterate this
registry and name no technique. Configs never import the runtime, and the runtime never imports the
techniques: `dit_accel.techniques` fills this registry when it is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import AccelerationConfig, ConfigError, Stage
from .search_space import SearchContext, Setting
from .stats import Stat

#: `search_space(context) -> settings`: what `tune` tries of a technique
SearchSpace = Callable[[SearchContext], "list[Setting]"]
#: `calibrate(pipe, config, *, apply, path, call_kwargs) -> config`: `config` completed with what it
#: learnt from one run of `pipe(**call_kwargs)` under `apply(pipe, ...)` (`dit_accel.apply`, passed in:
#: techniques sit below the api); `path`: the file to write, for a calibration kept in one
Calibrate = Callable[..., Any]


@dataclass(frozen=True)
class Registration:
    """How the runtime and the tools treat one config class."""

    config_class: type
    #: short name in plan strings
    name: str
    #: the technique class (a `runtime.technique.Technique`), or None while a config has no technique yet
    technique: type | None
    #: stages a config of this class occupies
    stages: Callable[[Any], frozenset[Stage]]
    #: one line for help texts
    summary: str
    #: the settings `tune` tries (None: none)
    search_space: SearchSpace | None = None
    #: how `dit_accel.calibrate` completes a config of this class (None: it needs no calibration)
    calibrate: Calibrate | None = None
    #: whether a user writes it in a plan (a plan file's model check comes only from the file)
    plan_member: bool = True


_REGISTRY: dict[type, Registration] = {}


def register_config(config_class: type, *, name: str, stages: Callable[[Any], frozenset[Stage]], summary: str,
                    technique: type | None = None, search_space: SearchSpace | None = None,
                    calibrate: Calibrate | None = None, plan_member: bool = True) -> None:
    _REGISTRY[config_class] = Registration(config_class, name, technique, stages, summary, search_space, calibrate,
                                           plan_member)


def register_technique(config_class: type[AccelerationConfig], summary: str, *,
                       search_space: SearchSpace | None = None, calibrate: Calibrate | None = None,
                       plan_member: bool = True):
    """Class decorator: the technique that carries out `config_class` (named by `config_class.name`)."""

    def decorate(technique_class):
        register_config(config_class, name=config_class.name, stages=config_class.stages, summary=summary,
                        technique=technique_class, search_space=search_space, calibrate=calibrate,
                        plan_member=plan_member)
        return technique_class

    return decorate


def registration(config: Any) -> Registration:
    """The registration of `config`'s class, or a `ConfigError` listing what a plan accepts."""
    for klass in type(config).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass]
    names = ", ".join(f"{r.config_class.__name__} ({r.name})" for r in _REGISTRY.values())
    raise ConfigError(f"expected acceleration configs, got {config!r}; a plan takes: {names}")


def registrations() -> list[Registration]:
    return list(_REGISTRY.values())


def plan_members() -> list[Registration]:
    """What a user writes in a plan: every registration but those that come only from a plan file."""
    return [r for r in _REGISTRY.values() if r.plan_member]


def declared_stats() -> list[Stat]:
    """Every registered technique's `stats`, in registration order, each key once (SVG2 and proxy
    attention share theirs)."""
    found: dict[str, Stat] = {}
    for r in _REGISTRY.values():
        for stat in getattr(r.technique, "stats", ()):
            found.setdefault(stat.key, stat)
    return list(found.values())


def stages_of(config: Any) -> frozenset[Stage]:
    return registration(config).stages(config)


def check_composable(configs: list[Any]) -> None:
    """Refuse two configs of one stage (no stage defines how two of its members combine yet)."""
    owner: dict[Stage, Any] = {}
    for config in configs:
        for stage in sorted(stages_of(config)):
            if stage in owner:
                first = owner[stage]
                raise ConfigError(
                    f"{type(first).__name__} and {type(config).__name__} cannot be combined: both occupy stage "
                    f"{int(stage)} ({stage.label}); a plan takes one config per stage")
            owner[stage] = config
