"""What a tuned plan must keep against dense (`Target`: one or more `Bound`s on the `METRICS`) and when the
search stops (`Budget`)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from typing import Any, Callable

from ..config import ConfigError
from ..metrics.suites import SUITES, CaptionSuite


@dataclasses.dataclass(frozen=True)
class Metric:
    """A quality of a plan's outputs against dense's on the same seeds, and how errors in it add up."""

    name: str
    higher_is_better: bool
    #: how far a first batch may miss a bound and still be worth the other batches
    margin: float
    #: how a value turns into an error that adds up across stacked techniques: "db" (PSNR: mean squared
    #: error), "similarity" (1 - value) or "distance" (the value)
    error: str
    #: values a bound may take, None: unbounded; `low` itself only where `low_open` is False
    low: float | None = None
    high: float | None = None
    low_open: bool = True

    def loss(self, value: float) -> float:
        if self.error == "db":
            return 10 ** (-min(value, 100.0) / 10)
        return 1 - value if self.error == "similarity" else value

    def from_loss(self, loss: float) -> float:
        if self.error == "db":
            return -10 * math.log10(loss) if loss > 0 else math.inf
        return 1 - loss if self.error == "similarity" else loss


#: psnr: dB, mean per image or frame; ssim: mean per image or frame; perceptual: a distance, mean per image or
#: frame (LPIPS where its weights exist, else the judge-feature distance, said so), kept from above; judge:
#: the share of the judge's attribute readings equal to its readings of dense (reference models only)
METRICS = {metric.name: metric for metric in (
    Metric("psnr", True, 1.0, "db"),
    Metric("ssim", True, 0.02, "similarity", 0.0, 1.0),
    Metric("perceptual", False, 0.02, "distance", 0.0, low_open=False),
    Metric("judge", True, 0.02, "similarity", 0.0, 1.0),
)}


@dataclasses.dataclass(frozen=True)
class Bound:
    """One metric a plan must keep: at least `value` (at most, for a distance); no value: only ranked by
    (the speed mode's quality to maximise)."""

    metric: str
    value: float | None = None

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"target metric {self.metric!r}: valid metrics: {', '.join(METRICS)}")
        kind, value = METRICS[self.metric], self.value
        if value is None or kind.low is None:
            return
        if value < kind.low or (value == kind.low and kind.low_open) or (kind.high is not None and value > kind.high):
            span = f"{'(' if kind.low_open else '['}{kind.low:g}, {'inf)' if kind.high is None else f'{kind.high:g}]'}"
            raise ConfigError(f"target {self.metric}={value:g}: {self.metric} targets lie in {span}")

    @property
    def kind(self) -> Metric:
        return METRICS[self.metric]

    def score(self, value: float) -> float:
        """The value on a scale where higher is better."""
        return value if self.kind.higher_is_better else -value

    def met(self, value: float | None, margin: float = 0.0) -> bool:
        """Whether `value` (None: not measured) keeps the bound, `margin` short of it allowed."""
        if self.value is None:
            return True
        return value is not None and self.score(value) >= self.score(self.value) - margin

    def __str__(self) -> str:
        if self.value is None:
            return self.metric
        return f"{self.metric}{'>=' if self.kind.higher_is_better else '<='}{self.value:g}"


