"""Plan files: a plan's configs with the model and step count they were made for (JSON, or YAML by suffix).

`dit-accel tune` writes them; `load_plan(path)` reads them back as configs, a `ModelCheckConfig` first,
so `apply(pipe, *load_plan(path))` refuses another model by name. Every place that takes a plan spec
(`parse_plan`: the CLI, the benchmarks, the UI, `Accelerated*Pipeline(acceleration=path)`) takes a plan
file's path too. Field values are JSON's own, with tuples, tensors and dtypes tagged so they come back
as they were:

    {"format": "dit-accel plan", "version": 1, "models": ["<class>|<config hash>|<weights>"],
     "num_inference_steps": 20, "summary": "<the plan, for people>",
     "configs": [{"technique": "magcache", "fields": {"threshold": 0.06, ...}}, ...], ...}
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError
from .techniques.model_check import ModelCheckConfig
from .models import pipeline_transformers
from .models.identity import model_identity
from .runtime.registry import registration, registrations

FORMAT = "dit-accel plan"
VERSION = 1
SUFFIXES = (".json", ".yaml", ".yml")


def is_plan_file(text: str) -> bool:
    """Whether `text` names an existing plan file (by its suffix: .json, .yaml or .yml)."""
    path = Path(text.strip())
    return path.suffix.lower() in SUFFIXES and path.is_file()


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    raise TypeError(f"{type(value).__name__}")


def _decode(value: Any, folder: Path | None = None) -> Any:
    if isinstance(value, list):
        return [_decode(v, folder) for v in value]
    if not isinstance(value, dict):
        return value
    if "file" in value:
        return str((folder or Path()) / value["file"])
    if "tuple" in value:
        return tuple(_decode(v, folder) for v in value["tuple"])
    if "tensor" in value:
        return torch.tensor(value["tensor"], dtype=getattr(torch, value["dtype"]))
    if "dtype" in value:
        return getattr(torch, value["dtype"])
    raise ConfigError(f"plan file: unknown value {value!r}")


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _within(value: Any, field: dataclasses.Field, folder: Path | None) -> str | None:
    """A file field's path relative to `folder` when the file lies within it, else None."""
    spec = field.metadata.get("param")
    if folder is None or spec is None or not spec.file or not isinstance(value, str):
        return None
    try:
        return Path(value).resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        return None


def config_record(config: Any, folder: Path | None = None) -> dict[str, Any]:
    """{"technique": plan name, "fields": values}; a field JSON cannot hold (a callback) must be at its
    default, which the loader then gives it again; a file within `folder` (the plan file's) is kept
    relative to it, so the folder can move."""
    fields = {}
    for field in dataclasses.fields(config):
        if not field.init:
            continue
        value = getattr(config, field.name)
        relative = _within(value, field, folder)
        if relative is not None:
            fields[field.name] = {"file": relative}
            continue
        try:
            fields[field.name] = _encode(value)
        except TypeError:
            if value is not _default(field) and value != _default(field):
                raise ConfigError(f"{type(config).__name__}.{field.name} holds a {type(value).__name__}, which a "
                                  "plan file cannot store") from None
    return {"technique": registration(config).name, "fields": fields}


def config_from_record(record: dict[str, Any], folder: Path | None = None) -> Any:
    """The config of a record; its relative files under `folder` (the plan file's)."""
    known = {r.name: r.config_class for r in registrations()}
    name = record.get("technique")
    if name not in known:
        raise ConfigError(f"plan file: unknown technique {name!r}; valid: {', '.join(known)}")
    try:
        return known[name](**{k: _decode(v, folder) for k, v in record.get("fields", {}).items()})
    except TypeError as error:
        raise ConfigError(f"plan file: {name}: {error}") from None


def plan_summary(configs: list[Any]) -> str:
    """A plan as people read it: each member's name and the plain fields it sets away from their defaults
    (`magcache:threshold=0.06,mag_ratios=...`); "dense" for none. Not parsed back: plan files hold
    every field."""
    members = []
    for config in configs:
        changed = []
        for field in dataclasses.fields(config):
            value, default = getattr(config, field.name), field.default
            if not field.init or field.name.startswith("_") or value is default:
                continue
            plain = isinstance(value, (bool, int, float, str, tuple)) or value is None
            if not plain:
                changed.append(f"{field.name}=...")
            elif value != default:
                changed.append(f"{field.name}={value!r}")
        name = registration(config).name
        members.append(f"{name}:{','.join(changed)}" if changed else name)
    return "+".join(members) or "dense"


def save_plan(path: str | Path, configs: list[Any], pipe: Any, *, num_inference_steps: int | None,
              **details: Any) -> dict[str, Any]:
    """Write `configs` as a plan file for `pipe`'s transformers at `num_inference_steps`, with `details`
    (target, measured quality and speed, machine, ...) beside them; returns what was written."""
    path = Path(path)
    plain = [c for c in configs if not isinstance(c, ModelCheckConfig)]
    content = {"format": FORMAT, "version": VERSION,
               "models": [ModelCheckConfig.joined(model_identity(t)) for t in pipeline_transformers(pipe)[0]],
               "num_inference_steps": num_inference_steps, "summary": plan_summary(plain),
               "configs": [config_record(c, path.parent) for c in plain], **details}
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(content, sort_keys=False))
    else:
        path.write_text(json.dumps(content, indent=2) + "\n")
    return content


def read_plan_file(path: str | Path) -> dict[str, Any]:
    """A plan file's content, checked to be one."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"plan file {str(path)!r}: no such file")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            content = yaml.safe_load(text)
        else:
            content = json.loads(text)
    except Exception as error:  # json's and yaml's own errors: said in one line
        raise ConfigError(f"plan file {str(path)!r} cannot be read: {error}") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise ConfigError(f"{str(path)!r} is not a dit-accel plan file (written by dit-accel tune)")
    if content.get("version") != VERSION:
        raise ConfigError(f"plan file {str(path)!r} has version {content.get('version')!r}; this dit-accel "
                          f"reads version {VERSION}")
    return content


def load_plan(path: str | Path, num_steps: int | None = None) -> list[Any]:
    """The configs of a plan file, its `ModelCheckConfig` first; with `num_steps`, a file tuned for other
    steps is refused here (else at the first transformer call)."""
    content = read_plan_file(path)
    tuned = content.get("num_inference_steps")
    if num_steps is not None and tuned is not None and num_steps != tuned:
        raise ConfigError(f"plan {str(path)!r} was tuned for {tuned} steps, not {num_steps}: tune it again for "
                          f"{num_steps} steps")
    check = ModelCheckConfig(models=tuple(content.get("models", ())), num_inference_steps=tuned, source=str(path))
    return [check, *(config_from_record(record, Path(path).parent) for record in content.get("configs", []))]
