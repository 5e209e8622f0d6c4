"""The UI's technique forms, generated from the config dataclasses: a technique that registers a
config with documented fields appears with its knobs and presets, without UI changes.

Only what this module returns reaches Gradio: a `FieldForm` says which widget a field gets (number,
integer, checkbox, choice, or text for tuples and optional values, read as Python literals) and
`config_from` turns the widgets' values back into a config, raising `ConfigError` by field name.
"""

from __future__ import annotations

import ast
import typing
from dataclasses import dataclass
from typing import Any, Literal

from ..config import AccelerationConfig, ConfigError, config_fields
from ..runtime.registry import plan_members

Widget = Literal["number", "integer", "checkbox", "choice", "text"]


@dataclass(frozen=True)
class FieldForm:
    """One config field as a widget."""

    name: str
    widget: Widget
    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def shown(self, value: Any) -> Any:
        """A field value as the widget shows it."""
        return repr(value) if self.widget == "text" else value

    def read(self, shown: Any) -> Any:
        """The widget's value as the field's value (text is read as a Python literal)."""
        if self.widget == "text":
            try:
                return ast.literal_eval(str(shown).strip())
            except (ValueError, SyntaxError) as error:
                raise ConfigError(f"{self.name}: cannot read {shown!r} as a value ({error})") from None
        if self.widget == "integer" and isinstance(shown, float) and shown.is_integer():
            return int(shown)
        return shown


@dataclass(frozen=True)
class TechniqueForm:
    name: str
    config_class: type
    summary: str
    fields: tuple[FieldForm, ...]

    @property
    def presets(self) -> dict[str, dict[str, Any]]:
        return dict(self.config_class.presets)

    def values_of(self, preset: str | None) -> list[Any]:
        """The widget values of the defaults, or of a preset."""
        config = self.config_class() if not preset else self.config_class.preset(preset)
        return [f.shown(getattr(config, f.name)) for f in self.fields]


def _widget(annotation: Any) -> tuple[Widget, tuple[str, ...]]:
    if typing.get_origin(annotation) is Literal:
        return "choice", tuple(str(a) for a in typing.get_args(annotation))
    if annotation is bool:
        return "checkbox", ()
    if annotation is int:
        return "integer", ()
    if annotation is float:
        return "number", ()
    return "text", ()


def technique_forms() -> list[TechniqueForm]:
    """A form per dit-accel technique that is built (diffusers' caches are picked by name instead)."""
    forms = []
    for reg in plan_members():
        cls = reg.config_class
        if not issubclass(cls, AccelerationConfig):
            continue
        fields = []
        for spec in config_fields(cls):
            widget, choices = _widget(spec.annotation)
            fields.append(FieldForm(spec.name, widget, spec.default, spec.param.doc, spec.param.low,
                                    spec.param.high, choices))
        forms.append(TechniqueForm(reg.name, cls, reg.summary, tuple(fields)))
    return forms


def config_from(form: TechniqueForm, shown: list[Any]) -> AccelerationConfig:
    """The config the widgets describe; `ConfigError` names the field that is wrong."""
    return form.config_class(**{f.name: f.read(value) for f, value in zip(form.fields, shown)})


def step_caches() -> list[str]:
    """Plan names of diffusers' step caches, offered beside the techniques."""
    return [reg.name for reg in plan_members() if not issubclass(reg.config_class, AccelerationConfig)]
