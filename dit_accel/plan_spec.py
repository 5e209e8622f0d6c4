"""Acceleration plans written as text, for the command line and the UI.

A plan is one or more members joined with `+`, each `name:field=value,field=value`, where a name is
a dit-accel technique or one of diffusers' caches:

    ras:sample_ratio=0.5,warmup_steps=2
    ras:sample_ratio=0.5+fbcache:threshold=0.08
    taylorseer:cache_interval=4+ras      (every field at its default)

Values are Python literals (`ast.literal_eval`); a value that is not one is taken as a string,
so `metric=l2norm` works without quotes. Commas and `+` inside brackets or quotes belong to the
value.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any

from . import techniques  # noqa: F401  (registers every technique and diffusers cache)
from .config import AccelerationConfig, ConfigError, check_dataclass_fields, config_fields
from .plan_files import is_plan_file, load_plan
from .runtime.registry import check_composable, plan_members

_TECHNIQUE_START = re.compile(r"\s*[A-Za-z_]\w*\s*(:|\+|$)")


def plan_names() -> dict[str, type]:
    """Plan names -> config classes (`{"ras": RASConfig, "fbcache": FirstBlockCacheConfig, ...}`)."""
    return {r.name: r.config_class for r in plan_members()}


def fields_of(cls: type) -> list[str]:
    """The fields a plan may set for `cls`."""
    return [f.name for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")]


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


def _needs_calibration(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """A config whose data must be learnt from a run (MagCache's ratios) is parsed in its calibration
    mode; `dit_accel.calibrate` turns it into the real one."""
    if "calibrate" in fields_of(cls) and "mag_ratios" in fields_of(cls) and "mag_ratios" not in values:
        return {**values, "calibrate": True}
    return values


def _with_steps(cls: type, values: dict[str, Any], num_steps: int) -> Any:
    """Step schedules the spec leaves out, scaled to `num_steps`."""
    if hasattr(cls, "for_steps"):
        return cls.for_steps(num_steps, **values)
    if "num_inference_steps" in fields_of(cls) and "num_inference_steps" not in values:
        values = {**values, "num_inference_steps": num_steps}
    return cls(**values)


def parse_technique(spec: str, num_steps: int | None = None) -> Any:
    """`"ras:sample_ratio=0.5"` -> `RASConfig(sample_ratio=0.5)`; `"proxy:preset=fast"` starts from a
    preset, and fields given beside it override it.

    With `num_steps`, a schedule left out is scaled to that many steps (RAS's `for_steps`,
    MagCache's `num_inference_steps`).
    """
    name, _, body = spec.partition(":")
    name = name.strip()
    known = plan_names()
    if name not in known:
        raise ConfigError(f"unknown technique {name!r} in {spec!r}; valid techniques: {', '.join(known)}")
    cls = known[name]
    values = {}
    for item in _split(body, ",") if body.strip() else []:
        field, equals, text = item.partition("=")
        field = field.strip()
        if not equals or not field:
            raise ConfigError(f"expected field=value in {spec!r}, got {item!r}")
        if field not in fields_of(cls) and not (field == "preset" and getattr(cls, "presets", None)):
            raise ConfigError(f"{name} has no field {field!r}; valid fields: {', '.join(fields_of(cls))}")
        if field in values:
            raise ConfigError(f"{name}.{field} is given twice in {spec!r}")
        values[field] = _value(text.strip())
    if "preset" in values:
        preset = values.pop("preset")
        if preset not in cls.presets:
            raise ConfigError(f"{name} has no preset {preset!r} in {spec!r}; valid presets: {', '.join(cls.presets)}")
        values = {**cls.presets[preset], **values}
    values = _needs_calibration(cls, values)
    try:
        config = _with_steps(cls, values, num_steps) if num_steps is not None else cls(**values)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"invalid value in {spec!r}: {error}") from error
    check_dataclass_fields(config)
    return config


def steps_run(configs: list[Any], num_steps: int | None) -> int | None:
    """The steps a plan runs when the call asks for `num_steps`: its schedule member's (fewer steps)."""
    return next((c.steps_run(num_steps) for c in configs if hasattr(c, "steps_run")), num_steps)


def parse_plan(spec: str, num_steps: int | None = None) -> list[Any]:
    """`"ras:sample_ratio=0.5+fbcache:threshold=0.08"` -> `[RASConfig(...), FirstBlockCacheConfig(...)]`,
    checked to be combinable, or a plan file's configs (`plan_files.load_plan`: a path ending in .json,
    .yaml or .yml). Raises `ConfigError` with the valid names on any mistake."""
    if not spec.strip():
        raise ConfigError(f"empty acceleration plan; valid techniques: {', '.join(plan_names())}")
    if is_plan_file(spec):
        return load_plan(spec.strip(), num_steps)
    parts = _split(spec, "+")
    configs = [parse_technique(part, num_steps) for part in parts]
    check_composable(configs)
    # a member that runs another step count (fewer steps): the others' schedules are scaled to it
    runs = steps_run(configs, num_steps)
    if runs != num_steps:
        configs = [c if hasattr(c, "steps_run") else parse_technique(part, runs) for part, c in zip(parts, configs)]
    return configs


def describe() -> str:
    """Every plan name with its stages and fields (type, default, range, doc), from the configs' metadata."""
    lines = []
    for reg in plan_members():
        cls = reg.config_class
        ours = issubclass(cls, AccelerationConfig)
        # diffusers' caches occupy stage 1 whatever their fields; ours are shown at their defaults
        stages = ", ".join(str(int(s)) for s in sorted(reg.stages(cls() if ours else None)))
        lines.append(f"{reg.name}: {cls.__name__}, stage {stages}: {reg.summary}")
        if ours:
            for preset, values in cls.presets.items():
                lines.append(f"    preset={preset}: {', '.join(f'{k}={v!r}' for k, v in values.items())}")
            for spec in config_fields(cls):
                extra = f", {spec.param.range_text()}" if spec.param.range_text() else ""
                lines.append(f"    {spec.name} ({spec.type_text}, default {spec.default!r}{extra}): {spec.param.doc}")
        else:
            lines.append(f"    fields: {', '.join(fields_of(cls))} (see diffusers' {cls.__name__})")
    return "\n".join(lines) + "\n"
