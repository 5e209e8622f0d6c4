"""`apply(pipe_or_transformer, *configs)`: the one function users call, the handle it returns
(`remove()`, `report()`, `estimate()`), `measure`, and `estimate` (the bytes a plan will hold, before it
runs). Calibrating a config lives in calibration.py, comparing plans against dense in comparison.py."""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
import weakref
from typing import Any, Callable, Iterator

import torch
from diffusers.hooks import HookRegistry
from torch import nn

from . import techniques  # noqa: F401  (registers every technique and diffusers cache)
from .config import ConfigError, Stage
from .models import adapter_for, pipeline_transformers
from .runtime import ledger
from .runtime.context import SchedulerClock, StepTracker, asked_steps
from .runtime.estimate import call_shapes
from .runtime.storage import in_host_memory
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
            self._wrap(pipeline.scheduler, "set_timesteps", self._setting_up(pipeline_ref))
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

    def _setting_up(self, pipeline_ref: weakref.ref) -> Callable[[Callable], Callable]:
        """Wraps a scheduler's `set_timesteps`: it starts a run, and the plan's schedule stage (fewer
        steps) may rewrite what it sets up."""

        def wrap(original: Callable) -> Callable:
            signature = inspect.signature(original)

            def wrapped(*args, **kwargs):
                bound = signature.bind(*args, **kwargs)
                schedule = self.sessions[0].by_stage.get(Stage.SCHEDULE) if self.sessions else None
                requested = None
                if schedule is not None:
                    requested = asked_steps(bound.arguments)
                    bound.arguments.update(schedule.timesteps_arguments(dict(bound.arguments)))
                self._begin_run(pipeline_ref(), requested)
                return original(*bound.args, **bound.kwargs)

            return wrapped

        return wrap

    def _begin_run(self, pipeline: Any | None, requested_steps: int | None = None) -> None:
        self._run_pipeline = pipeline or self._pipeline
        self.tracker.begin_run(requested_steps)
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
        return ledger.report(self.sessions, self.tracker.run_index, self._run_started)

    def estimate(self, *, height: int, width: int, num_frames: int = 1, batch: int = 1, guidance: bool | None = None,
                 text_tokens: int | None = None, dtype: torch.dtype | None = None) -> dict[str, Any]:
        """The bytes the plan will hold in a pipeline call at these sizes, without running the model (see
        `estimate`)."""
        return _estimate(self.sessions, self._pipeline, height=height, width=width, num_frames=num_frames,
                         batch=batch, guidance=guidance, text_tokens=text_tokens, dtype=dtype)

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _is_accelerated(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return isinstance(registry, HookRegistry) and any(n.startswith(HOOK_PREFIX) for n in registry.hooks)


def apply(pipe_or_transformer: Any, *configs: Any, details: bool = False, ledger: str = "light") -> AccelerationHandle:
    """Accelerate a diffusers pipeline (or a bare transformer) with `configs`; returns a handle.

    `configs` are dit-accel configs (`RASConfig`, ...) and diffusers cache configs
    (`FirstBlockCacheConfig`, `TaylorSeerCacheConfig`, ...), at most one per stage, in any order.
    With no config it only measures: `report()` then counts what the blocks really ran. `details`:
    `report()` carries per-call pictures too (RAS's token sets, SVG2's cluster maps; the UI draws them),
    which cost work and memory every call otherwise saved. `ledger`: "light" (the default) records each
    block's work from one hook on the block, so compiled blocks keep their attention and MLP in one graph;
    "exact" hooks every attention unit too and records it as it runs (what `measure` uses).
    """
    if ledger not in ("light", "exact"):
        raise ConfigError(f"apply(ledger={ledger!r}): the ledger is 'light' or 'exact'")
    configs = list(configs)
    for config in configs:
        registration(config)
    check_composable(configs)
    transformers, pipeline = pipeline_transformers(pipe_or_transformer)
    adapters = [adapter_for(t) for t in transformers]
    rewriting = [type(c).__name__ for c in configs if getattr(registration(c).technique, "rewrites_schedule", False)]
    if rewriting and getattr(pipeline, "scheduler", None) is None:
        raise ConfigError(f"{', '.join(rewriting)} sets up the pipeline's scheduler: apply it to a pipeline, not to "
                          f"a bare {type(pipe_or_transformer).__name__}")
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
            session = Session(transformer, adapter, handle.tracker, configs, ledger, details)
            session.attach()
            handle.sessions.append(session)
            _HANDLES[transformer] = handle
            handle._watch_step_caches(session)
    except Exception:
        handle.remove()
        raise
    return handle


def measure(pipe_or_transformer: Any) -> AccelerationHandle:
    """A handle that changes nothing and counts what the blocks really run (also under other accelerators),
    every attention unit as it runs (the exact ledger)."""
    return apply(pipe_or_transformer, ledger="exact")


def estimate(pipe_or_transformer: Any, *configs: Any, height: int, width: int, num_frames: int = 1, batch: int = 1,
             guidance: bool | None = None, text_tokens: int | None = None,
             dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The bytes `apply(pipe_or_transformer, *configs)` will hold in a call at `height` x `width` pixels
    (`num_frames` for video) for `batch` prompts, from the adapters and the shapes alone (the model does
    not run; a model on the meta device works). `guidance`: whether the transformer also runs an
    unconditional branch (None: as the family's pipelines do by default); `text_tokens` None: the family's
    default length; `dtype` None: the model's.

    Returns `total_bytes`, `device_bytes` and `host_bytes` (what forms like `kv_cache="host"` keep in
    host memory), `by_technique` ({label: {kind: bytes}}, as `report()["state_bytes"]` measures them),
    `by_kind`, `weights_bytes` (the transformers' parameters and buffers), `smaller_forms` (the config
    changes its techniques offer to hold less) and the `shapes` assumed."""
    with apply(pipe_or_transformer, *configs) as handle:
        return handle.estimate(height=height, width=width, num_frames=num_frames, batch=batch, guidance=guidance,
                               text_tokens=text_tokens, dtype=dtype)


def _estimate(sessions: list[Session], pipeline: Any, *, dtype: torch.dtype | None, **sizes: Any) -> dict[str, Any]:
    spatial = getattr(pipeline, "vae_scale_factor_spatial", None) or getattr(pipeline, "vae_scale_factor", None) or 8
    temporal = getattr(pipeline, "vae_scale_factor_temporal", None) or 4
    itemsize = None if dtype is None else torch.empty((), dtype=dtype).element_size()
    by_technique: dict[str, dict[str, int]] = {}
    weights = 0
    shapes = None
    for session in sessions:
        shapes = call_shapes(session.adapter, **sizes, itemsize=itemsize, spatial=spatial, temporal=temporal)
        for label, kinds in session.estimate_bytes(shapes).items():
            for kind, held in kinds.items():
                by_technique.setdefault(label, {}).setdefault(kind, 0)
                by_technique[label][kind] += held
        tensors = [*session.transformer.parameters(), *session.transformer.buffers()]
        weights += sum(t.numel() * (itemsize if itemsize and t.is_floating_point() else t.element_size()) for t in tensors)
    by_kind: dict[str, int] = {}
    for kinds in by_technique.values():
        for kind, held in kinds.items():
            by_kind[kind] = by_kind.get(kind, 0) + held
    host = sum(held for kind, held in by_kind.items() if in_host_memory(kind))
    total = sum(by_kind.values())
    return {"total_bytes": total, "device_bytes": total - host, "host_bytes": host, "by_technique": by_technique,
            "by_kind": by_kind, "weights_bytes": weights,
            "smaller_forms": list(dict.fromkeys(option for session in sessions for option in session.smaller_forms())),
            "shapes": None if shapes is None else {
                "samples": shapes.samples, "grid": [shapes.grid.frames, shapes.grid.rows, shapes.grid.cols],
                "tokens": shapes.tokens, "text_tokens": shapes.text_tokens, "itemsize": shapes.itemsize}}
