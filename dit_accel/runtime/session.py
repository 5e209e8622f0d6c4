"""One accelerated transformer: its adapter, its techniques, its hooks and its ledger."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from diffusers.hooks import ModelHook
from diffusers.hooks.hooks import BaseState, StateManager
from torch import nn

from ..attention.intercept import AttentionCall, AttentionCore, run_with_cores
from ..metrics.flops import TransformerCostModel
from ..models.base import ModelAdapter
from .context import StepContext, StepTracker
from .hooks import HookSet
from .technique import Technique

if TYPE_CHECKING:
    from ..config import AccelerationConfig


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class _CallHook(ModelHook):
    """Root hook on the transformer: opens and closes the step context of each call.

    It is stateful only so that diffusers' `cache_context("cond"/"uncond")` reaches it: that is
    how two-call CFG pipelines name their branches.
    """

    _is_stateful = True

    def __init__(self, session: "Session"):
        super().__init__()
        self.session = session
        self.branch = StateManager(_NoState)

    def pre_forward(self, module, *args, **kwargs):
        context = self.branch._context
        self.session.begin_call(args, kwargs, context.name if context is not None else None)
        return args, kwargs

    def post_forward(self, module, output):
        return self.session.end_call(output)

    def reset_state(self, module):
        return module


class _AttentionHook(ModelHook):
    """Routes the SDPA call of one self-attention module through the techniques' cores."""

    def __init__(self, session: "Session", cores: list[AttentionCore], layout: str, block_index: int,
                 attention_index: int):
        super().__init__()
        self.session, self.cores, self.layout = session, cores, layout
        self.block_index, self.attention_index = block_index, attention_index

    def new_forward(self, module, *args, **kwargs):
        ctx = self.session.context
        if ctx is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        call = AttentionCall(self.layout, ctx.call.text_tokens, self.block_index, self.attention_index)
        return run_with_cores(self.fn_ref.original_forward, self.cores, call, *args, **kwargs)


@dataclass
class CallRecord:
    """One transformer call in the ledger."""

    run_index: int
    step_index: int
    branch: str
    dense_flops: float
    flops: float
    seconds: float
    #: time.perf_counter() when the call returned
    ended: float
    stats: dict[str, Any] = field(default_factory=dict)


class Session:
    """Binds techniques to one transformer through its adapter; the handle owns one per transformer."""

    def __init__(self, transformer: nn.Module, adapter: ModelAdapter, tracker: StepTracker,
                 configs: list["AccelerationConfig"]):
        self.transformer = transformer
        self.adapter = adapter
        self.tracker = tracker
        self.hooks = HookSet()
        self.cost_model = TransformerCostModel(adapter)
        self.context: StepContext | None = None
        self.records: list[CallRecord] = []
        self._started = 0.0
        self.techniques: list[Technique] = [config.build(self) for config in configs]

    # -- life cycle ----------------------------------------------------------------------------
    def attach(self) -> None:
        try:
            for technique in self.techniques:
                technique.attach()
            cores = [core for core in (t.attention_core() for t in self.techniques) if core is not None]
            if cores:
                for block_index, block in enumerate(self.adapter.blocks()):
                    for attention_index, attention in enumerate(self.adapter.self_attentions(block)):
                        layout = self.adapter.attention_layout(block, attention)
                        hook = _AttentionHook(self, cores, layout, block_index, attention_index)
                        self.hooks.add(attention, hook, "attention")
            self.hooks.add(self.transformer, _CallHook(self), "call")
        except Exception:
            self.hooks.remove_all()
            raise

    def detach(self) -> None:
        self.hooks.remove_all()
        self.context = None

    # -- per call ------------------------------------------------------------------------------
    def begin_call(self, args: tuple, kwargs: dict, branch_name: str | None) -> None:
        call = self.adapter.call_info(args, kwargs)
        self.context = self.tracker.on_call(call, branch_name)
        if self.records and self.records[-1].run_index != self.context.run_index:
            self.records.clear()
        for technique in self.techniques:
            technique.on_call_start(self.context)
        self._started = time.perf_counter()

    def end_call(self, output: Any) -> Any:
        ctx = self.context
        sample = output[0] if isinstance(output, tuple) else output.sample
        for technique in self.techniques:
            sample = technique.on_call_end(ctx, sample)
        if sample.is_cuda:
            torch.cuda.synchronize(sample.device)
        ended = time.perf_counter()
        seconds = ended - self._started
        dense = self.cost_model.dense_works(ctx.call.batch_size, ctx.call.grid.num_tokens, ctx.call.text_tokens)
        works = dense
        stats: dict[str, Any] = {}
        for technique in self.techniques:
            works = technique.plan_work(ctx, works)
            stats.update(technique.call_stats(ctx))
        self.records.append(CallRecord(ctx.run_index, ctx.step_index, ctx.branch, self.cost_model.flops(dense),
                                       self.cost_model.flops(works), seconds, ended, stats))
        self.context = None
        if isinstance(output, tuple):
            return (sample,) + tuple(output[1:])
        output.sample = sample
        return output
