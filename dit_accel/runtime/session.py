"""One accelerated transformer: its adapter, its techniques in stage order, its hooks and its ledger.

Hooks a session adds, outermost first on each module:

- the transformer: torch forward hooks around every wrapper (they open the step context and the
  call state, and a diffusers cache context where the pipeline opens none), and a passive hook
  that receives the pipeline's `cache_context`;
- each block: the step caches' hooks (stage 1), then the token set's gather/scatter (stage 2), then
  stage 3's pool/unpool, so stage 3 pools what stage 2 gathered;
- each attention unit of a block, and each block: the ledger hooks, innermost, so they record only
  what really ran (a unit a step cache may skip on its own gets a hook of its own); the attention
  hooks also route SDPA through stages 5 and 6.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager, _set_cache_context
from torch import nn

from ..attention.intercept import AttentionCall, dense_attention, routed_sdpa
from ..config import ConfigError, Stage
from ..metrics.flops import TransformerCostModel, UnitCost, Work
from ..models.base import ModelAdapter
from .context import StepTracker
from .hooks import HOOK_PREFIX, HookSet, Leftovers, drop_leftovers, invalidate_registry_caches
from .call_state import CallState
from .registry import check_composable, registration
from .technique import Technique
from .token_set import TokenSetStage
from .token_transform import TokenTransformStage

#: diffusers attention backends that end in torch's SDPA, which stages 5 and 6 can take over
SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


def _foreign_skippers(module: nn.Module) -> list[str]:
    """Names of hooks not ours that may replace the module's computation (they define `new_forward`)."""
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return []
    return [name for name, hook in registry.hooks.items()
            if not name.startswith(HOOK_PREFIX) and hasattr(hook, "new_forward")]


def _has_foreign_stateful_hooks(root: nn.Module) -> bool:
    return any(not name.startswith(HOOK_PREFIX) and hook._is_stateful
               for module in root.modules() if hasattr(module, "_diffusers_hook")
               for name, hook in module._diffusers_hook.hooks.items())


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


class _ContextReceiver(ModelHook):
    """A passive stateful hook on the transformer: diffusers' `cache_context(...)` reaches it, and that
    is how pipelines name their CFG branches and, for some, pass the step index and sigma."""

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.cache_context = StateManager(_NoState)

    def reset_state(self, module):
        return module


class _LedgerHook(ModelHook):
    """Innermost on a block (or on a unit a step cache may skip on its own): records the linear work of
    its units that are not attentions, after it ran (stage 2 has set the tokens by then)."""

    def __init__(self, session: "Session", block: int, costs: list[UnitCost]):
        super().__init__()
        self.session, self.block, self.costs = session, block, costs

    @torch.compiler.disable
    def post_forward(self, module, output):
        call_state = self.session.call_state
        if call_state is not None:
            for cost in self.costs:
                call_state.ledger.extend(cost.records(self.block, call_state.batch, call_state.image_tokens, call_state.text_tokens, False,
                                                call_state.widths.get((self.block, cost.name))))
        return output


class _AttentionHook(ModelHook):
    """Innermost on an attention module: records its work, routes its SDPA through stages 5 and 6,
    and hands a step cache around it full-length outputs (stage 2)."""

    def __init__(self, session: "Session", block: int, cost: UnitCost, call: AttentionCall | None,
                 scatter_output: bool):
        super().__init__()
        self.session, self.block, self.cost, self.call = session, block, cost, call
        self.scatter_output = scatter_output

    @torch.compiler.disable
    def new_forward(self, module, *args, **kwargs):
        session, call_state = self.session, self.session.call_state
        if call_state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        routed = self.call is not None and session.routes_attention
        # linear work, and the dense attention core unless stages 5-6 record what they ran
        call_state.ledger.extend(self.cost.records(self.block, call_state.batch, call_state.image_tokens, call_state.text_tokens, not routed,
                                             call_state.widths.get((self.block, self.cost.name))))
        if routed:
            output = session.run_routed_attention(self, module, call_state, args, kwargs)
        else:
            output = self.fn_ref.original_forward(*args, **kwargs)
        if self.scatter_output:
            output = session.token_set.scatter_attention_output(call_state, module, output)
        return output