@dataclasses.dataclass(frozen=True)
class Target:
    """What a plan must keep against dense, every bound at once (`psnr=30,judge=0.95`); the first is the
    primary one, which messages report and the speed mode maximises."""

    bounds: tuple[Bound, ...] = (Bound("psnr", 30.0),)

    def __post_init__(self) -> None:
        if not self.bounds:
            raise ConfigError("a target names at least one metric, e.g. psnr=30")
        names = [b.metric for b in self.bounds]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ConfigError(f"target {self}: {', '.join(twice)} named twice")

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        """`"psnr=30"`, `"psnr=30,ssim=0.9,perceptual=0.1,judge=0.95"`, a bare metric to rank by (`"ssim"`,
        the speed mode's), a bare number (PSNR in dB), or a Target."""
        if isinstance(text, Target):
            return text
        bounds = []
        for item in str(text).split(","):
            metric, equals, value = item.strip().partition("=")
            metric = metric.strip().lower()
            if not equals and re.fullmatch(r"[0-9.]+", metric):
                metric, value, equals = "psnr", metric, "="
            try:
                number = float(value) if equals else None
            except ValueError:
                raise ConfigError(f"target {text!r}: expected metric=value[,metric=value...], e.g. psnr=30 or "
                                  "psnr=30,ssim=0.9") from None
            bounds.append(Bound(metric, number))
        return cls(tuple(bounds))

    @classmethod
    def for_search(cls, target: str | Target | None, speedup: float | None) -> Target:
        """What `tune` searches for: `target` (default psnr=30) to hold; with `speedup`, its first metric
        (default psnr) to maximise at that speed, its values floors. Refused where a bound lacks the value
        it needs or the speed is not above dense's."""
        if speedup is not None and not speedup > 1:
            raise ConfigError(f"speedup={speedup:g}: ask for more than 1 (times dense's speed)")
        found = cls.parse(target if target is not None else "psnr=30" if speedup is None else "psnr")
        if speedup is None:
            found.require_values("to tune for, or ask for a speed (speedup=...) to rank by it")
        return found

    @property
    def primary(self) -> Bound:
        return self.bounds[0]

    @property
    def metric(self) -> str:
        """The primary metric's name."""
        return self.primary.metric

    @property
    def value(self) -> float | None:
        """The primary bound's value (None: only ranked by)."""
        return self.primary.value

    @property
    def metrics(self) -> tuple[str, ...]:
        return tuple(b.metric for b in self.bounds)

    def met(self, quality: Callable[[str], float | None]) -> bool:
        """Whether qualities (`quality(metric)`, None: not measured) keep every bound."""
        return all(b.met(quality(b.metric)) for b in self.bounds)

    def near(self, quality: Callable[[str], float | None]) -> bool:
        """Whether qualities keep every bound within its metric's margin (a first batch worth the others)."""
        return all(b.met(quality(b.metric), b.kind.margin) for b in self.bounds)

    def floors(self) -> Target | None:
        """The bounds with a value (the speed mode's floors), or None."""
        kept = tuple(b for b in self.bounds if b.value is not None)
        return Target(kept) if kept else None

    def require_values(self, why: str) -> None:
        """Refuse a bare metric where every bound needs a value (`why`: where it was given)."""
        bare = [b.metric for b in self.bounds if b.value is None]
        if bare:
            raise ConfigError(f"target {self}: {', '.join(bare)} needs a value ({bare[0]}=...) {why}")

    def check_judge(self, model: str | None, prompts: list[str], video: bool) -> None:
        """Refuse a `judge` bound where the judge's readings would mean nothing (`judge_refusal`), before
        anything is generated."""
        if "judge" in self.metrics:
            why = judge_refusal(model, prompts, video)
            if why is not None:
                raise ConfigError(f"target {self}: judge cannot be evaluated here: {why}; use psnr, ssim or perceptual")

    def __str__(self) -> str:
        return ",".join(str(b) for b in self.bounds)


def judge_suite(model: str | None) -> CaptionSuite | None:
    """The caption suite of the reference model `model` names (a `reference:` spec, or the folder a
    pipeline was loaded from), whose judge reads its outputs; None for any other model."""
    from ..testing.reference import reference_suite  # lazily: importing it sets HF_HUB_OFFLINE

    name = reference_suite(model)
    return None if name is None else SUITES[name]


def judge_refusal(model: str | None, prompts: list[str], video: bool) -> str | None:
    """Why the judge cannot read the outputs of `model` for `prompts`, or None. Each judge was trained on
    the procedural scenes of one reference model, and only for its captions: its readings of anything
    else mean nothing."""
    suite = judge_suite(model)
    if suite is None or suite.video != video:
        models = ", ".join(f"reference:{name}" for name, s in SUITES.items() if s.video == video)
        return (f"the judges read only the procedural scenes the reference models ({models}) draw, and "
                + (f"{model!r} is not one" if model else "a pipeline built in memory is not one"))
    stray = next((p for p in prompts if not suite.is_caption(p)), None)
    if stray is not None:
        return (f"the judge reads only the procedural scenes of reference:{suite.name}'s captions, and {stray!r} "
                "is not one")
    return None


def model_source(pipe: Any) -> tuple[str | None, bool]:
    """Where `pipe` was loaded from (its `name_or_path`) and whether it makes videos."""
    return getattr(pipe, "name_or_path", None), "num_frames" in inspect.signature(pipe.__call__).parameters


@dataclasses.dataclass(frozen=True)
class Budget:
    """When the search stops: after `seconds` of wall clock and/or `generations` pipeline calls."""

    seconds: float | None = 45 * 60
    generations: int | None = None

    @classmethod
    def parse(cls, text: str | Budget | float | None) -> Budget:
        """`"45m"`, `"90s"`, `"1.5h"`, `"120gen"` (pipeline calls), a number of seconds, or a Budget."""
        if text is None or isinstance(text, Budget):
            return text or cls()
        if isinstance(text, (int, float)):
            return cls(seconds=float(text))
        match = re.fullmatch(r"\s*([0-9.]+)\s*(s|m|h|gen)?\s*", str(text))
        if match is None:
            raise ConfigError(f"budget {text!r}: expected e.g. 45m, 90s, 1h or 120gen")
        amount, unit = float(match.group(1)), match.group(2) or "s"
        if amount <= 0:
            raise ConfigError(f"budget {text!r} must be > 0")
        if unit == "gen":
            return cls(seconds=None, generations=int(amount))
        return cls(seconds=amount * {"s": 1, "m": 60, "h": 3600}[unit])
