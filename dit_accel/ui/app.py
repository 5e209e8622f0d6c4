"""The Gradio app: baseline and up to four plans on one seed, side by side, with what each plan skipped.

`build_app` makes the page. Above two tabs: model, prompt, negative prompt, seed, steps, guidance, size
and frames. "compare": one checkbox and form per technique (generated from its config, with presets)
and a diffusers step cache by name, or plan specs in the plan box (one a line, up to four); "run" shows
first an estimate of its time from the last run's speed, then every output enlarged to at least 384
pixels and labelled with its real size, one table, and a chart of speedup against PSNR of every run
since the page opened. For the plan picked below them: the baseline and the plan in a slider, their
difference as a heat map with its numbers, maps of what was skipped with legends
(`report_view.py`), FLOPs and the share computed per step, frame-wise PSNR for a video, and the
per-step JSON to download (`results.py`, `charts.py`). "cancel" stops a run at its next step with the
plan removed. "tune" searches for a plan on the same model and settings (`tune_tab.py`).

Runs go through `dit_accel.comparison`; the baseline is cached per (model, prompt, seed, settings), so
changing only the plans reruns only them. Hooks change the shared transformer, so runs are serialised
(`running.Models.lock`). Bound to anything but localhost, the app serves only the models named when it
was built and loads weights from safetensors only; request sizes are capped by `Limits`.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import gradio as gr
import torch

from ..comparison import compare
from ..loading import UsageError, call_arguments
from ..testing import FAMILIES
from . import charts
from .forms import step_caches, technique_forms
from .results import MIN_SHOWN, plan_views, shown_runs, table
from .running import (
    MAX_PLANS,
    Cancelled,
    Limits,
    Models,
    checked,
    estimate_text,
    form_plan,
    generated_pixels,
    generation_steps,
    model_error,
    plans_of,
    step_progress,
)
from .tune_tab import tune_tab

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
#: the embedded reference models, then a tiny model of every family
DEFAULT_MODELS = ("reference:image", "reference:detail", "reference:video", *(f"tiny:{family}" for family in FAMILIES))
#: compare()'s untimed warm-up steps, counted in the estimate
WARMUP_STEPS = 2
#: the outputs' boxes on the page: room for a `MIN_SHOWN` picture and the box's label
OUTPUT_BOX = MIN_SHOWN + 48


def build_app(models: list[str] | None = None, host: str = "127.0.0.1", device: str = "cpu",
              dtype: torch.dtype = torch.float32, limits: Limits = Limits()) -> gr.Blocks:
    """The page. Bound to a non-local `host`, only `models` are served (no free-form model)."""
    local = host in LOCAL_HOSTS
    if not local and not models:
        raise UsageError("a server bound beyond localhost serves only the models named with --models")
    allowed = list(models or DEFAULT_MODELS)
    store = Models(device, dtype, safetensors_only=not local)
    forms = technique_forms()
    outputs_dir = Path(tempfile.mkdtemp(prefix="dit-accel-ui-"))

    def served(model_spec: str) -> None:
        if model_spec not in allowed and not local:
            raise UsageError(f"model {model_spec!r} is not served here; served: {', '.join(allowed)}")

    with gr.Blocks(title="dit-accel") as app:
        gr.Markdown("# dit-accel\nBaseline and accelerated plans on the same seed.")
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
        settings = [model, prompt, negative, seed, steps, guidance, height, width, frames]
        with gr.Tab("compare"):
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
            plan_text = gr.Textbox("", label="plans (replace the choices above)", lines=2,
                                   info=f"one plan a line, up to {MAX_PLANS}: a plan spec, e.g. "
                                   "ras:sample_ratio=0.5+fbcache:threshold=0.1"
                                   + (", or a plan file from dit-accel tune (its path here)" if local else ""))
            with gr.Row():
                button = gr.Button("run", variant="primary")
                cancel = gr.Button("cancel", variant="stop")
            estimate = gr.Markdown(elem_id="estimate")
            status = gr.Markdown(elem_id="status")
            with gr.Row(equal_height=True):
                columns = [gr.Image(label="baseline", type="filepath", height=OUTPUT_BOX, min_width=OUTPUT_BOX,
                                    elem_id="output-0", buttons=["download", "fullscreen"])]
                columns += [gr.Image(label=f"plan {i}", type="filepath", height=OUTPUT_BOX, min_width=OUTPUT_BOX,
                                     visible=False, elem_id=f"output-{i}", buttons=["download", "fullscreen"])
                            for i in range(1, MAX_PLANS + 1)]
            runs_table = gr.Markdown()
            pareto = gr.Image(label="speedup and PSNR of every run since the page opened", type="pil",
                              elem_id="pareto", visible=False)
            picked = gr.Dropdown([], label="plan to inspect against the baseline", interactive=True)
            with gr.Row(equal_height=True):
                slider = gr.ImageSlider(label="baseline | plan (drag)", type="filepath", elem_id="slider",
                                        max_height=OUTPUT_BOX, min_width=OUTPUT_BOX)
                difference = gr.Image(label="difference", type="pil", elem_id="difference", min_width=OUTPUT_BOX)
            numbers = gr.Markdown(elem_id="numbers")
            maps = gr.Gallery(label="what was skipped", columns=3, height=OUTPUT_BOX + 60, object_fit="contain",
                              fit_columns=False, elem_id="maps")
            with gr.Row():
                flops = gr.Image(label="FLOPs per step", type="pil", elem_id="flops")
                shares = gr.Image(label="share computed per step", type="pil", elem_id="shares")
            frame_chart = gr.Image(label="frame-wise PSNR", type="pil", visible=False, elem_id="frames")
            with gr.Row():
                what = gr.JSON(label="what was skipped, per step")
                report_file = gr.File(label="per-step numbers and the full report (JSON)")
            results = gr.State(None)
            history = gr.State([])
        with gr.Tab("tune"):
            tune_tab(store, limits, allowed, local, settings, plan_text, served)

        inspected = [slider, difference, numbers, maps, flops, shares, frame_chart, what, report_file]

        def show(result: dict | None, label: str | None) -> dict:
            """The inspected part of the page for plan `label` of the last run."""
            if not result or not label:
                return {}
            shown = result["shown"]
            index = next((i for i, s in enumerate(shown) if i and s.label == label), 1)
            views = plan_views(shown[0], shown[index], result["folder"], index)
            return {slider: views["slider"], difference: views["difference"], numbers: views["numbers"],
                    maps: gr.update(value=views["maps"], visible=bool(views["maps"])),
                    flops: views["flops"], shares: views["shares"],
                    frame_chart: gr.update(value=views["frames"], visible=views["frames"] is not None),
                    what: views["per_step"], report_file: views["file"]}

        def request_of(model_spec: str, numbers: tuple, prompt_text: str, negative_text: str, guidance_value):
            """The loaded pipeline, the pipeline call and the key of its cached baseline."""
            pipe, defaults = store.get(model_spec)
            steps_n, height_n, width_n, frames_n, seed_n = numbers
            call = call_arguments(pipe, defaults, {
                "prompt": prompt_text, "negative_prompt": negative_text or None, "num_inference_steps": steps_n,
                "guidance_scale": float(guidance_value), "height": height_n, "width": width_n,
                "num_frames": frames_n})
            return pipe, call, (model_spec, repr(sorted(call.items(), key=lambda kv: kv[0])), seed_n)

        def guess(model_spec, prompt_text, negative_text, seed_value, steps_value, guidance_value, height_value,
                  width_value, frames_value, plan_spec):
            """The run's time from this model's last speed, before it starts (a model not run yet: none)."""
            try:
                numbers = checked(limits, steps_value, height_value, width_value, frames_value, seed_value)
                if model_spec not in store.speed:  # not loaded either: nothing to estimate from
                    return estimate_text(None, numbers[0], 0, 0.0, WARMUP_STEPS)
                _, call, key = request_of(model_spec, numbers, prompt_text, negative_text, guidance_value)
            except Exception as error:  # the run that follows names the problem
                return f"estimate: none ({error})"
            plans = max(1, len([line for line in plan_spec.splitlines() if line.strip()]))
            return estimate_text(store.speed[model_spec], numbers[0], plans + (key not in store.baselines),
                                 generated_pixels(call), WARMUP_STEPS)

        def run(request: gr.Request, progress=gr.Progress(), *values):
            (model_spec, prompt_text, negative_text, seed_value, steps_value, guidance_value, height_value,
             width_value, frames_value, cache_name, cache_text, plan_spec, runs_so_far) = values[:13]
            technique_values = values[13:]
            session = request.session_hash
            store.start(session)
            started = time.perf_counter()
            try:
                numbers = checked(limits, steps_value, height_value, width_value, frames_value, seed_value)
                plans = plans_of(plan_spec, numbers[0], local,
                                 lambda: form_plan(forms, technique_values, cache_name, cache_text))
                served(model_spec)
                with store.lock:
                    store.check_cancel(session)
                    pipe, call, key = request_of(model_spec, numbers, prompt_text, negative_text, guidance_value)
                    cached = store.baselines.get(key)
                    say, step_callback = step_progress(pipe, progress, lambda: store.check_cancel(session))
                    say(estimate_text(store.speed.get(model_spec), numbers[0], len(plans) + (cached is None),
                                      generated_pixels(call), WARMUP_STEPS))
                    generating = time.perf_counter()
                    runs = compare(pipe, plans, seed=numbers[4], baseline=cached, progress=say,
                                   warmup_steps=WARMUP_STEPS, **call, **step_callback)
                    done = generation_steps(numbers[0], len(plans) + (cached is None), WARMUP_STEPS)
                    pixels = max(generated_pixels(call), 1e-6)
                    store.speed[model_spec] = (time.perf_counter() - generating) / done / pixels
                    store.keep_baseline(key, runs[0])
                    folder = Path(tempfile.mkdtemp(dir=outputs_dir))
                    shown = shown_runs(runs, folder, store.perceptual())
            except Cancelled:
                return {status: f"cancelled after {time.perf_counter() - started:.1f} s: the plan was removed, "
                                "the model is as it was"}
            except Exception as error:
                raise model_error(error) from None
            perceptual = store.perceptual()
            runs_so_far = runs_so_far + [{"label": s.label, "speedup": s.speedup, "psnr": s.psnr} for s in shown[1:]]
            result = {"shown": shown, "folder": folder}
            page = {status: f"done in {time.perf_counter() - started:.1f} s ({len(runs_so_far)} plan runs on this page)",
                    results: result, history: runs_so_far,
                    runs_table: table(shown, perceptual.name if perceptual else None),
                    pareto: gr.update(value=charts.pareto(runs_so_far), visible=True),
                    picked: gr.update(choices=[s.label for s in shown[1:]], value=shown[1].label)}
            for index, column in enumerate(columns):
                if index < len(shown):
                    name = "baseline (dense)" if index == 0 else shown[index].label
                    page[column] = gr.update(value=shown[index].picture, label=f"{name}: {shown[index].size}",
                                             visible=True)
                else:
                    page[column] = gr.update(value=None, visible=False)
            return {**page, **show(result, shown[1].label)}

        run_inputs = [*settings, cache, cache_fields, plan_text, history, *technique_inputs]
        run_outputs = [status, *columns, runs_table, pareto, picked, results, history, *inspected]
        button.click(guess, [*settings, plan_text], estimate, api_name="estimate", concurrency_limit=None
                     ).then(run, run_inputs, run_outputs, api_name="run")
        cancel.click(store.cancel, api_name="cancel", concurrency_limit=None)
        picked.input(show, [results, picked], inspected, api_name="inspect")
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
