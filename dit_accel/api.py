"""`apply(pipe_or_transformer, *configs)`: the one function users call, and the handle it returns."""

from __future__ import annotations

import functools
import time
from typing import Any

from diffusers.hooks import HookRegistry
from torch import nn

from .config import AccelerationConfig, check_compatible
from .models import adapter_for
from .runtime.context import StepTracker
from .runtime.hooks import HOOK_PREFIX
from .runtime.session import Session


class AccelerationHandle:
    """What `apply` returns: `remove()` undoes it, `report()` describes the last pipeline call."""

    def __init__(self, target: Any, sessions: list[Session], tracker: StepTracker, scheduler: Any | None):
        self.target = target
        self.sessions = sessions
        self.tracker = tracker
        self._scheduler = scheduler
        #: perf_counter() when the pipeline last set up its scheduler, i.e. started a call
        self._run_started: float | None = None
        self._removed = False
        if scheduler is not None:
            self._wrap_scheduler(scheduler)

    def _wrap_scheduler(self, scheduler: Any) -> None:
        """Each pipeline call sets the scheduler's timesteps first: that starts a new run."""
        original = scheduler.set_timesteps

        @functools.wraps(original)
        def set_timesteps(*args, **kwargs):
            result = original(*args, **kwargs)
            sigmas = getattr(scheduler, "sigmas", None)
            self.tracker.begin_run(len(scheduler.timesteps),
                                   None if sigmas is None else [float(s) for s in sigmas])
            self._run_started = time.perf_counter()
            return result

        set_timesteps._dit_accel = True
        scheduler.set_timesteps = set_timesteps

    @property
    def techniques(self):
        return [t for session in self.sessions for t in session.techniques]

    def remove(self) -> None:
        """Take every hook off and give the scheduler back its own `set_timesteps`."""
        if self._removed:
            return
        for session in self.sessions:
            session.detach()
        if self._scheduler is not None and getattr(self._scheduler.__dict__.get("set_timesteps"), "_dit_accel", False):
            del self._scheduler.set_timesteps
        self._removed = True

    def report(self) -> dict[str, Any]:
        """Per-step and total analytic FLOPs (dense vs accelerated) and time of the last pipeline call."""
        run = self.tracker.run_index
        records = [r for s in self.sessions for r in s.records if r.run_index == run]
        steps: dict[int, dict[str, Any]] = {}
        for record in records:
            step = steps.setdefault(record.step_index, {"step": record.step_index, "dense_flops": 0.0,
                                                        "flops": 0.0, "seconds": 0.0, "calls": []})
            step["dense_flops"] += record.dense_flops
            step["flops"] += record.flops
            step["seconds"] += record.seconds
            step["calls"].append({"branch": record.branch, "dense_flops": record.dense_flops,
                                  "flops": record.flops, "seconds": record.seconds, **record.stats})
        dense = sum(r.dense_flops for r in records)
        flops = sum(r.flops for r in records)
        for step in steps.values():
            step["flops_ratio"] = step["flops"] / step["dense_flops"] if step["dense_flops"] else 1.0
        return {
            "techniques": [type(t.config).__name__ for t in self.techniques],
            "num_steps": len(steps),
            "num_calls": len(records),
            "steps": [steps[k] for k in sorted(steps)],
            "dense_flops": dense,
            "flops": flops,
            "flops_ratio": flops / dense if dense else 1.0,
            "transformer_seconds": sum(r.seconds for r in records),
            # from the pipeline's scheduler set-up to the last transformer call (None for a bare transformer)
            "wall_seconds": (max(r.ended for r in records) - self._run_started
                             if records and self._run_started is not None else None),
        }

    def __enter__(self) -> "AccelerationHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _transformers_of(target: Any) -> tuple[list[nn.Module], Any | None]:
    if isinstance(target, nn.Module):
        return [target], None
    if not hasattr(target, "components"):
        raise TypeError(f"dit_accel.apply expects a diffusers pipeline or a transformer model, got {type(target).__name__}")
    transformer = getattr(target, "transformer", None)
    if transformer is None:
        raise TypeError(
            f"{type(target).__name__} has no `transformer` component: dit-accel accelerates diffusion-transformer "
            "pipelines (SD3, Flux, PixArt, DiT, Wan, HunyuanVideo, CogVideoX), not UNet ones"
        )
    second = getattr(target, "transformer_2", None)
    return [transformer] + ([second] if second is not None else []), getattr(target, "scheduler", None)


def _is_accelerated(module: nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return isinstance(registry, HookRegistry) and any(n.startswith(HOOK_PREFIX) for n in registry.hooks)


def apply(pipe_or_transformer: Any, *configs: AccelerationConfig) -> AccelerationHandle:
    """Accelerate a diffusers pipeline (or a bare transformer) with `configs`; returns a handle.

    With no config it only measures: `report()` then gives the dense FLOPs and times.
    """
    check_compatible(list(configs))
    transformers, scheduler = _transformers_of(pipe_or_transformer)
    adapters = [adapter_for(t) for t in transformers]
    for transformer in transformers:
        if _is_accelerated(transformer):
            raise RuntimeError(f"{type(transformer).__name__} is already accelerated: call .remove() on its handle first")
    tracker = StepTracker()
    sessions: list[Session] = []
    try:
        for transformer, adapter in zip(transformers, adapters):
            session = Session(transformer, adapter, tracker, list(configs))
            session.attach()
            sessions.append(session)
    except Exception:
        for session in sessions:
            session.detach()
        raise
    return AccelerationHandle(pipe_or_transformer, sessions, tracker, scheduler)
