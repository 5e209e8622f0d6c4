"""What the page's runs share: the loaded models, the cached baselines, the last run's speed (for the
estimate shown before a run), cancel requests, and the checks of a request's numbers and plans.

Hooks change the shared transformer, so runs and tunes take `Models.lock` one at a time. Cancel is asked
per browser session and read at the next step (or between runs, for pipelines without a step callback):
`Cancelled` is raised inside the pipeline call, so `comparison.timed_run` removes the plan on its way out
and the model is left as it was.
"""

from __future__ import annotations

import inspect
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import gradio as gr
import torch

from ..comparison import PlanRun
from ..config import ConfigError
from ..loading import UsageError, load_model
from ..models import UnsupportedModelError
from ..plan_files import is_plan_file
from ..plan_spec import parse_plan, parse_technique
from ..runtime.registry import check_composable
from .forms import TechniqueForm, config_from

BASELINES_KEPT = 8
#: plans compared at once, beside the baseline
MAX_PLANS = 4


@dataclass(frozen=True)
class Limits:
    """The largest request the server runs; larger ones get a message naming the limit."""

    max_steps: int = 50
    max_side: int = 1024
    max_frames: int = 81
    #: the largest tuning budget, in seconds or in generations
    max_tune_seconds: float = 1800.0
    max_tune_generations: int = 400


class Cancelled(BaseException):
    """The session asked to stop its run. Not an `Exception`: code that keeps going past a failed candidate
    or run (`tune`'s search) must not swallow it."""


class Models:
    """Pipelines loaded once per model spec, the dense baselines of recent requests, each model's last
    speed, and the sessions that asked to cancel."""

    def __init__(self, device: str, dtype: torch.dtype, safetensors_only: bool):
        self.device, self.dtype, self.safetensors_only = device, dtype, safetensors_only
        self._pipes: dict[str, tuple[Any, dict]] = {}
        self.baselines: OrderedDict[tuple, PlanRun] = OrderedDict()
        #: per model spec: seconds per step and million output pixels, over the last run's generations
        self.speed: dict[str, float] = {}
        self.lock = threading.Lock()
        self._cancelled: set[str] = set()
        self._perceptual: Any = None

    def get(self, spec: str) -> tuple[Any, dict]:
        if spec not in self._pipes:
            pipe, defaults = load_model(spec, self.device, self.dtype, self.safetensors_only)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[spec] = (pipe, defaults)
        return self._pipes[spec]

    def keep_baseline(self, key: tuple, run: PlanRun) -> None:
        self.baselines[key] = run
        self.baselines.move_to_end(key)
        while len(self.baselines) > BASELINES_KEPT:
            self.baselines.popitem(last=False)

    def perceptual(self) -> Any:
        """The perceptual distance, loaded at first use (LPIPS, or the offline judge's feature distance);
        None where neither loads."""
        if self._perceptual is None:
            from ..metrics.quality import PerceptualDistance

            try:
                self._perceptual = PerceptualDistance()
            except Exception:  # no LPIPS weights and no judge: the table says it was not measured
                self._perceptual = False
        return self._perceptual or None

    def cancel(self, request: gr.Request) -> None:
        """The cancel button: the session's run or tune stops at its next step (and says so itself: an
        answer from here could arrive after the run's and hide it)."""
        self._cancelled.add(request.session_hash)

    def start(self, session: str) -> None:
        """A new run of `session`: an earlier cancel no longer applies."""
        self._cancelled.discard(session)

    def check_cancel(self, session: str) -> None:
        if session in self._cancelled:
            raise Cancelled()


def generated_pixels(call: dict[str, Any]) -> float:
    """Million output pixels (times frames) of one sample of `call`."""
    return call.get("height", 0) * call.get("width", 0) * (call.get("num_frames") or 1) / 1e6


def generation_steps(steps: int, runs: int, warmup_steps: int) -> int:
    """Steps `runs` generations of a comparison take, each warmed up first."""
    return runs * (steps + min(steps, warmup_steps))


