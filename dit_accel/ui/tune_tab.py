"""The tune tab: `dit_accel.tune` on the page's model and settings, with a target and a budget, on prompts
from a box or a reference suite's captions; progress (generations, candidates measured, best so far)
in the bar; the plan found goes into the compare tab's plan box (a plan file's path on localhost, where
the box reads files; its spec elsewhere). A server beyond localhost tunes only the models it serves,
within `Limits`' budget, like its runs.
"""

from __future__ import annotations

import inspect
import tempfile
import time
from typing import Any, Callable

import gradio as gr

from ..loading import UsageError, call_arguments
from ..metrics.suites import SUITES
from ..tuning import Budget, Candidate, CandidateStatus, Target, TuneResult, tune
from .running import Cancelled, Limits, Models, checked, model_error

PROMPT_BOX = "the prompt box below"
#: captions a suite may give at most
MAX_CAPTIONS = 64


class TuneProgress:
    """tune's messages and the step callback turned into the page's progress bar: the share of the budget
    spent, generations run, candidates measured on every batch, and the fastest that met the target."""

    def __init__(self, progress: Callable, budget: Budget, check: Callable[[], None], metric: str = "psnr"):
        self.progress, self.budget, self.check, self.metric = progress, budget, check, metric
        self.started = time.perf_counter()
        self.generations, self.measured, self.last = 0, 0, ""
        self.best: tuple[float, str] | None = None

    def show(self) -> None:
        spent = [self.generations / self.budget.generations] if self.budget.generations else []
        if self.budget.seconds:
            spent.append((time.perf_counter() - self.started) / self.budget.seconds)
        best = "none yet" if self.best is None else self.best[1]
        self.progress(min(max(spent), 1.0), desc=f"{self.generations} generations; {self.measured} candidates "
                      f"measured on every batch; best so far: {best}; {self.last}")

    def say(self, message: str) -> None:
        self.check()
        self.last = message
        self.show()

    def measured_candidate(self, candidate: Candidate) -> None:
        """tune's `on_measured`: one more candidate measured on every batch; the fastest that met the target."""
        self.measured += 1
        if candidate.status is CandidateStatus.MEETS_TARGET and (self.best is None or
                                                                   candidate.speedup > self.best[0]):
            quality = candidate.quality(self.metric)
            self.best = (candidate.speedup, f"{candidate.label} ({candidate.speedup:.2f}x, {self.metric} {quality:.2f})")
        self.show()

    def on_step(self, pipeline, step: int, timestep, tensors: dict) -> dict:
        self.check()
        if step == 0:
            self.generations += 1
            self.show()
        return tensors


def summary(result: TuneResult) -> str:
    """What the search found, and the candidates that met the target, fastest first."""
    metrics = result.target.metrics
    met = sorted((c for c in result.candidates if c.status is CandidateStatus.MEETS_TARGET),
                 key=lambda c: -(c.final_speedup or c.speedup))
    lines = [result.message, "",
             "| candidate | speedup | FLOPs ratio | " + " | ".join(metrics) + " |",
             "|---|---:|---:|" + "---:|" * len(metrics)]
    lines += [f"| {c.label} | {(c.final_speedup or c.speedup):.2f}x | {c.flops_ratio or 1:.3f} | "
              + " | ".join(f"{c.quality(m):.3f}" for m in metrics) + " |" for c in met[:8]]
    tried = len([c for c in result.candidates if c.batches])
    lines += ["", f"{tried} candidates tried, {result.generations} generations, {result.seconds:.0f} s"]
    return "\n".join(lines)


def tuning_prompts(source: str, count: Any, box: str, seed: int) -> list[str]:
    if source == PROMPT_BOX:
        prompts = [line.strip() for line in (box or "").splitlines() if line.strip()]
        if not prompts:
            raise UsageError("write the tuning prompts in the box, one a line, or take a reference suite's captions")
        return prompts
    if count is None or not 1 <= int(count) <= MAX_CAPTIONS:
        raise UsageError(f"captions from a suite must be in [1, {MAX_CAPTIONS}], got {count}")
    return SUITES[source].captions(int(count), seed)


