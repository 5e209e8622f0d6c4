"""Evaluation: dense and plans run side by side on one seed, timed and scored against dense.

`compare` is what the CLI's `generate`, the UI and the benchmarks share; `timed_run` is one timed
generation (the benchmarks' repetitions and `tune` call it directly); `PlanRun` holds its result.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from typing import Any, Callable

import torch

from .api import apply
from .calibration import calibrate
from .runtime.registry import check_composable, registration


@dataclasses.dataclass
class PlanRun:
    """One run of `compare`: the dense baseline (no configs) or a plan, on the comparison's seed."""

    label: str
    configs: list
    #: (B, 3, H, W) or (B, T, 3, H, W) in [0, 1], on the CPU
    output: Any = None
    seconds: float = 0.0
    #: `AccelerationHandle.report()` of the timed run; None for dense
    report: dict[str, Any] | None = None
    #: vs the dense run of the same comparison (None for dense itself; PSNR inf when identical)
    psnr: float | None = None
    ssim: float | None = None
    speedup: float = 1.0

    @property
    def flops_ratio(self) -> float:
        return 1.0 if self.report is None else self.report["flops_ratio"]


def _label(plan: Any) -> str:
    return plan if isinstance(plan, str) else "+".join(registration(c).name for c in plan)


def compare(pipe: Any, plans: list, *, seed: int = 0, warmup_steps: int = 2,
            progress: Callable[[str], None] | None = None, baseline: PlanRun | None = None,
            **call_kwargs) -> list[PlanRun]:
    """Run `pipe(**call_kwargs)` dense and under each plan on one seed; return dense first, then each
    plan with its time, speedup, report and PSNR/SSIM vs dense (torchmetrics).

    A plan is a list of configs or a spec string (`"ras:sample_ratio=0.5+fbcache:threshold=0.1"`,
    step schedules scaled to the call's steps). MagCache configs in calibration mode are calibrated
    on this call first. Every run is warmed up once with `warmup_steps` steps, untimed (a run whose
    config is bound to a step count is not). `baseline`, the dense run of an earlier comparison of
    the same call and seed, is reused instead of running dense again (the UI caches it). The CLI,
    the UI and the benchmarks share this function."""
    from .metrics.quality import channels_first, psnr, ssim
    from .plan_spec import parse_plan

    if "generator" in call_kwargs:
        raise ValueError("compare seeds every run itself from seed=...; pass no generator")
    say = progress or (lambda message: None)
    steps = call_kwargs.get("num_inference_steps")
    if steps is None:
        steps = inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    call = {**call_kwargs, "num_inference_steps": steps, "output_type": "pt"}
    runs = [baseline or PlanRun("dense", [])]
    for plan in plans:
        configs = parse_plan(plan, steps) if isinstance(plan, str) else list(plan)
        check_composable(configs)
        apply(pipe, *configs).remove()  # what only the model can refuse (a calibration file for another), first
        runs.append(PlanRun(_label(plan), configs))
    for run in runs:
        if any(getattr(c, "calibrate", False) is True for c in run.configs):
            say(f"calibrating {run.label}")
            run.configs = [calibrate(pipe, c, **call) if getattr(c, "calibrate", False) is True else c
                           for c in run.configs]
    say(f"warm-up: every run once with {min(steps, warmup_steps)} steps, untimed")
    todo = runs[1:] if baseline is not None else runs
    for run in todo:
        if warmup_steps and not any(getattr(c, "num_inference_steps", None) for c in run.configs):
            timed_run(pipe, run, {**call, "num_inference_steps": min(steps, warmup_steps)}, seed)
    for i, run in enumerate(runs, 1):
        if run is baseline:
            continue
        say(f"[{i}/{len(runs)}] {run.label}")
        timed_run(pipe, run, call, seed)
        say(f"[{i}/{len(runs)}] {run.label}: {run.seconds:.2f} s")
    dense = runs[0]
    for run in runs[1:]:
        run.speedup = dense.seconds / run.seconds
        run.psnr = psnr(channels_first(run.output), channels_first(dense.output))
        run.ssim = ssim(channels_first(run.output), channels_first(dense.output))
    return runs


def timed_run(pipe: Any, run: PlanRun, call: dict[str, Any], seed: int) -> None:
    """One generation of `run` on `seed`, timed from the call to the last kernel: fills its output,
    seconds and report (`compare` and the benchmarks' repetitions call this)."""
    handle = apply(pipe, *run.configs, details=True) if run.configs else None
    device = getattr(pipe, "device", None)
    try:
        _synchronize(device)
        start = time.perf_counter()
        output = pipe(**call, generator=torch.Generator().manual_seed(seed))[0]
        _synchronize(device)
        run.seconds = time.perf_counter() - start
        run.report = None if handle is None else handle.report()
    finally:
        if handle is not None:
            handle.remove()
    run.output = output.float().cpu().clamp(0, 1)


def _synchronize(device: Any) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()