def estimate_text(seconds_per_unit: float | None, steps: int, runs: int, pixels: float, warmup_steps: int) -> str:
    if seconds_per_unit is None:
        return "estimate: none yet; the first run on this model measures its speed (loading it counts too)"
    seconds = seconds_per_unit * generation_steps(steps, runs, warmup_steps) * max(pixels, 1e-6)
    return f"estimate: about {seconds:.0f} s for {runs} generation(s) of {steps} steps, from the last run's speed"


def step_progress(pipe: Any, progress: Callable, check: Callable[[], None]) -> tuple[Callable[[str], None], dict]:
    """compare()'s status callback and, where the pipeline takes one, a step callback: the bar shows the run
    compare() is on and its step; both stop the run when `check` raises (cancel)."""
    status = {"run": ""}

    def say(message: str) -> None:
        check()
        status["run"] = message
        progress(0, desc=message)

    if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        return say, {}

    def on_step(pipeline, step: int, timestep, tensors: dict) -> dict:
        check()
        total = getattr(pipeline, "num_timesteps", 0) or step + 1
        progress((step + 1) / total, desc=f"{status['run']}: step {step + 1}/{total}")
        return tensors

    return say, {"callback_on_step_end": on_step}


def checked(limits: Limits, steps, height, width, frames, seed) -> tuple[int, int, int, int, int]:
    """The request's numbers as ints, refused by name when out of the server's limits."""
    values = {"steps": steps, "height": height, "width": width, "frames": frames, "seed": seed}
    if any(v is None for v in values.values()):
        raise UsageError(f"missing value: {', '.join(k for k, v in values.items() if v is None)}")
    steps, height, width, frames, seed = (int(v) for v in values.values())
    caps = {"steps": (steps, 1, limits.max_steps), "height": (height, 8, limits.max_side),
            "width": (width, 8, limits.max_side), "frames": (frames, 1, limits.max_frames)}
    for name, (value, low, high) in caps.items():
        if not low <= value <= high:
            raise UsageError(f"{name} must be in [{low}, {high}] on this server, got {value}")
    return steps, height, width, frames, seed


def form_plan(forms: list[TechniqueForm], values: tuple, cache_name: str, cache_text: str) -> list:
    """The configs the technique forms and the step cache choice describe."""
    plan, at = [], 0
    for form in forms:
        enabled, shown = values[at], list(values[at + 1: at + 1 + len(form.fields)])
        at += 1 + len(form.fields)
        if enabled:
            plan.append(config_from(form, shown))
    if cache_name and cache_name != "none":
        plan.append(parse_technique(f"{cache_name}:{cache_text}" if cache_text.strip() else cache_name))
    if not plan:
        raise UsageError("pick at least one technique or step cache, or write a plan in the plan box")
    check_composable(plan)
    return plan


def plans_of(plan_text: str, steps: int, local: bool, form: Callable[[], list]) -> list:
    """The plans of a request: one per non-empty line of the plan box (specs, or plan files on localhost),
    at most `MAX_PLANS`; an empty box: the forms' plan. Each is parsed here, so a mistake is named before
    anything runs."""
    lines = [line.strip() for line in plan_text.splitlines() if line.strip()]
    if not lines:
        return [form()]
    if len(lines) > MAX_PLANS:
        raise UsageError(f"at most {MAX_PLANS} plans at once (one a line), got {len(lines)}")
    for line in lines:
        if is_plan_file(line) and not local:
            raise UsageError("plan files are read only by a server on localhost; give a plan spec")
        parse_plan(line, steps)
    return lines


def model_error(error: BaseException) -> gr.Error:
    """A run's failure as one line on the page, never a stack trace."""
    if isinstance(error, (ConfigError, UsageError, UnsupportedModelError, NotImplementedError)):
        return gr.Error(str(error))
    if isinstance(error, torch.OutOfMemoryError):
        return gr.Error("out of memory: try fewer steps, a smaller size or fewer frames")
    return gr.Error(f"{type(error).__name__}: {error}")  # a model that cannot load, a pipeline error
