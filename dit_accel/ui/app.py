"""The Gradio app: baseline and accelerated on one seed, side by side, with what each plan skipped.

`build_app` makes the page: model, prompt, negative prompt, seed, steps, guidance, size and frames;
one checkbox and form per technique (generated from its config, with presets) and a diffusers step
cache by name; the two outputs, a table (time, speedup, FLOPs ratio, PSNR/SSIM vs baseline) and
per-step numbers and pictures of what was skipped (`report_view.py`, from what each technique
declares). Runs go through `dit_accel.comparison`; the baseline is cached per (model, prompt, seed,
settings), so changing only the plan reruns only the accelerated side. Hooks
change the shared transformer, so runs are serialised (Gradio's queue, one at a time). Bound to
anything but localhost, the app serves only the models named when it was built and loads weights
from safetensors only; request sizes are capped by `Limits`.
"""

from __future__ import annotations

import inspect
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import gradio as gr
import numpy as np
import torch
from PIL import Image

from ..comparison import PlanRun, compare
from ..config import ConfigError
from ..loading import UsageError, call_arguments, load_model
from ..models import UnsupportedModelError
from ..outputs import save_gif
from ..plan_files import is_plan_file
from ..plan_spec import parse_plan, parse_technique
from ..runtime.registry import check_composable
from ..testing import FAMILIES
from .forms import TechniqueForm, config_from, step_caches, technique_forms
from .report_view import pictures, skipped

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: the embedded reference models, then a tiny model of every family
DEFAULT_MODELS = ("reference:image", "reference:detail", "reference:video", *(f"tiny:{family}" for family in FAMILIES))
BASELINES_KEPT = 8


@dataclass(frozen=True)
class Limits:
    """The largest request the server runs; larger ones get a message naming the limit."""

    max_steps: int = 50
    max_side: int = 1024
    max_frames: int = 81


class _Models:
    """Pipelines loaded once per model spec, and the dense baselines of recent requests."""

    def __init__(self, device: str, dtype: torch.dtype, safetensors_only: bool):
        self.device, self.dtype, self.safetensors_only = device, dtype, safetensors_only
        self._pipes: dict[str, tuple[Any, dict]] = {}
        self.baselines: OrderedDict[tuple, PlanRun] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, spec: str) -> tuple[Any, dict]:
        if spec not in self._pipes:
            pipe, defaults = load_model(spec, self.device, self.dtype, self.safetensors_only)
            pipe.set_progress_bar_config(disable=True)
            self._pipes[spec] = (pipe, defaults)
        return self._pipes[spec]


def _step_progress(pipe, progress) -> tuple[Callable[[str], None], dict[str, Any]]:
    """compare()'s status callback and, where the pipeline takes one, a step callback: the bar shows
    the run compare() is on and its step."""
    status = {"run": ""}

    def say(message: str) -> None:
        status["run"] = message
        progress(0, desc=message)

    if "callback_on_step_end" not in inspect.signature(pipe.__call__).parameters:
        return say, {}

    def on_step(pipeline, step: int, timestep, tensors: dict) -> dict:
        total = getattr(pipeline, "num_timesteps", 0) or step + 1
        progress((step + 1) / total, desc=f"{status['run']}: step {step + 1}/{total}")
        return tensors

    return say, {"callback_on_step_end": on_step}


