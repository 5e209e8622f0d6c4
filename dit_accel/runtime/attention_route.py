"""Stages 5 and 6: which attentions reach torch's SDPA, and the routed forward of those that do.

Owns the diffusers attention backends and processors that end in torch's SDPA (`SDPA_BACKENDS`,
`attention_backend`, `sdpa_obstacle`) and, per session, an `AttentionRouter`: it refuses a plan
whose stages 5-6 could not act on some attention (`check_backends`, at attach and at every run
start), and runs one attention module with its SDPA calls handed to the plan's K/V source then its
kernel (`run`), recording the pairs they attended in the call's ledger. Where a module never called
SDPA, a technique that can do without (RAS without its K/V source) is said in the session's notes.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook
from torch import nn

from ..attention.intercept import AttentionCall, dense_attention, routed_sdpa
from ..config import ConfigError, Stage
from ..metrics.flops import UnitCost
from ..models.base import ModelAdapter
from .call_state import CallState
from .session_view import SessionView
from .technique import Technique

#: diffusers attention backends that end in torch's SDPA, which stages 5 and 6 can take over
SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


@functools.cache
def _calls_sdpa_itself(processor_class: type) -> bool:
    """Whether a processor that dispatches to no diffusers backend calls torch's SDPA in its `__call__`
    (AttnProcessor2_0, JointAttnProcessor2_0, ...; not AttnProcessor, SlicedAttnProcessor or xFormers'). A
    class without readable source is trusted: the routed call checks again."""
    try:
        return "scaled_dot_product_attention" in inspect.getsource(processor_class.__call__)
    except (OSError, TypeError):
        return True


def sdpa_obstacle(attention: nn.Module) -> str | None:
    """What keeps `attention` from reaching torch's SDPA, where stages 5 and 6 act (None: nothing)."""
    backend = attention_backend(attention)
    if backend not in SDPA_BACKENDS:
        return f"the diffusers backend {backend!r}"
    processor = getattr(attention, "processor", None)
    if processor is not None and not hasattr(processor, "_attention_backend") \
            and not _calls_sdpa_itself(type(processor)):
        return f"its processor {type(processor).__name__}"
    return None


def attention_backend(attention: nn.Module) -> str:
    """The diffusers backend `attention`'s processor dispatches to ("native" for processors that call SDPA)."""
    processor = getattr(attention, "processor", None)
    if processor is None or not hasattr(processor, "_attention_backend"):
        return "native"
    backend = processor._attention_backend
    if backend is None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        backend = _AttentionBackendRegistry.get_active_backend()[0]
    return getattr(backend, "value", str(backend))


class AttentionRouter:
    """Stages 5 and 6 of one session: its K/V source and kernel, and the attentions they act in."""

    def __init__(self, adapter: ModelAdapter, techniques: list[Technique], notes: set[str]):
        self.adapter = adapter
        #: the plan's techniques in stage order
        self.techniques = techniques
        by_stage = {stage: t for t in techniques for stage in t.stages}
        self.kv_source = by_stage.get(Stage.KV_SOURCE)
        self.kernel = by_stage.get(Stage.ATTENTION_KERNEL)
        #: whether the plan has a stage 5 or 6, i.e. self-attentions run through `run`
        self.active = self.kv_source is not None or self.kernel is not None
        #: the session's notes on what a run did other than its plan says
        self.notes = notes

    def _needing_sdpa(self) -> list[str]:
        """The techniques that act inside torch's SDPA and cannot do without it."""
        return [t.label for t in self.techniques if Stage.ATTENTION_KERNEL in t.stages
                or (Stage.KV_SOURCE in t.stages and not t.kv_source_optional)]

    def check_backends(self) -> None:
        """Stages 5-6 act inside torch's SDPA: refuse, before any block runs, an attention that never reaches
        it, unless every technique there can do without (RAS runs without its K/V source)."""
        needs = self._needing_sdpa()
        if not needs:
            return
        for index, block in enumerate(self.adapter.blocks()):
            for attention in self.adapter.self_attentions(block):
                obstacle = sdpa_obstacle(attention)
                if obstacle is not None:
                    raise ConfigError(
                        f"{', '.join(needs)}: stages 5-6 change attention inside torch's SDPA, which block {index}'s "
                        f"{type(attention).__name__} never reaches ({obstacle}). Use a diffusers backend among "
                        f"{', '.join(SDPA_BACKENDS)} (`transformer.set_attention_backend('native')`) with a processor "
                        "that calls torch's scaled_dot_product_attention (the model's default), or a plan without "
                        "stages 5-6.")

    def _attend(self, call: AttentionCall, cost: UnitCost, call_state: CallState, query, key, value,
                **sdpa_kwargs) -> torch.Tensor:
        """One self-attention's SDPA call through stage 5 then stage 6; the core it ran goes into the ledger."""
        call = AttentionCall(call.layout, call_state.text_tokens, call.block_index, call.attention_index)
        bias = None
        if self.kv_source is not None:
            key, value, bias, mask = self.kv_source.kv_source(call_state, call, query, key, value,
                                                              sdpa_kwargs.pop("attn_mask", None))
            sdpa_kwargs["attn_mask"] = mask
        if self.kernel is not None:
            output, pairs = self.kernel.attend(call_state, call, query, key, value, bias, **sdpa_kwargs)
        else:
            output, pairs = dense_attention(query, key, value, bias, **sdpa_kwargs), query.shape[2] * key.shape[2]
        call_state.record(cost.core_record(call.block_index, query.shape[0], query.shape[2], key.shape[2], pairs,
                                           query.shape[1]))
        return output

    def run(self, module: nn.Module, forward: Callable[..., Any], call: AttentionCall, cost: UnitCost,
            call_state: CallState, args: tuple, kwargs: dict) -> Any:
        """`forward(*args, **kwargs)` of the self-attention `module` (block `call.block_index`), its SDPA
        calls handed to stage 5 then stage 6 (the exact ledger's per-module route)."""
        calls = 0

        def attend(query, key, value, **sdpa_kwargs):
            nonlocal calls
            calls += 1
            if self.adapter.sdpa_call_layout(call.layout, calls - 1) == "cross":
                # conditioning tokens a processor adds (IP-Adapter): outside the plan, as outside the dense model
                return dense_attention(query, key, value, None, **sdpa_kwargs)
            return self._attend(call, cost, call_state, query, key, value, **sdpa_kwargs)

        with routed_sdpa(attend):
            output = forward(*args, **kwargs)
        if calls == 0:
            self._ran_without_sdpa(module, call.block_index, cost, call_state)
        return output

    def run_block(self, attentions: list[tuple[nn.Module, AttentionCall, UnitCost]], forward: Callable[..., Any],
                  call_state: CallState, args: tuple, kwargs: dict) -> Any:
        """`forward(*args, **kwargs)` of a block, each of its self-attentions' SDPA call handed to stages 5-6.

        The block's SDPA calls are told apart by their (queries, keys) counts: the first call with a
        self-attention's counts is that attention's (in every family a block runs its self-attentions before
        any cross-attention, and a processor its own attention before extra conditioning calls); any other
        call (cross-attention, IP-Adapter tokens) runs dense, outside the plan as outside the dense model."""
        pending = list(attentions)

        def attend(query, key, value, **sdpa_kwargs):
            for position, (module, call, cost) in enumerate(pending):
                if cost.attention_shape(call_state.image_tokens, call_state.text_tokens) == \
                        (query.shape[2], key.shape[2]):
                    del pending[position]
                    return self._attend(call, cost, call_state, query, key, value, **sdpa_kwargs)
            return dense_attention(query, key, value, None, **sdpa_kwargs)

        with routed_sdpa(attend):
            output = forward(*args, **kwargs)
        for module, call, cost in pending:
            self._ran_without_sdpa(module, call.block_index, cost, call_state)
        return output

    def _ran_without_sdpa(self, module: nn.Module, block: int, cost: UnitCost, call_state: CallState) -> None:
        """`module` computed its attention without torch's SDPA (a processor the static check trusted, or one
        that RAS can run beside): dense over what it was given, said in `report()`; a kernel or a K/V source
        that cannot do without raises."""
        obstacle = sdpa_obstacle(module) or f"its processor {type(getattr(module, 'processor', None)).__name__}"
        needs = self._needing_sdpa()
        if needs:
            raise RuntimeError(
                f"{', '.join(needs)}: {type(module).__name__} of block {block} did not call torch's "
                f"scaled_dot_product_attention ({obstacle}), so stages 5-6 could not act; use one of "
                f"{', '.join(SDPA_BACKENDS)} with a processor that calls it")
        queries, keys = cost.attention_shape(call_state.image_tokens, call_state.text_tokens)
        width = call_state.widths.get((block, cost.name))
        call_state.record(cost.core_record(block, call_state.batch, queries, keys, queries * keys,
                                           None if width is None else width.heads))
        label = self.kv_source.label
        self.notes.add(f"{label} ran without its K/V source (stage 5) where attention never reaches torch's "
                       f"scaled_dot_product_attention ({obstacle}): there the tokens computed attended to each "
                       "other and the text only")


class BlockRouteHook(ModelHook):
    """Innermost on a block whose self-attentions stages 5-6 act in (light ledger): the block's SDPA calls go
    through `AttentionRouter.run_block`. It sits outside the block's body, so a compiled body keeps its
    attention in its graph (the routed call is one custom op there)."""

    def __init__(self, session: SessionView, router: AttentionRouter,
                 attentions: list[tuple[nn.Module, AttentionCall, UnitCost]]):
        super().__init__()
        self.session, self.router, self.attentions = session, router, attentions

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        call_state = self.session.call_state
        if call_state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        return self.router.run_block(self.attentions, self.fn_ref.original_forward, call_state, args, kwargs)
