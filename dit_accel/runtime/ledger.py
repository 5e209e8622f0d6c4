"""The work ledger: hooks that record what really ran, one `CallRecord` per call, and `report()`'s sums.

The ledger hooks sit innermost on every block and on every unit a step cache may skip on its own, so a
unit that did not run writes nothing. The light ledger (the default) records a block's units from one
hook on the block, outside the block's body (a compiled body stays one graph); the exact ledger
(`measure()`, `apply(..., ledger="exact")`) gives every attention unit a hook of its own that records
it as it runs. An attention unit's hook also runs it
through stages 5-6 (`AttentionRouter`) and hands a step cache around it full-length outputs (stage 2).
At the end of each call the session files a `CallRecord`; `report` sums the records of a run per
step, per block and per kind of work, against the dense analytic FLOPs. A kernel whose work depends on
data (SVG2's pairs) may leave it as a device scalar in its `Work` and its stats: `report` reads all
of them to the host in one transfer (`_settle`), so no call waits on the device for its bookkeeping.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, Sequence

import torch
from diffusers.hooks import ModelHook

from ..attention.intercept import AttentionCall
from ..metrics.flops import UnitCost, Work
from .attention_route import AttentionRouter
from .context import StepContext
from .session_view import SessionView
from .technique import Technique
from .token_set import TokenSetStage


class LedgerHook(ModelHook):
    """Innermost on a block (or on a unit a step cache may skip on its own): records the work of its units
    that have no hook of their own, after it ran (stages 2-3 have set the tokens by then): their linears,
    and the dense attention core of each in `with_core` (stages 5-6 record the cores they route)."""

    def __init__(self, session: SessionView, block: int, costs: list[UnitCost], with_core: frozenset[str] = frozenset()):
        super().__init__()
        self.session, self.block, self.costs, self.with_core = session, block, costs, with_core

    @torch.compiler.disable
    def post_forward(self, module, output):
        call_state = self.session.call_state
        if call_state is not None:
            for cost in self.costs:
                call_state.ledger.extend(cost.records(self.block, call_state.batch, call_state.image_tokens,
                                                      call_state.text_tokens, cost.name in self.with_core,
                                                      call_state.widths.get((self.block, cost.name))))
        return output


class AttentionHook(ModelHook):
    """Innermost on an attention module: records its work, routes a self-attention's SDPA through stages
    5 and 6 (`router`: None when the plan has neither, or for other attentions), and hands a step cache
    around it full-length outputs (`token_set`: stage 2, where a step cache wraps the module)."""

    def __init__(self, session: SessionView, block: int, cost: UnitCost, call: AttentionCall | None,
                 router: AttentionRouter | None, token_set: TokenSetStage | None):
        super().__init__()
        self.session, self.block, self.cost, self.call = session, block, cost, call
        self.router, self.token_set = router, token_set

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        call_state = self.session.call_state
        if call_state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        routed = self.router is not None
        # linear work, and the dense attention core unless stages 5-6 record what they ran
        call_state.ledger.extend(self.cost.records(self.block, call_state.batch, call_state.image_tokens,
                                                   call_state.text_tokens, not routed,
                                                   call_state.widths.get((self.block, self.cost.name))))
        if routed:
            output = self.router.run(module, self.fn_ref.original_forward, self.call, self.cost, call_state,
                                     args, kwargs)
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if self.token_set is not None:
            output = self.token_set.scatter_attention_output(call_state, module, output)
        return output


@dataclass
class CallTime:
    """How long one call ran, and when it ended (time.perf_counter()). On CUDA the call's start and end
    events and its run's first start (host time, event) stand in until `report()` reads them."""

    seconds: float = 0.0
    ended: float = 0.0
    events: tuple[torch.cuda.Event, torch.cuda.Event, tuple[float, torch.cuda.Event]] | None = None

    def settle(self) -> None:
        if self.events is not None:
            start, end, (anchor_host, anchor) = self.events
            end.synchronize()
            self.seconds = start.elapsed_time(end) / 1e3
            self.ended = anchor_host + anchor.elapsed_time(end) / 1e3
            self.events = None


class CallClock:
    """Times one run's calls without waiting for the device: the host clock on a CPU; on CUDA an event at
    each call's start and end, read once at `report()` (no synchronize per call, so the host keeps
    queueing work ahead of the GPU)."""

    def __init__(self) -> None:
        self._anchor: tuple[float, torch.cuda.Event] | None = None

    def start(self, device: torch.device) -> tuple[float, torch.cuda.Event | None]:
        host = time.perf_counter()
        if device.type != "cuda":
            return host, None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        if self._anchor is None:
            self._anchor = (host, event)
        return host, event

    def stop(self, started: tuple[float, torch.cuda.Event | None], device: torch.device) -> CallTime:
        host, event = started
        if event is None or device.type != "cuda":
            now = time.perf_counter()
            return CallTime(now - host, now)
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        return CallTime(events=(event, end, self._anchor))


@dataclass
class CallRecord:
    """One transformer call in the ledger."""

    #: the call's step context, without the call's tensors (`StepContext.without_tensors`): a record
    #: outlives its call
    ctx: StepContext
    dense_flops: float
    time: CallTime
    works: list[Work]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.time.seconds

    @property
    def ended(self) -> float:
        """time.perf_counter() when the call returned (on CUDA: when the device finished it)."""
        return self.time.ended

    @property
    def flops(self) -> float:
        return sum(w.flops for w in self.works)