def _save(output: torch.Tensor, folder: Path, name: str) -> str:
    """The first sample as a PNG (image) or an animated GIF (video); returns the path."""
    sample = output[0]
    frames = [sample] if sample.ndim == 3 else list(sample)
    pictures = [Image.fromarray((f.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for f in frames]
    path = folder / (f"{name}.png" if len(pictures) == 1 else f"{name}.gif")
    if len(pictures) == 1:
        pictures[0].save(path)
    else:
        save_gif(pictures, path)
    return str(path)


def _table(runs: list[PlanRun]) -> str:
    lines = ["| run | time (s) | speedup | FLOPs ratio | PSNR vs baseline (dB) | SSIM |", "|---|---|---|---|---|---|"]
    for run in runs:
        quality = ("-", "-") if run.psnr is None else (f"{run.psnr:.2f}", f"{run.ssim:.4f}")
        lines.append(f"| {run.label} | {run.seconds:.2f} | {run.speedup:.2f}x | {run.flops_ratio:.3f} | "
                     f"{quality[0]} | {quality[1]} |")
    lines.append("\nLPIPS is not shown: it needs torchvision and downloaded weights, which this server does "
                 "not use.")
    return "\n".join(lines)


def build_app(models: list[str] | None = None, host: str = "127.0.0.1", device: str = "cpu",
              dtype: torch.dtype = torch.float32, limits: Limits = Limits()) -> gr.Blocks:
    """The page. Bound to a non-local `host`, only `models` are served (no free-form model)."""
    local = host in LOCAL_HOSTS
    if not local and not models:
        raise UsageError("a server bound beyond localhost serves only the models named with --models")
    allowed = list(models or DEFAULT_MODELS)
    store = _Models(device, dtype, safetensors_only=not local)
    forms = technique_forms()
    outputs_dir = Path(tempfile.mkdtemp(prefix="dit-accel-ui-"))

    with gr.Blocks(title="dit-accel") as app:
        gr.Markdown("# dit-accel\nBaseline and accelerated on the same seed.")
        with gr.Row():
            model = gr.Dropdown(allowed, value=allowed[0], label="model", allow_custom_value=local)
            seed = gr.Number(0, label="seed", precision=0)
        prompt = gr.Textbox("a large red circle on the left, blue plain background", label="prompt")
        negative = gr.Textbox("", label="negative prompt")
        with gr.Row():
            # ranges are checked by the run, which names the field (Gradio's own bounds message does not)
            steps = gr.Number(20, label="steps", precision=0, info=f"1 to {limits.max_steps}")
            guidance = gr.Number(4.0, label="guidance")
            height = gr.Number(64, label="height", precision=0, info=f"8 to {limits.max_side} pixels")
            width = gr.Number(64, label="width", precision=0, info=f"8 to {limits.max_side} pixels")
            frames = gr.Number(13, label="frames (video)", precision=0, info=f"1 to {limits.max_frames}")
        technique_inputs: list[gr.components.Component] = []
        for form in forms:
            with gr.Accordion(f"{form.name}: {form.summary}", open=False):
                enabled = gr.Checkbox(False, label=f"use {form.name}")
                preset = gr.Dropdown(["defaults", *form.presets], value="defaults", label="preset")
                widgets = [_widget(field) for field in form.fields]
                preset.change(lambda name, form=form: form.values_of(None if name == "defaults" else name),
                              preset, widgets)
            technique_inputs += [enabled, *widgets]
        with gr.Row():
            cache = gr.Dropdown(["none", *step_caches()], value="none", label="diffusers step cache")
            cache_fields = gr.Textbox("", label="cache fields (e.g. threshold=0.1)")
        plan_text = gr.Textbox("", label="plan (replaces the choices above)",
                               info="a plan spec, e.g. ras:sample_ratio=0.5+fbcache:threshold=0.1"
                               + (", or a plan file from dit-accel tune (its path on this machine)" if local else ""))
        button = gr.Button("run", variant="primary")
        with gr.Row():
            baseline_out = gr.Image(label="baseline", type="filepath")
            accelerated_out = gr.Image(label="accelerated", type="filepath")
        table = gr.Markdown()
        gallery = gr.Gallery(label="what was skipped", columns=3)
        what = gr.JSON(label="what was skipped, per step")

        def run(model_spec, prompt_text, negative_text, seed_value, steps_value, guidance_value, height_value,
                width_value, frames_value, cache_name, cache_text, plan_spec, *technique_values,
                progress=gr.Progress()):
            try:
                numbers = _checked(limits, steps_value, height_value, width_value, frames_value, seed_value)
                if plan_spec.strip():
                    if is_plan_file(plan_spec) and not local:
                        raise UsageError("plan files are read only by a server on localhost; give a plan spec")
                    plan = parse_plan(plan_spec.strip(), numbers[0])
                else:
                    plan = _plan(forms, technique_values, cache_name, cache_text)
                if model_spec not in allowed and not local:
                    raise UsageError(f"model {model_spec!r} is not served here; served: {', '.join(allowed)}")
                with store.lock:
                    pipe, defaults = store.get(model_spec)
                    steps_n, height_n, width_n, frames_n, seed_n = numbers
                    call = call_arguments(pipe, defaults, {
                        "prompt": prompt_text, "negative_prompt": negative_text or None, "num_inference_steps": steps_n,
                        "guidance_scale": float(guidance_value), "height": height_n, "width": width_n,
                        "num_frames": frames_n})
                    key = (model_spec, repr(sorted(call.items(), key=lambda kv: kv[0])), seed_n)
                    say, step_callback = _step_progress(pipe, progress)
                    runs = compare(pipe, [plan], seed=seed_n, baseline=store.baselines.get(key), progress=say,
                                   **call, **step_callback)
                    store.baselines[key] = runs[0]
                    store.baselines.move_to_end(key)
                    while len(store.baselines) > BASELINES_KEPT:
                        store.baselines.popitem(last=False)
            except (ConfigError, UsageError, UnsupportedModelError, NotImplementedError) as error:
                raise gr.Error(str(error)) from None
            except torch.OutOfMemoryError:
                raise gr.Error("out of memory: try fewer steps, a smaller size or fewer frames") from None
            except Exception as error:  # a model that cannot load, a pipeline error: one line, no trace
                raise gr.Error(f"{type(error).__name__}: {error}") from None
            folder = Path(tempfile.mkdtemp(dir=outputs_dir))
            dense, accelerated = runs
            return (_save(dense.output, folder, "baseline"), _save(accelerated.output, folder, "accelerated"),
                    _table(runs), pictures(accelerated.report, dense.output), skipped(accelerated.report))

        button.click(run, [model, prompt, negative, seed, steps, guidance, height, width, frames, cache, cache_fields,
                           plan_text, *technique_inputs], [baseline_out, accelerated_out, table, gallery, what], api_name="run")
    app.queue(default_concurrency_limit=1)
    return app


def _widget(field) -> gr.components.Component:
    """The widget of a config field; its range goes into the help text, and the config checks it."""
    from ..config import Param

    bounds = Param("", field.low, field.high).range_text()
    info = f"{field.doc} ({bounds})" if bounds else field.doc
    if field.widget == "checkbox":
        return gr.Checkbox(field.default, label=field.name, info=info)
    if field.widget == "choice":
        return gr.Dropdown(list(field.choices), value=str(field.default), label=field.name, info=info)
    if field.widget in ("number", "integer"):
        return gr.Number(field.default, label=field.name, info=info, precision=0 if field.widget == "integer" else None)
    return gr.Textbox(field.shown(field.default), label=field.name, info=info)


def _plan(forms: list[TechniqueForm], values: tuple, cache_name: str, cache_text: str) -> list:
    plan, at = [], 0
    for form in forms:
        enabled, shown = values[at], list(values[at + 1: at + 1 + len(form.fields)])
        at += 1 + len(form.fields)
        if enabled:
            plan.append(config_from(form, shown))
    if cache_name and cache_name != "none":
        plan.append(parse_technique(f"{cache_name}:{cache_text}" if cache_text.strip() else cache_name))
    if not plan:
        raise UsageError("pick at least one technique or step cache")
    check_composable(plan)
    return plan


def _checked(limits: Limits, steps, height, width, frames, seed) -> tuple[int, int, int, int, int]:
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
