"""Configs: frozen dataclasses whose fields declare their type, range and doc; the stages of a plan.

Every technique's config derives from `AccelerationConfig`. A field is declared with `param(default,
doc, low=..., high=...)`; the dataclass annotation gives its type. Construction checks every field
against both (`ConfigError` naming the field), normalises lists to tuples and ints to floats where
a float is asked for, and then the config is frozen: one instance may be shared by several
transformers (Wan 2.2's two experts). The same metadata feeds the command line's help and the UI's
forms. Configs know nothing of the runtime; `dit_accel.runtime.registry` maps each config class to
the technique that carries it out.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from pathlib import Path
from dataclasses import dataclass
from typing import Any, ClassVar, Literal


class ConfigError(ValueError):
    """A configuration value that no technique can honour, or configs that cannot be combined."""


class Stage(enum.IntEnum):
    """Nesting levels of one transformer call, outermost first (not a time order)."""

    #: which steps run at all: fewer steps, a step mask (before any call of the transformer)
    SCHEDULE = 0
    #: return a cached or forecast output for the whole call, a block range or an attention/MLP module
    STEP_SKIP = 1
    #: which image tokens the blocks compute at this step
    TOKEN_SET = 2
    #: over a block range: pool the token grid, run the blocks, unpool and add back
    TOKEN_TRANSFORM = 3
    #: which heads, MLP channels and MLP tokens a block computes
    WIDTH = 4
    #: where keys and values of tokens not computed come from (cache, pooling)
    KV_SOURCE = 5
    #: how queries attend to keys: dense SDPA, block-sparse, proxy
    ATTENTION_KERNEL = 6

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", " ")


@dataclass(frozen=True)
class Param:
    """What a config field accepts, beyond its annotated type."""

    doc: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    #: the field names a file, and this says how to make one: the file must exist (a plan file keeps it
    #: relative to its own folder where it lies within)
    file: str | None = None

    def range_text(self) -> str:
        """"in [0, 1]", ">= 0", "> 0", or "" when any number is fine."""
        def text(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else f"{v:g}"

        if self.low is None and self.high is None:
            return ""
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {text(self.low)}"
        if self.low is None:
            return f"{'<' if self.high_open else '<='} {text(self.high)}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{text(self.low)}, {text(self.high)}{right}"

    def admits(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or not (value >= self.high if self.high_open else value > self.high)


def param(default: Any, doc: str, *, low: float | None = None, high: float | None = None,
          low_open: bool = False, high_open: bool = False, file: str | None = None) -> Any:
    """A config field: its default, a one-line doc, and the range numbers (or tuple items) must lie in;
    `file`: its value is the path of a file that must exist, made as this says."""
    return dataclasses.field(default=default, metadata={"param": Param(doc, low, high, low_open, high_open, file)})


@dataclass(frozen=True)
class FieldSpec:
    """One field of a config, for validation, help texts and forms."""

    name: str
    annotation: Any
    default: Any
    param: Param

    @property
    def type_text(self) -> str:
        return _type_text(self.annotation)


def config_fields(cls: type) -> list[FieldSpec]:
    """The documented fields of an `AccelerationConfig` subclass, in declaration order."""
    hints = typing.get_type_hints(cls)
    return [FieldSpec(f.name, hints[f.name], f.default, f.metadata["param"])
            for f in dataclasses.fields(cls) if "param" in f.metadata]


def _is_optional(annotation: Any) -> tuple[bool, Any]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return True, args[0]
    return False, annotation


def _type_text(annotation: Any) -> str:
    optional, inner = _is_optional(annotation)
    if optional:
        return f"{_type_text(inner)} or None"
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"tuple of {_type_text(args[0])}"
        return "(" + ", ".join(_type_text(a) for a in args) + ")"
    return getattr(inner, "__name__", str(inner))


def _coerce(value: Any, annotation: Any, where: str, spec: Param) -> Any:
    """`value` checked against `annotation` and `spec`'s range, normalised (list -> tuple, int -> float)."""
    optional, inner = _is_optional(annotation)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where} must be {_type_text(annotation)}, got None")
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is Literal:
        if value not in args or isinstance(value, bool):
            raise ConfigError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise ConfigError(f"{where} must be {_type_text(inner)}, got {value!r}")
        item_types = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(item_types) != len(value):
            raise ConfigError(f"{where} must be {_type_text(inner)}, got {value!r}")
        return tuple(_coerce(v, t, f"{where}[{i}]", spec) for i, (v, t) in enumerate(zip(value, item_types)))
    if inner is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be True or False, got {value!r}")
        return value
    if inner is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if inner in (int, float):
        numeric = (int,) if inner is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, numeric):
            raise ConfigError(f"{where} must be {'an int' if inner is int else 'a number'}"
                              f"{' ' + spec.range_text() if spec.range_text() else ''}, got {value!r}")
        if not spec.admits(value):
            raise ConfigError(f"{where} must be {spec.range_text()}, got {value!r}")
        return float(value) if inner is float else value
    raise TypeError(f"{where}: unsupported config annotation {annotation!r}")


def _supported(annotation: Any) -> bool:
    """Annotations `_coerce` checks: numbers, bools, strings, literals, tuples of those, and their Optional."""
    optional, inner = _is_optional(annotation)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is Literal:
        return True
    if origin is tuple:
        return all(a is Ellipsis or _supported(a) for a in args)
    return inner in (int, float, bool, str)


def check_dataclass_fields(config: Any) -> None:
    """Type-check the simply typed fields of any config dataclass (diffusers' cache configs too)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        annotation = hints.get(f.name)
        if annotation is not None and _supported(annotation):
            _coerce(getattr(config, f.name), annotation, f"{type(config).__name__}.{f.name}", Param(""))


@dataclass(frozen=True)
class AccelerationConfig:
    """Base of `RASConfig`, `FlexDiTConfig`, `DyDiTConfig`, `SVG2Config`, `ProxyAttentionConfig`.

    Subclasses declare fields with `param(...)`, add cross-field checks in `validate()`, say which
    stages their active fields occupy in `stages()`, and return from `keep_all()` the setting that
    must reproduce the dense output while running the technique's real code path.
    """

    #: Short name used in plan strings (`ras:sample_ratio=0.5+fbcache:threshold=0.08`) and reports.
    name: ClassVar[str] = ""
    #: Named settings measured on the reference models ("quality", "balanced", "fast"): field values.
    presets: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        for spec in config_fields(type(self)):
            value = _coerce(getattr(self, spec.name), spec.annotation, f"{type(self).__name__}.{spec.name}",
                            spec.param)
            object.__setattr__(self, spec.name, value)
            if spec.param.file and value is not None and not Path(value).is_file():
                raise ConfigError(f"{type(self).__name__}.{spec.name}: no such file {value!r}; make one with "
                                  f"{spec.param.file}")
        self.validate()

    def validate(self) -> None:
        """Raise `ConfigError` for combinations of field values that cannot work together."""

    def stages(self) -> frozenset[Stage]:
        """The stages this config's active fields occupy."""
        raise NotImplementedError

    @classmethod
    def keep_all(cls) -> "AccelerationConfig":
        raise NotImplementedError

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "AccelerationConfig":
        """The named preset, with `overrides` on top (`ProxyAttentionConfig.preset("fast")`)."""
        if name not in cls.presets:
            valid = ", ".join(cls.presets) or "none"
            raise ConfigError(f"{cls.__name__} has no preset {name!r}; valid presets: {valid}")
        return cls(**{**cls.presets[name], **overrides})
