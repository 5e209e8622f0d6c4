"""`apply(pipe_or_transformer, *configs)`: the one function users call, the handle it returns,
`measure` / `calibrate`, and `compare` (dense and plans on one seed, shared by the CLI, UI and
benchmarks)."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from collections import defaultdict
from typing import Any, Callable

import torch
from diffusers.hooks import HookRegistry, MagCacheConfig
from torch import nn

from . import methods  # noqa: F401  (registers every technique and diffusers cache)
from .config import ConfigError
from .methods.diffusers_caches import logged_mag_ratios
from .methods.dydit import DyDiTConfig, DyDiTScores, save_calibration
from .models import adapter_for, pipeline_transformers
from .runtime.context import SchedulerClock, StepTracker
from .runtime.hooks import HOOK_PREFIX
from .runtime.registry import check_composable, registration
from .runtime.session import Session


class AccelerationHandle:
    """What `apply` returns: `remove()` undoes it, `report()` describes the last pipeline call."""

    def __init__(self, target: Any, pipeline: Any | None, sessions: list[Session], tracker: StepTracker):
        self.target = target
        self.sessions = sessions
        self.tracker = tracker
        self._pipeline = pipeline
        #: perf_counter() when the pipeline last set up its scheduler, i.e. started a call
        self._run_started: float | None = None
        self._removed = False
        self._wrapped: list[tuple[Any, str]] = []
        if pipeline is not None:
            if getattr(pipeline, "scheduler", None) is not None:
                self._wrap(pipeline.scheduler, "set_timesteps", self._begin_run)
            if hasattr(pipeline, "maybe_free_model_hooks"):
                self._wrap(pipeline, "maybe_free_model_hooks", self._end_run)

    def _wrap(self, owner: Any, name: str, before) -> None:
        """`owner.name` calls `before()` first (each pipeline call sets timesteps first and frees hooks last)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            before()
            return original(*args, **kwargs)

        wrapped._dit_accel = True
        setattr(owner, name, wrapped)
        self._wrapped.append((owner, name))

    def _begin_run(self) -> None:
        self.tracker.begin_run()
        self._run_started = time.perf_counter()

    def _end_run(self) -> None:
        for session in self.sessions:
            session.end_run()
        self.tracker.end_run()

    @property
    def techniques(self):
        return [t for session in self.sessions for t in session.techniques]

    def remove(self) -> None:
        """Take every hook off and give the scheduler and pipeline back their own methods."""
        if self._removed:
            return
        for session in self.sessions:
            session.detach()
        self.tracker.end_run()
        for owner, name in self._wrapped:
            if getattr(owner.__dict__.get(name), "_dit_accel", False):
                delattr(owner, name)
        self._wrapped.clear()
        self._removed = True

    def report(self) -> dict[str, Any]:
        """The last pipeline call, per step and in total: FLOPs from the work ledger against the dense
        analytic model, the ledger by kind of work, time, and the memory techniques held."""
        run = self.tracker.run_index
        records = [r for s in self.sessions for r in s.records if r.run_index == run]
        steps: dict[int, dict[str, Any]] = {}
        work: dict[str, float] = defaultdict(float)
        blocks: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        for record in records:
            step = steps.setdefault(record.step_index, {"step": record.step_index, "dense_flops": 0.0,
                                                        "flops": 0.0, "seconds": 0.0, "calls": []})
            call_work: dict[str, float] = defaultdict(float)
            for w in record.works:
                call_work[w.kind] += w.flops
                work[w.kind] += w.flops
                blocks[w.block][w.name if w.kind == "linear" else f"{w.name} {w.kind}"] += w.flops
            step["dense_flops"] += record.dense_flops
            step["flops"] += record.flops
            step["seconds"] += record.seconds
            step["calls"].append({"branch": record.branch, "num_steps": record.num_steps, "timestep": record.timestep,
                                  "sigma": record.sigma, "dense_flops": record.dense_flops, "flops": record.flops,
                                  "seconds": record.seconds, "work": dict(call_work), **record.stats})
        dense = sum(r.dense_flops for r in records)
        flops = sum(r.flops for r in records)
        for step in steps.values():
            step["flops_ratio"] = step["flops"] / step["dense_flops"] if step["dense_flops"] else 1.0
        peak: dict[str, int] = defaultdict(int)
        for session in self.sessions:
            for label, held in session.peak_state_bytes.items():
                peak[label] += held
        return {
            "techniques": [t.label for t in self.sessions[0].techniques] if self.sessions else [],
            "stages": {t.label: sorted(int(s) for s in t.stages) for t in self.sessions[0].techniques}
            if self.sessions else {},
            "num_steps": len(steps),
            "num_calls": len(records),
            "steps": [steps[k] for k in sorted(steps)],
            "dense_flops": dense,
            "flops": flops,
            "flops_ratio": flops / dense if dense else 1.0,
            "work": dict(work),
            "blocks": {b: dict(v) for b, v in sorted(blocks.items())},
            "transformer_seconds": sum(r.seconds for r in records),
            # from the pipeline's scheduler set-up to the last transformer call (None for a bare transformer)
            "wall_seconds": (max(r.ended for r in records) - self._run_started
                             if records and self._run_started is not None else None),
            "state_bytes": dict(peak),
        }

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _is_accelerated(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return isinstance(registry, HookRegistry) and any(n.startswith(HOOK_PREFIX) for n in registry.hooks)


def _cfg_hint(pipeline: Any):
    """The pipeline's own word on whether its calls batch CFG, where it has one."""

    def hint() -> bool | None:
        try:
            value = getattr(pipeline, "do_classifier_free_guidance", None)
        except (AttributeError, TypeError):
            return None
        return value if isinstance(value, bool) else None

    return hint


def apply(pipe_or_transformer: Any, *configs: Any) -> AccelerationHandle:
    """Accelerate a diffusers pipeline (or a bare transformer) with `configs`; returns a handle.

    `configs` are dit-accel configs (`RASConfig`, ...) and diffusers cache configs
    (`FirstBlockCacheConfig`, `TaylorSeerCacheConfig`, ...), at most one per stage, in any order.
    With no config it only measures: `report()` then counts what the blocks really ran.
    """
    configs = list(configs)
    for config in configs:
        registration(config)
    check_composable(configs)
    transformers, pipeline = pipeline_transformers(pipe_or_transformer)
    adapters = [adapter_for(t) for t in transformers]
    for transformer in transformers:
        if _is_accelerated(transformer):
            raise RuntimeError(f"{type(transformer).__name__} is already accelerated: call .remove() on its handle first")
    clock = SchedulerClock(lambda: getattr(pipeline, "scheduler", None)) if hasattr(pipeline, "scheduler") else None
    tracker = StepTracker(clock, _cfg_hint(pipeline) if pipeline is not None else None)
    sessions: list[Session] = []
    try:
        for transformer, adapter in zip(transformers, adapters):
            session = Session(transformer, adapter, tracker, configs)
            session.attach()
            sessions.append(session)
    except Exception:
        for session in sessions:
            session.detach()
        raise
    return AccelerationHandle(pipe_or_transformer, pipeline, sessions, tracker)


def measure(pipe_or_transformer: Any) -> AccelerationHandle:
    """A handle that changes nothing and counts what the blocks really run (also under other accelerators)."""
    return apply(pipe_or_transformer)


def calibrate(pipe: Any, config: Any, *, path: str | None = None, **call_kwargs) -> Any:
    """`config` completed with what it must learn from one run of `pipe(**call_kwargs)`.

    MagCache: its per-step magnitude ratios (diffusers' own calibration mode), for the run's steps.
    DyDiT: every attention head's and MLP channel group's mean contribution to its block's output,
    per bucket of steps, over the run (give a list of prompts to calibrate on several), written to
    `path` as safetensors with the transformer's identity; the config returned reads that file.
    """
    if isinstance(config, DyDiTConfig):
        return _calibrate_dydit(pipe, config, path, call_kwargs)
    if not isinstance(config, MagCacheConfig):
        raise ConfigError(f"{type(config).__name__} needs no calibration (calibrate takes a MagCacheConfig "
                          "or a DyDiTConfig)")
    steps = call_kwargs.get("num_inference_steps")
    if steps is None:
        steps = inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    probe = dataclasses.replace(config, calibrate=True, num_inference_steps=steps)
    with logged_mag_ratios() as ratios, apply(pipe, probe):
        pipe(**call_kwargs)
    if not ratios:
        raise RuntimeError(f"MagCache calibration over {steps} steps reported no ratios")
    return dataclasses.replace(config, calibrate=False, mag_ratios=ratios[0], num_inference_steps=steps)


def _calibrate_dydit(pipe: Any, config: DyDiTConfig, path: str | None, call_kwargs: dict) -> DyDiTConfig:
    if path is None:
        raise ConfigError("calibrate(pipe, DyDiTConfig(...), path=...): name the safetensors file to write")
    probe = dataclasses.replace(DyDiTConfig.keep_all(), buckets=config.buckets)
    with apply(pipe, probe) as handle:
        if len(handle.sessions) != 1:
            raise ConfigError(f"DyDiT calibration scores one transformer; this pipeline has {len(handle.sessions)} "
                              "(apply it to each transformer on its own)")
        session = handle.sessions[0]
        technique = session.techniques[0]
        technique.scores = scores = DyDiTScores(config.buckets)
        pipe(**call_kwargs)
    means = scores.means()
    if not means:
        raise RuntimeError("DyDiT calibration saw no transformer call")
    prompts = call_kwargs.get("prompt")
    details = {"buckets": config.buckets, "num_inference_steps": call_kwargs.get("num_inference_steps"),
               "prompts": len(prompts) if isinstance(prompts, list) else 1}
    save_calibration(path, means, session.transformer, details)
    return dataclasses.replace(config, calibration=str(path))


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
    from .plans import parse_plan

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
    handle = apply(pipe, *run.configs) if run.configs else None
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