class LedgerOwner(Protocol):
    """What `report` reads of each session of a handle."""

    @property
    def techniques(self) -> Sequence[Technique]: ...

    @property
    def records(self) -> Sequence[CallRecord]: ...

    @property
    def peak_state_bytes(self) -> dict[str, int]: ...

    @property
    def notes(self) -> set[str]: ...


def _settle(records: Sequence[CallRecord]) -> None:
    """Device tensors in the records' work (flops, pairs) and stats (values, or values of a dict of
    them) replaced by host values: scalars as numbers, read in one transfer per device; others (token
    sets, cluster labels for the UI) as nested lists, one read each. Techniques hand them over as
    tensors so that no call waits for the host."""
    pending: list[tuple[Any, Any, torch.Tensor]] = []  # (container, key, tensor)
    for record in records:
        record.time.settle()
        for index, work in enumerate(record.works):
            if isinstance(work.flops, torch.Tensor) or isinstance(work.pairs, torch.Tensor):
                pending.append((record.works, index, work))
        for key, value in record.stats.items():
            if isinstance(value, torch.Tensor):
                pending.append((record.stats, key, value))
            elif isinstance(value, dict):
                pending.extend((value, k, v) for k, v in value.items() if isinstance(v, torch.Tensor))
    tensors = [t for _, _, item in pending for t in ((item.flops, item.pairs) if isinstance(item, Work) else (item,))
               if isinstance(t, torch.Tensor) and t.numel() == 1]
    by_device: dict[torch.device, list[torch.Tensor]] = defaultdict(list)
    for tensor in tensors:
        by_device[tensor.device].append(tensor)
    numbers = {}
    for device_tensors in by_device.values():
        values = torch.stack([t.detach().reshape(()).double() for t in device_tensors]).tolist()
        numbers.update(zip(map(id, device_tensors), values))
    def host(x):
        if not isinstance(x, torch.Tensor):
            return x
        return numbers[id(x)] if x.numel() == 1 else x.tolist()

    for container, key, item in pending:
        container[key] = replace(item, flops=float(host(item.flops)), pairs=round(host(item.pairs))) \
            if isinstance(item, Work) else host(item)


def report(sessions: Sequence[LedgerOwner], run_index: int, run_started: float | None) -> dict[str, Any]:
    """Run `run_index` of `sessions` (one per transformer of a pipeline), per step and in total: FLOPs
    from the ledger against the dense analytic model, the ledger by kind of work and by block, time, the
    memory techniques held, and notes; `run_started` is perf_counter() when the pipeline set up its
    scheduler (None for a bare transformer)."""
    records = [r for s in sessions for r in s.records if r.ctx.run_index == run_index]
    _settle(records)
    steps: dict[int, dict[str, Any]] = {}
    work: dict[str, float] = defaultdict(float)
    blocks: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for record in records:
        ctx = record.ctx
        step = steps.setdefault(ctx.step_index, {"step": ctx.step_index, "dense_flops": 0.0,
                                                 "flops": 0.0, "seconds": 0.0, "calls": []})
        call_work: dict[str, float] = defaultdict(float)
        for w in record.works:
            call_work[w.kind] += w.flops
            work[w.kind] += w.flops
            blocks[w.block][w.name if w.kind == "linear" else f"{w.name} {w.kind}"] += w.flops
        step["dense_flops"] += record.dense_flops
        step["flops"] += record.flops
        step["seconds"] += record.seconds
        step["calls"].append({"branch": ctx.branch, "num_steps": ctx.num_steps, "timestep": ctx.timestep,
                              "sigma": ctx.sigma, "dense_flops": record.dense_flops, "flops": record.flops,
                              "seconds": record.seconds, "work": dict(call_work), **record.stats})
    dense = sum(r.dense_flops for r in records)
    flops = sum(r.flops for r in records)
    ran, requested = (records[0].ctx.num_steps, records[0].ctx.requested_steps) if records else (None, None)
    if ran and requested:  # fewer steps ran than the call asked for: its dense work is the call's own
        dense *= requested / ran
    for step in steps.values():
        step["flops_ratio"] = step["flops"] / step["dense_flops"] if step["dense_flops"] else 1.0
    peak: dict[str, int] = defaultdict(int)
    for session in sessions:
        for label, held in session.peak_state_bytes.items():
            peak[label] += held
    return {
        "techniques": [t.label for t in sessions[0].techniques] if sessions else [],
        "stages": {t.label: sorted(int(s) for s in t.stages) for t in sessions[0].techniques}
        if sessions else {},
        "num_steps": len(steps),
        # the steps the call asked for, where the plan ran another count (fewer steps)
        "requested_steps": requested,
        "num_calls": len(records),
        "steps": [steps[k] for k in sorted(steps)],
        "dense_flops": dense,
        "flops": flops,
        "flops_ratio": flops / dense if dense else 1.0,
        "work": dict(work),
        "blocks": {b: dict(v) for b, v in sorted(blocks.items())},
        "transformer_seconds": sum(r.seconds for r in records),
        # from the pipeline's scheduler set-up to the last transformer call (None for a bare transformer)
        "wall_seconds": (max(r.ended for r in records) - run_started
                         if records and run_started is not None else None),
        "state_bytes": dict(peak),
        # where the last run did other than its plan says (RAS without its K/V source, ...)
        "notes": sorted({note for session in sessions for note in session.notes}),
    }