class _TextOutputHook(ModelHook):
    """Inside a step cache on a block that returns None for its text tokens (SD3's last block): hand
    the cache the text tokens that came in, so its residual arithmetic has a tensor there."""

    def __init__(self, text_arg: str, text_index: int):
        super().__init__()
        self.text_arg, self.text_index = text_arg, text_index
        self._text = None

    def pre_forward(self, module, *args, **kwargs):
        self._text = kwargs.get(self.text_arg)
        return args, kwargs

    def post_forward(self, module, output):
        text, self._text = self._text, None
        if isinstance(output, tuple) and output[self.text_index] is None and text is not None:
            output = tuple(text if i == self.text_index else o for i, o in enumerate(output))
        return output


@dataclass
class CallRecord:
    """One transformer call in the ledger."""

    run_index: int
    step_index: int
    num_steps: int | None
    timestep: float
    sigma: float | None
    branch: str
    dense_flops: float
    seconds: float
    #: time.perf_counter() when the call returned
    ended: float
    works: list[Work]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def flops(self) -> float:
        return sum(w.flops for w in self.works)


class Session:
    """Binds techniques to one transformer through its adapter; the handle owns one per transformer."""

    def __init__(self, transformer: nn.Module, adapter: ModelAdapter, tracker: StepTracker, configs: list[Any]):
        self.transformer = transformer
        self.adapter = adapter
        self.tracker = tracker
        self.hooks = HookSet()
        self.cost_model = TransformerCostModel(adapter)
        self.call_state: CallState | None = None
        self.records: list[CallRecord] = []
        self.run_index = -1
        self.token_set: TokenSetStage | None = None
        self.token_transform: TokenTransformStage | None = None
        techniques = []
        for config in configs:
            reg = registration(config)
            technique = reg.technique(config, self)
            technique.stages = reg.stages(config)
            techniques.append(technique)
        #: in stage order: the plan, not the argument order, fixes how techniques nest
        self.techniques: list[Technique] = sorted(techniques, key=lambda t: min(t.stages, default=Stage.STEP_SKIP))
        self.by_stage = {stage: t for t in self.techniques for stage in t.stages}
        self.routes_attention = Stage.KV_SOURCE in self.by_stage or Stage.ATTENTION_KERNEL in self.by_stage
        #: peak bytes each technique held between calls
        self.peak_state_bytes: dict[str, int] = {}
        self._opened_cache_context = False
        self._resets_caches = False
        self._before = Leftovers(frozenset(), frozenset())
        self._receiver: _ContextReceiver | None = None
        #: the blocks and attention modules a step cache wrapped when the session attached
        self._cached: tuple[set[int], dict[nn.Module, str]] = (set(), {})
        self._call_hooks: list = []
        self._started = 0.0

    # -- life cycle ----------------------------------------------------------------------------
    def attach(self) -> None:
        self._before = Leftovers.of(self.transformer)
        #: what the last run did other than its plan says, for `report()` (RAS without its K/V source, ...)
        self.notes: set[str] = set()
        try:
            for technique in self.techniques:
                technique.check_plan()
            self._check_attention_backends()
            for technique in self.techniques:
                technique.attach()
            self._receiver = _ContextReceiver()
            self.hooks.add(self.transformer, self._receiver, "context")
            #: hooks from here on are laid out around the step caches, and laid out again when those change
            self._layout_start = len(self.hooks)
            self._lay_out()
            # torch's own hooks, outside every forward wrapper (accelerate's offload hook re-wraps the
            # transformer's forward after each pipeline call and would drop a hook inside it); nearest
            # the call among torch's hooks: a user's forward hook sees the finished output
            self._call_hooks = [self.transformer.register_forward_pre_hook(self._pre_call, with_kwargs=True),
                                self.transformer.register_forward_hook(self._post_call, with_kwargs=True,
                                                                       prepend=True)]
        except Exception:
            self.detach()
            raise
        invalidate_registry_caches(self.transformer)

    def _lay_out(self) -> None:
        """The stage hooks, around the step caches on the model now (see the module docstring)."""
        self._cached = cached_blocks, cached_attentions = self._cached_modules()
        for index, (block, cost) in enumerate(zip(self.adapter.blocks(), self.cost_model.blocks)):
            self._attach_units(index, block, cost.units, cached_attentions)
        self._complete_text_outputs(cached_blocks)
        self.token_set = self.token_transform = None
        if Stage.TOKEN_SET in self.by_stage:
            self.token_set = TokenSetStage(self, cached_blocks, cached_attentions)
            self.token_set.attach()
        if Stage.TOKEN_TRANSFORM in self.by_stage:  # innermost: pools what stage 2 gathered
            self.token_transform = TokenTransformStage(self, self.by_stage[Stage.TOKEN_TRANSFORM])
            self.token_transform.attach()

    def check_step_cache(self, config: Any) -> None:
        """Refuse (`ConfigError`), before diffusers applies it, a step cache `enable_cache(config)` would add
        to this plan: a second one, or one a technique cannot work with."""
        try:
            technique = registration(config).technique
        except ConfigError:
            return  # not a cache dit-accel knows: diffusers' own enable_cache decides
        check_composable([t.config for t in self.techniques] + [config])
        if technique is not None:
            technique(config, self).check_plan()

    def follow_step_caches(self) -> None:
        """A step cache enabled or disabled since the hooks were laid out joins the plan where apply() would
        have put it: the stage hooks are laid out again around it. Where the plan cannot take it, a
        `ConfigError` and nothing changed."""
        cached = self._cached_modules()
        if cached == self._cached:
            return
        self.hooks.remove_since(self._layout_start)
        self._lay_out()
        invalidate_registry_caches(self.transformer)

    def detach(self) -> None:
        self.end_run()
        for handle in self._call_hooks:
            handle.remove()
        self._call_hooks = []
        self.hooks.remove_all()
        for technique in reversed(self.techniques):
            technique.detach()
        drop_leftovers(self.transformer, self._before)
        invalidate_registry_caches(self.transformer)
        self.call_state = None

    def _cached_modules(self) -> tuple[set[int], dict[nn.Module, str]]:
        """Blocks and attention modules a step cache wraps (a foreign hook with `new_forward`)."""
        blocks = {i for i, block in enumerate(self.adapter.blocks()) if _foreign_skippers(block)}
        attentions: dict[nn.Module, str] = {}
        self_attentions = {id(a) for b in self.adapter.blocks() for a in self.adapter.self_attentions(b)}
        transform = self.by_stage.get(Stage.TOKEN_TRANSFORM)
        pooled = transform.transformed_blocks() if transform is not None else frozenset()
        for index, block in enumerate(self.adapter.blocks()):
            for name, unit in block.named_children():
                if not _foreign_skippers(unit):
                    continue
                if index in pooled:
                    raise ConfigError(f"a step cache on {type(unit).__name__} ({name}) of block {index} cannot be "
                                      f"combined with {transform.label}'s pooled blocks: its cached outputs would "
                                      "change length with the token density; put it on blocks")
                if id(unit) in self_attentions:
                    attentions[unit] = self.adapter.attention_layout(block, unit)
                elif any(unit is attn for attn, _, _ in self.adapter.attention_streams(block)):
                    attentions[unit] = "image"
                elif Stage.TOKEN_SET in self.by_stage:
                    raise ConfigError(f"a step cache on {type(unit).__name__} ({name}) of a block cannot be "
                                      f"combined with {self.by_stage[Stage.TOKEN_SET].label} yet: put it on "
                                      "blocks or attention modules")
        return blocks, attentions

    def _complete_text_outputs(self, cached_blocks: set[int]) -> None:
        """A block that returns None for its text tokens gets them back inside a step cache on it."""
        blocks = self.adapter.blocks()
        for index in cached_blocks:
            block = blocks[index]
            if self.adapter.drops_text_output(block):
                signature = self.adapter.block_signature(block)
                self.hooks.add(block, _TextOutputHook(signature.text_arg, 1 - signature.output_hidden_index),
                               f"text_output.{index}", innermost=True)

    def _attach_units(self, index: int, block: nn.Module, units: dict[str, UnitCost],
                      cached_attentions: dict[nn.Module, str]) -> None:
        """Ledger hooks: one per attention unit, one per unit a step cache may skip on its own, and one on
        the block for the other units (they run exactly when the block does)."""
        self_attentions = self.adapter.self_attentions(block)
        with_block = []
        for name, cost in units.items():
            module = getattr(block, name)
            if cost.attention is None:
                if _foreign_skippers(module):
                    self.hooks.add(module, _LedgerHook(self, index, [cost]), "ledger", innermost=True)
                else:
                    with_block.append(cost)
                continue
            call = None
            for position, attention in enumerate(self_attentions):
                if attention is module:
                    call = AttentionCall(self.adapter.attention_layout(block, module), 0, index, position)
            scatter = Stage.TOKEN_SET in self.by_stage and module in cached_attentions
            self.hooks.add(module, _AttentionHook(self, index, cost, call, scatter), "ledger", innermost=True)
        if with_block:
            self.hooks.add(block, _LedgerHook(self, index, with_block), "ledger", innermost=True)

    def _needing_sdpa(self) -> list[str]:
        """The techniques that act inside torch's SDPA and cannot do without it."""
        return [t.label for t in self.techniques if Stage.ATTENTION_KERNEL in t.stages
                or (Stage.KV_SOURCE in t.stages and not t.kv_source_optional)]

    def _check_attention_backends(self) -> None:
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

    # -- per run -------------------------------------------------------------------------------
    def end_run(self) -> None:
        """The pipeline call is over: every technique frees what it kept between calls."""
        for technique in self.techniques:
            technique.end_run()
        if self.token_set is not None:
            self.token_set.end_run()

    def _begin_run(self, cache_context: Any) -> None:
        self.end_run()
        self.records.clear()
        self.notes.clear()
        # before any block runs: processors set since apply(), caches added by other means than enable_cache
        self._check_attention_backends()
        self.follow_step_caches()
        self._resets_caches = _has_foreign_stateful_hooks(self.transformer)
        if self._resets_caches:
            # diffusers resets stateful cache hooks only in CacheMixin models' pipelines (not SD3, PixArt, DiT)
            HookRegistry.check_if_exists_or_initialize(self.transformer).reset_stateful_hooks(recurse=True)
            if cache_context is not None:
                _set_cache_context(self.transformer, cache_context)

    # -- per call ------------------------------------------------------------------------------
    @torch.compiler.disable
    def _pre_call(self, module, args, kwargs):
        self.begin_call(args, kwargs, self._receiver.cache_context._context)

    @torch.compiler.disable
    def _post_call(self, module, args, kwargs, output):
        return self.end_call(output)

    def begin_call(self, args: tuple, kwargs: dict, cache_context: Any) -> None:
        self._started = time.perf_counter()
        call = self.adapter.call_info(args, kwargs)
        ctx = self.tracker.on_call(call, cache_context)
        if ctx.run_index != self.run_index:
            self.run_index = ctx.run_index
            self._begin_run(cache_context)
        if self._resets_caches and (cache_context is None or getattr(cache_context, "step_index", None) is None):
            # the pipeline opened no context (SD3, PixArt, DiT) or one without the step: open a full one
            name = ctx.cache_name if cache_context is None else cache_context.name
            _set_cache_context(self.transformer, CacheContext(name, ctx.step_index, ctx.num_steps, ctx.timestep,
                                                              ctx.sigma))
            self._opened_cache_context = cache_context is None
        self.call_state = call_state = CallState(ctx)
        if self.token_set is not None:
            self.token_set.reset_call()
        try:
            for technique in self.techniques:
                technique.begin_call(call_state)
        except Exception:
            self._close_call()
            raise

    def _close_call(self) -> None:
        if self.token_set is not None:
            self.token_set.reset_call()
        if self.token_transform is not None:
            self.token_transform.reset_call()
        if self._opened_cache_context:
            _set_cache_context(self.transformer, None)
            self._opened_cache_context = False
        self.call_state = None

    def end_call(self, output: Any) -> Any:
        call_state = self.call_state
        sample = output[0] if isinstance(output, tuple) else output.sample
        for technique in reversed(self.techniques):
            sample = technique.end_call(call_state, sample)
        self._close_call()
        if sample.is_cuda:
            torch.cuda.synchronize(sample.device)
        ended = time.perf_counter()
        ctx = call_state.ctx
        stats: dict[str, Any] = {}
        for technique in self.techniques:
            stats.update(technique.call_stats(call_state))
            held = technique.state_bytes() + (self.token_set.state_bytes() if self.token_set and
                                              Stage.TOKEN_SET in technique.stages else 0)
            self.peak_state_bytes[technique.label] = max(self.peak_state_bytes.get(technique.label, 0), held)
        dense = self.cost_model.dense_flops(ctx.call.batch_size, ctx.call.grid.num_tokens, ctx.call.text_tokens,
                                            ctx.call.skipped_blocks)
        self.records.append(CallRecord(ctx.run_index, ctx.step_index, ctx.num_steps, ctx.timestep, ctx.sigma,
                                       ctx.branch, dense, ended - self._started, ended, call_state.ledger, stats))
        if isinstance(output, tuple):
            return (sample,) + tuple(output[1:])
        output.sample = sample
        return output

    # -- stages 5 and 6 ------------------------------------------------------------------------
    def run_routed_attention(self, hook: _AttentionHook, module: nn.Module, call_state: CallState, args: tuple,
                             kwargs: dict) -> Any:
        kv_source = self.by_stage.get(Stage.KV_SOURCE)
        kernel = self.by_stage.get(Stage.ATTENTION_KERNEL)
        call = AttentionCall(hook.call.layout, call_state.text_tokens, hook.call.block_index, hook.call.attention_index)
        calls = 0

        def attend(query, key, value, **sdpa_kwargs):
            nonlocal calls
            calls += 1
            if self.adapter.sdpa_call_layout(call.layout, calls - 1) == "cross":
                # conditioning tokens a processor adds (IP-Adapter): outside the plan, as outside the dense model
                return dense_attention(query, key, value, None, **sdpa_kwargs)
            bias = None
            if kv_source is not None:
                key, value, bias, mask = kv_source.kv_source(call_state, call, query, key, value,
                                                             sdpa_kwargs.pop("attn_mask", None))
                sdpa_kwargs["attn_mask"] = mask
            if kernel is not None:
                output, pairs = kernel.attend(call_state, call, query, key, value, bias, **sdpa_kwargs)
            else:
                output, pairs = dense_attention(query, key, value, bias, **sdpa_kwargs), query.shape[2] * key.shape[2]
            call_state.record(hook.cost.core_record(hook.block, query.shape[0], query.shape[2], key.shape[2], pairs,
                                              query.shape[1]))
            return output

        with routed_sdpa(attend):
            output = hook.fn_ref.original_forward(*args, **kwargs)
        if calls == 0:
            self._ran_without_sdpa(hook, module, call_state)
        return output

    def _ran_without_sdpa(self, hook: _AttentionHook, module: nn.Module, call_state: CallState) -> None:
        """`module` computed its attention without torch's SDPA (a processor the static check trusted, or one
        that RAS can run beside): dense over what it was given, said in `report()`; a kernel or a K/V source
        that cannot do without raises."""
        obstacle = sdpa_obstacle(module) or f"its processor {type(getattr(module, 'processor', None)).__name__}"
        needs = self._needing_sdpa()
        if needs:
            raise RuntimeError(
                f"{', '.join(needs)}: {type(module).__name__} of block {hook.block} did not call torch's "
                f"scaled_dot_product_attention ({obstacle}), so stages 5-6 could not act; use one of "
                f"{', '.join(SDPA_BACKENDS)} with a processor that calls it")
        queries, keys = hook.cost.attention_shape(call_state.image_tokens, call_state.text_tokens)
        width = call_state.widths.get((hook.block, hook.cost.name))
        call_state.record(hook.cost.core_record(hook.block, call_state.batch, queries, keys, queries * keys,
                                          None if width is None else width.heads))
        label = self.by_stage[Stage.KV_SOURCE].label
        self.notes.add(f"{label} ran without its K/V source (stage 5) where attention never reaches torch's "
                       f"scaled_dot_product_attention ({obstacle}): there the tokens computed attended to each "
                       "other and the text only")
