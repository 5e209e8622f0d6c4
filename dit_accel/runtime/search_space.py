"""What a technique offers `tune`: the settings worth trying, declared on its registration.

`register_technique(..., search_space=...)` (or `register_config`) gives a function of a
`SearchContext` that returns `Setting`s; `dit_accel.tuning` asks every registration in turn and
tries each setting on the first batch of tuning prompts. A setting may belong to a `knob`: the last
(boldest) setting of each knob that still holds the target goes `bolder` until it fails. A setting
that needs a calibration makes its configs in `prepare(context)` when it first runs, through
`context.calibrate` (one run on the first batch, counted against the search's budget). Nothing here
runs anything: these are plain types the techniques may import (`tuning/` builds the context).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable


@dataclass(frozen=True)
class SearchContext:
    """What a search space may depend on: the run's step count and a way to calibrate."""

    #: the step count the plan is tuned for
    steps: int
    #: `calibrate(config, what, path=None) -> config`: `dit_accel.calibrate` on the first tuning batch
    #: (`what` is told to the user; `path`: the file a calibration writes)
    calibrate: Callable[..., Any]
    #: a folder for calibration files (the winner's move beside its plan file)
    scratch: Path

    def calibration_file(self, name: str) -> str:
        """A path in the scratch folder for the calibration file of technique `name`."""
        return str(Path(self.scratch) / f"{name}.safetensors")


@dataclass(frozen=True)
class Setting:
    """One candidate plan of a single technique."""

    #: its name in the search's table: "<plan name>:<field>=<value>,..." as a plan spec reads it
    label: str
    #: the configs it runs (empty while `prepare` must make them)
    configs: tuple = ()
    #: makes the configs when the setting first runs (a calibration), else None
    prepare: Callable[[SearchContext], list] | None = None
    #: the knob it belongs to ("fbcache", "magcache, 4 skips", ...), if it has one
    knob: str | None = None
    #: the next, bolder setting of the same knob (None past the knob's range); `tune` keeps it only on
    #: the last setting of each knob in the search space
    bolder: Callable[[], "Setting | None"] | None = None


def every_preset(config_class: type) -> Callable[[SearchContext], list[Setting]]:
    """A search space of the documented presets of `config_class` (`<name>:preset=<preset>`)."""

    def space(context: SearchContext) -> list[Setting]:
        return [Setting(f"{config_class.name}:preset={name}", (config_class.preset(name),))
                for name in config_class.presets]

    return space
