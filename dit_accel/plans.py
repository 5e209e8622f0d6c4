"""Acceleration plans written as text, for the command line and the UI.

A plan is one or more techniques joined with `+`, each `name:field=value,field=value`:

    ras:sample_ratio=0.5,warmup_steps=2
    ras:sample_ratio=0.5,error_reset_steps=(6, 9)+svg2:top_p=0.9
    ras                                  (every field at its default)

Values are Python literals (`ast.literal_eval`); a value that is not one is taken as a string,
so `metric=l2norm` works without quotes. Commas and `+` inside brackets or quotes belong to the
value.
"""

from __future__ import annotations

import ast
import dataclasses
import re

from .config import AccelerationConfig, ConfigError, check_compatible
from .methods import CONFIG_CLASSES

_TECHNIQUE_START = re.compile(r"\s*[A-Za-z_]\w*\s*(:|\+|$)")


def techniques() -> dict[str, type[AccelerationConfig]]:
    """Plan names -> config classes (`{"ras": RASConfig, ...}`)."""
    return {cls.name: cls for cls in CONFIG_CLASSES}


def fields_of(cls: type[AccelerationConfig]) -> list[str]:
    """The fields a plan may set for `cls`."""
    return [f.name for f in dataclasses.fields(cls) if f.init]


def _split(text: str, separator: str) -> list[str]:
    """Split at `separator` outside brackets and quotes; a `+` splits only before a technique name,
    so that `1e+3` stays one value."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == separator and depth == 0 and (separator != "+" or _TECHNIQUE_START.match(text, i + 1)):
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts]


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_technique(spec: str, num_steps: int | None = None) -> AccelerationConfig:
    """`"ras:sample_ratio=0.5"` -> `RASConfig(sample_ratio=0.5)`.

    With `num_steps`, a config class that has a `for_steps` schedule (RAS) gets the schedule scaled
    to that many steps for every field the spec leaves out.
    """
    name, _, body = spec.partition(":")
    name = name.strip()
    known = techniques()
    if name not in known:
        valid = ", ".join(known)
        raise ConfigError(f"unknown technique {name!r} in {spec!r}; valid techniques: {valid}")
    cls = known[name]
    values = {}
    for item in _split(body, ",") if body.strip() else []:
        field, equals, text = item.partition("=")
        field = field.strip()
        if not equals or not field:
            raise ConfigError(f"expected field=value in {spec!r}, got {item!r}")
        if field not in fields_of(cls):
            raise ConfigError(f"{name} has no field {field!r}; valid fields: {', '.join(fields_of(cls))}")
        if field in values:
            raise ConfigError(f"{name}.{field} is given twice in {spec!r}")
        values[field] = _value(text.strip())
    try:
        if num_steps is not None and hasattr(cls, "for_steps"):
            return cls.for_steps(num_steps, **values)
        return cls(**values)
    except TypeError as error:
        raise ConfigError(f"invalid value in {spec!r}: {error}") from error


def parse_plan(spec: str, num_steps: int | None = None) -> list[AccelerationConfig]:
    """`"ras:sample_ratio=0.5+svg2:top_p=0.9"` -> `[RASConfig(...), SVG2Config(...)]`, checked to be
    combinable. Raises `ConfigError` with the valid names on any mistake."""
    if not spec.strip():
        raise ConfigError(f"empty acceleration plan; valid techniques: {', '.join(techniques())}")
    configs = [parse_technique(part, num_steps) for part in _split(spec, "+")]
    check_compatible(configs)
    return configs

