"""Which technique carries out which config: a registry keyed by config class, as adapters are.

Techniques register themselves (`@register_technique(RASConfig)`); diffusers' cache configs are
registered the same way with their plan names. Configs never import the runtime, and the runtime
never imports the techniques: `dit_accel.techniques` fills this registry when it is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..config import AccelerationConfig, ConfigError, Stage


@dataclass(frozen=True)
class Registration:
    """How the runtime treats one config class."""

    config_class: type
    #: short name in plan strings
    name: str
    #: the technique class (a `runtime.technique.Technique`), or None while a config has no technique yet
    technique: type | None
    #: stages a config of this class occupies
    stages: Callable[[Any], frozenset[Stage]]
    #: one line for help texts
    summary: str


_REGISTRY: dict[type, Registration] = {}


def register_config(config_class: type, *, name: str, stages: Callable[[Any], frozenset[Stage]], summary: str,
                    technique: type | None = None) -> None:
    _REGISTRY[config_class] = Registration(config_class, name, technique, stages, summary)


def register_technique(config_class: type[AccelerationConfig], summary: str):
    """Class decorator: the technique that carries out `config_class` (named by `config_class.name`)."""

    def decorate(technique_class):
        register_config(config_class, name=config_class.name, stages=config_class.stages, summary=summary,
                        technique=technique_class)
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
    """What a user writes in a plan: every registration but those occupying no stage (a plan file's model
    check, which comes only from the file)."""
    return [r for r in _REGISTRY.values()
            if not (issubclass(r.config_class, AccelerationConfig) and not r.stages(r.config_class()))]


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
