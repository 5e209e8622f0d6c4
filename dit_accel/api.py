"""`apply(pipe_or_transformer, *configs)`: the one function users call, the handle it returns,
`measure` / `calibrate`, and `compare` (dense and plans on one seed, shared by the CLI, UI and
benchmarks)."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import time
import weakref
from collections import defaultdict
from typing import Any, Callable, Iterator

import torch
from diffusers.hooks import HookRegistry, MagCacheConfig
from torch import nn

from . import techniques  # noqa: F401  (registers every technique and diffusers cache)
from .config import ConfigError
from .techniques.diffusers_caches import logged_mag_ratios
from .techniques.dydit import DyDiTConfig, DyDiTScores, save_calibration
from .models import adapter_for, pipeline_transformers
from .runtime.context import SchedulerClock, StepTracker
from .runtime.hooks import HOOK_PREFIX
from .runtime.registry import check_composable, registration
from .runtime.session import Session


#: the handle whose hooks are on each transformer, to name it when another `apply()` comes
_HANDLES: "weakref.WeakKeyDictionary[nn.Module, AccelerationHandle]" = weakref.WeakKeyDictionary()


def _before(call: Callable[[], None]) -> Callable[[Callable], Callable]:
    """Wraps a method so that it calls `call()` first."""

    def wrap(original: Callable) -> Callable:
        def wrapped(*args, **kwargs):
            call()
            return original(*args, **kwargs)

        return wrapped

    return wrap


class AccelerationHandle:
    """What `apply` returns: `remove()` undoes it, `report()` describes the last pipeline call.

    The hooks live on the transformer(s), so every pipeline built on them (`from_pipe`,
    `Pipeline(**pipe.components)`) runs under the plan. The handle follows the runs of the pipeline it
    was applied to and of those given to `follow` or `running`: their scheduler's `set_timesteps`
    starts a run, their `maybe_free_model_hooks` ends it and frees what the run kept. A step cache that
    `enable_cache` adds (or `disable_cache` takes off) later joins the plan at once.
    """

    def __init__(self, target: Any, pipeline: Any | None):
        self.target = target
        self.sessions: list[Session] = []
        self._pipeline = pipeline
        #: the pipeline whose call is in progress, where it said so (`running`)
        self._running: Any | None = None
        #: the followed pipeline whose scheduler last set up a run
        self._run_pipeline = pipeline
        #: set once a pipeline announces its calls (`running`): a call outside `running` then comes from a
        #: pipeline that does not, whose CFG verdict is unknown
        self._announced = False
        clock = SchedulerClock(self._scheduler) if hasattr(pipeline, "scheduler") else None
        self.tracker = StepTracker(clock, self._cfg_hint if pipeline is not None else None)
        #: perf_counter() when the pipeline last set up its scheduler, i.e. started a call
        self._run_started: float | None = None
        self._removed = False
        self._wrapped: list[tuple[weakref.ref, str]] = []
        if pipeline is not None:
            self.follow(pipeline)

    def follow(self, pipeline: Any) -> None:
        """Follow the runs of `pipeline` too, another pipeline built on these transformers (a pipeline
        sharing a followed one's scheduler is followed through it already)."""
        if getattr(pipeline, "scheduler", None) is not None:
            pipeline_ref = weakref.ref(pipeline)
            self._wrap(pipeline.scheduler, "set_timesteps", _before(lambda: self._begin_run(pipeline_ref())))
        if hasattr(pipeline, "maybe_free_model_hooks"):
            self._wrap(pipeline, "maybe_free_model_hooks", _before(self._end_run))

    @contextlib.contextmanager
    def running(self, pipeline: Any) -> Iterator["AccelerationHandle"]:
        """The transformer calls inside the block come from `pipeline`: the step context reads its scheduler
        and CFG verdict, and the run's state is freed when the block ends, on errors too (the
        Accelerated* pipelines sharing a plan say so around each call)."""
        self.follow(pipeline)
        self._announced = True
        outer, self._running = self._running, pipeline
        try:
            yield self
        finally:
            self._running = outer
            self._end_run()

    def _scheduler(self) -> Any:
        """The running pipeline's scheduler, looked up at every call (a scheduler swapped since is read too)."""
        return getattr(self._running or self._run_pipeline, "scheduler", None)

    def _cfg_hint(self) -> bool | None:
        """The running pipeline's own word on whether its calls batch CFG, where it has one."""
        pipeline = self._running if self._announced else self._run_pipeline
        try:
            value = getattr(pipeline, "do_classifier_free_guidance", None)
        except (AttributeError, TypeError):
            return None
        return value if isinstance(value, bool) else None

    def _wrap(self, owner: Any, name: str, wrap: Callable[[Callable], Callable]) -> None:
        """`owner.name` becomes `wrap(owner.name)` until `remove()` (once per owner)."""
        if getattr(owner.__dict__.get(name), "_dit_accel", None) is self:
            return
        original = getattr(owner, name)
        wrapped = functools.update_wrapper(wrap(original), original)
        wrapped._dit_accel = self
        setattr(owner, name, wrapped)
        self._wrapped.append((weakref.ref(owner), name))

    def _watch_step_caches(self, session: Session) -> None:
        """`enable_cache` / `disable_cache` on the transformer lay the plan's hooks out again around the cache
        at once; a cache the plan cannot take is refused before diffusers applies it (or undone). SD3, PixArt
        and DiT have no `enable_cache`: a cache applied there by `apply_*_cache` joins at the next run start."""
        transformer = session.transformer
        if not hasattr(transformer, "enable_cache"):
            return

        def enable_cache(original):
            def wrapped(config):
                try:
                    session.check_step_cache(config)
                except ConfigError as error:
                    raise ConfigError(f"{type(config).__name__} cannot join the dit-accel plan on "
                                      f"{type(transformer).__name__}: {error}") from None
                original(config)
                try:
                    session.follow_step_caches()
                except ConfigError:
                    transformer.disable_cache()
                    raise

            return wrapped

        def disable_cache(original):
            def wrapped():
                original()
                session.follow_step_caches()

            return wrapped

        self._wrap(transformer, "enable_cache", enable_cache)
        self._wrap(transformer, "disable_cache", disable_cache)

    def _begin_run(self, pipeline: Any | None) -> None:
        self._run_pipeline = pipeline or self._pipeline
        self.tracker.begin_run()
        self._run_started = time.perf_counter()

    def _end_run(self) -> None:
        for session in self.sessions:
            session.end_run()
        self.tracker.end_run()

    def describe(self) -> str:
        """The plan and where it was applied, for messages."""
        labels = "+".join(t.label for t in self.sessions[0].techniques) if self.sessions else ""
        return f"the plan [{labels or 'measure'}] applied to {type(self._pipeline or self.target).__name__}"

    @property
    def techniques(self):
        return [t for session in self.sessions for t in session.techniques]

    def remove(self) -> None:
        """Take every hook off and give the scheduler and pipeline back their own methods."""
        if self._removed:
            return
        for session in self.sessions:
            session.detach()
            if _HANDLES.get(session.transformer) is self:
                del _HANDLES[session.transformer]
        self.tracker.end_run()
        for owner_ref, name in self._wrapped:
            owner = owner_ref()
            if owner is not None and getattr(owner.__dict__.get(name), "_dit_accel", None) is self:
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
            # where the last run did other than its plan says (RAS without its K/V source, ...)
            "notes": sorted({note for session in self.sessions for note in session.notes}),
        }

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _is_accelerated(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return isinstance(registry, HookRegistry) and any(n.startswith(HOOK_PREFIX) for n in registry.hooks)


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
            holder = _HANDLES.get(transformer)
            raise RuntimeError(
                f"{type(transformer).__name__} is already accelerated"
                f"{'' if holder is None else ' by ' + holder.describe()}: call .remove() on that handle first "
                "(pipelines built from the same components share the transformer, its hooks and its plan)")
    handle = AccelerationHandle(pipe_or_transformer, pipeline)
    try:
        for transformer, adapter in zip(transformers, adapters):
            session = Session(transformer, adapter, handle.tracker, configs)
            session.attach()
            handle.sessions.append(session)
            _HANDLES[transformer] = handle
            handle._watch_step_caches(session)
    except Exception:
        handle.remove()
        raise
    return handle


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