def checked_budget(text: str, limits: Limits) -> Budget:
    budget = Budget.parse(text)
    if budget.generations is not None and budget.generations > limits.max_tune_generations:
        raise UsageError(f"budget must be at most {limits.max_tune_generations}gen on this server, got {text}")
    if budget.seconds is not None and budget.seconds > limits.max_tune_seconds:
        raise UsageError(f"budget must be at most {limits.max_tune_seconds:g}s on this server, got {text}")
    return budget


def tune_tab(store: Models, limits: Limits, allowed: list[str], local: bool, settings: list, plan_box,
             served: Callable[[str], None]) -> None:
    """The tab's widgets and its tune event (`api_name="tune"`); `settings` are the page's model, prompt,
    negative prompt, seed, steps, guidance, height, width and frames."""
    gr.Markdown("Search for the fastest plan that keeps a quality target against dense on your prompts, with the "
                "model and settings above (`dit-accel tune`); the plan found goes into the compare tab's plan box.")
    with gr.Row():
        target = gr.Textbox("psnr=30", label="target", info="metric=value[,...]: psnr, ssim, perceptual; judge on "
                            "the reference models")
        budget = gr.Textbox("60gen", label="budget", info=f"seconds (90s, 5m) or generations (40gen); at most "
                            f"{limits.max_tune_seconds:g}s or {limits.max_tune_generations}gen here")
        batch = gr.Number(4, label="prompts a call", precision=0)
    with gr.Row():
        source = gr.Dropdown([PROMPT_BOX, *SUITES], value=PROMPT_BOX, label="tuning prompts from",
                             info="the box, or the captions of a reference model's suite")
        count = gr.Number(8, label="captions from a suite", precision=0, info=f"1 to {MAX_CAPTIONS}")
    prompts = gr.Textbox("a large red circle on the left, blue plain background", lines=3,
                         label="tuning prompts, one a line")
    with gr.Row():
        button = gr.Button("tune", variant="primary")
        cancel = gr.Button("cancel", variant="stop")
    outcome = gr.Markdown(elem_id="tune-result", min_height=120, container=True)  # room for the progress bar

    def run_tune(request: gr.Request, progress=gr.Progress(), *values):
        (model_spec, _prompt, negative_text, seed_value, steps_value, guidance_value, height_value, width_value,
         frames_value, target_text, budget_text, batch_value, source_value, count_value, prompts_text) = values
        session = request.session_hash
        store.start(session)
        try:
            steps_n, height_n, width_n, frames_n, seed_n = checked(limits, steps_value, height_value, width_value,
                                                                   frames_value, seed_value)
            wanted = Target.for_search(target_text, None)
            spending = checked_budget(budget_text, limits)
            if batch_value is None or int(batch_value) < 1:
                raise UsageError(f"prompts a call must be at least 1, got {batch_value}")
            texts = tuning_prompts(source_value, count_value, prompts_text, seed_n)
            served(model_spec)
            with store.lock:
                tracker = TuneProgress(progress, spending, lambda: store.check_cancel(session),
                                       wanted.metric)
                tracker.say(f"loading {model_spec}")
                pipe, defaults = store.get(model_spec)
                call = call_arguments(pipe, defaults, {
                    "negative_prompt": negative_text or None, "guidance_scale": float(guidance_value),
                    "height": height_n, "width": width_n, "num_frames": frames_n})
                for key in ("prompt", "class_labels"):
                    call.pop(key, None)
                if "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
                    call["callback_on_step_end"] = tracker.on_step
                path = tempfile.mkdtemp(prefix="dit-accel-tune-") + "/tuned_plan.json"
                result = tune(pipe, texts, target=wanted, steps=steps_n, budget=spending, batch=int(batch_value),
                              seed=seed_n, path=path, progress=tracker.say, on_measured=tracker.measured_candidate,
                              **call)
        except Cancelled:
            return "tune cancelled: the model is as it was", gr.skip()
        except Exception as error:
            raise model_error(error) from None
        if not result.configs:
            return summary(result), gr.skip()
        return summary(result), (result.path if local else result.label)

    button.click(run_tune, [*settings, target, budget, batch, source, count, prompts], [outcome, plan_box],
                 api_name="tune")
    cancel.click(store.cancel, api_name="cancel_tune", concurrency_limit=None)
