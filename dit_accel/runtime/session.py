"""One accelerated transformer: its adapter, its techniques in stage order, and the hooks that run them.

A session owns the life cycle of a plan on one transformer (attach, lay the stage hooks out around
the step caches, detach) and opens and closes each call's `CallState`. What it delegates: the ledger
hooks, call records and `report()`'s sums to ledger.py; stages 5-6 and the attention backend check to
attention_route.py; stage 2 and stage 3 to token_set.py and token_transform.py.

Hooks a session adds, outermost first on each module:

- the transformer: torch forward hooks around every wrapper (they open the step context and the
  call state, and a diffusers cache context where the pipeline opens none), and a passive hook
  that receives the pipeline's `cache_context`;
- each block: the step caches' hooks (stage 1), then the token set's gather/scatter (stage 2), then
  stage 3's pool/unpool, so stage 3 pools what stage 2 gathered;
- each block, innermost: the ledger hook, which records what really ran, and where stages 5-6 act, the
  attention route (light ledger: both outside the block's body, so a compiled body stays one graph;
  `compiled_blocks.py` moves a block's compiled call below them); each unit a step cache may skip on
  its own, and under the exact ledger every attention unit, gets a ledger hook of its own, which then
  routes that attention.

It also checks, at a run's first CUDA call, that what the plan will hold fits the free memory
(`estimate_bytes`).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, CacheContext, StateManager, _set_cache_context
from torch import nn

from ..attention.intercept import AttentionCall
from ..config import ConfigError, Stage
from ..metrics.flops import TransformerCostModel, UnitCost
from ..models.base import CallInfo, ModelAdapter
from .attention_route import AttentionRouter, BlockRouteHook
from .call_state import CallState
from .compiled_blocks import CompiledBlocks
from .context import StepTracker
from .estimate import CallShapes, shapes_of
from .hooks import HOOK_PREFIX, HookSet, Leftovers, drop_leftovers, invalidate_registry_caches
from .ledger import AttentionHook, CallClock, CallRecord, LedgerHook
from .registry import check_composable, registration
from .storage import in_host_memory
from .technique import Technique
from .token_set import TokenSetStage
from .token_transform import TokenTransformStage


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


def _passes_through(module: nn.Module) -> bool:
    """Whether every step-cache hook on a block only runs it or hands its input on unchanged (diffusers'
    FirstBlockCache and MagCache on the blocks between their head and tail: `is_tail` False), so the
    cache never reads or writes the block's tokens and stage 2 need not bring them to full length there."""
    registry = module._diffusers_hook
    return all(getattr(registry.hooks[name], "is_tail", True) is False for name in _foreign_skippers(module))


def _has_foreign_stateful_hooks(root: nn.Module) -> bool:
    return any(not name.startswith(HOOK_PREFIX) and hook._is_stateful
               for module in root.modules() if hasattr(module, "_diffusers_hook")
               for name, hook in module._diffusers_hook.hooks.items())


class _ContextReceiver(ModelHook):
    """A passive stateful hook on the transformer: diffusers' `cache_context(...)` reaches it, and that
    is how pipelines name their CFG branches and, for some, pass the step index and sigma."""

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.cache_context = StateManager(_NoState)

    def reset_state(self, module):
        return module


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


class Session:
    """Binds techniques to one transformer through its adapter; the handle owns one per transformer."""

    def __init__(self, transformer: nn.Module, adapter: ModelAdapter, tracker: StepTracker, configs: list[Any],
                 ledger: str = "light", details: bool = False):
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
        #: what the last run did other than its plan says, for `report()` (RAS without its K/V source, ...)
        self.notes: set[str] = set()
        #: stages 5 and 6
        self.router = AttentionRouter(adapter, self.techniques, self.notes)
        #: peak bytes each technique held between calls
        self.peak_state_bytes: dict[str, int] = {}
        self._opened_cache_context = False
        self._resets_caches = False
        self._before = Leftovers(frozenset(), frozenset())
        self._receiver: _ContextReceiver | None = None
        #: the blocks and attention modules a step cache wrapped when the session attached
        self._cached: tuple[set[int], dict[nn.Module, str]] = (set(), {})
        #: blocks the user compiled, their compiled call moved below the plan's hooks
        self._compiled = CompiledBlocks()
        #: whether a per-unit hook of the session sits inside a block's body and breaks a compiled graph there
        self._hooks_in_bodies = False
        self._call_hooks: list = []
        #: times the calls without waiting for the device; `_started` is the running call's start
        self._clock = CallClock()
        self._started: Any = None
        #: "light": the ledger's hooks on blocks; "exact": on every attention unit too (`apply(..., ledger=)`)
        self.ledger = ledger
        #: keep the per-call pictures' stats (token sets, cluster maps) for the UI (`apply(..., details=True)`)
        self.details = details

    # -- life cycle ----------------------------------------------------------------------------
    def attach(self) -> None:
        self._before = Leftovers.of(self.transformer)
        try:
            for technique in self.techniques:
                technique.check_plan()
            self.router.check_backends()
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
            self._follow_compiled_blocks()
        except Exception:
            self.detach()
            raise
        invalidate_registry_caches(self.transformer)

    def _lay_out(self) -> None:
        """The stage hooks, around the step caches on the model now (see the module docstring)."""
        self._cached = cached_blocks, cached_attentions = self._cached_modules()
        self.token_set = self.token_transform = None
        self._hooks_in_bodies = False
        if Stage.TOKEN_SET in self.by_stage:
            self.token_set = TokenSetStage(self, cached_blocks, cached_attentions)
        for index, (block, cost) in enumerate(zip(self.adapter.blocks(), self.cost_model.blocks)):
            self._attach_units(index, block, cost.units, cached_attentions)
        self._complete_text_outputs(cached_blocks)
        if self.token_set is not None:
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
        self._compiled.restore()
        self.hooks.remove_since(self._layout_start)
        self._lay_out()
        invalidate_registry_caches(self.transformer)
        self._follow_compiled_blocks()

    def _follow_compiled_blocks(self) -> None:
        """Blocks the user compiled run the plan's hooks eagerly around their compiled body (`compiled_blocks.py`)."""
        breaks = self._hooks_in_bodies or any(t.breaks_block_graph() for t in self.techniques)
        if self._compiled.follow(self.transformer, self.adapter.blocks(), breaks) and breaks:
            self.notes.add("compiled blocks compiled their bodies in pieces: a hook of the plan inside them (the "
                           "exact ledger's, a step cache on attention modules, DyDiT's MLP token skipping) breaks "
                           "their graph")

    def detach(self) -> None:
        self.end_run()
        self._compiled.restore()
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
        """Blocks and attention modules where a step cache reads or writes tokens (a foreign hook with
        `new_forward`, unless it only passes the block through)."""
        blocks = {i for i, block in enumerate(self.adapter.blocks())
                  if _foreign_skippers(block) and not _passes_through(block)}
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
        """Ledger hooks: one per unit a step cache may skip on its own (and, for the exact ledger, per
        attention unit), one on the block for the other units (they run exactly when the block does); the
        block's self-attentions that stages 5-6 act in are routed from the block, or from their own hook."""
        self_attentions = self.adapter.self_attentions(block)
        with_block, with_core, routed = [], set(), []
        for name, cost in units.items():
            module = getattr(block, name)
            if cost.attention is None:
                if _foreign_skippers(module):
                    self.hooks.add(module, LedgerHook(self, index, [cost]), "ledger", innermost=True)
                else:
                    with_block.append(cost)
                continue
            call = None
            for position, attention in enumerate(self_attentions):
                if attention is module:
                    call = AttentionCall(self.adapter.attention_layout(block, module), 0, index, position)
            router = self.router if call is not None and self.router.active else None
            if self.ledger == "exact" or module in cached_attentions or _foreign_skippers(module):
                self._hooks_in_bodies = True
                scatter = self.token_set if module in cached_attentions else None
                self.hooks.add(module, AttentionHook(self, index, cost, call, router, scatter), "ledger",
                               innermost=True)
                continue
            with_block.append(cost)
            if router is None:
                with_core.add(name)
            else:
                routed.append((module, call, cost))
        if with_block:
            self.hooks.add(block, LedgerHook(self, index, with_block, frozenset(with_core)), "ledger", innermost=True)
        if routed:
            self.hooks.add(block, BlockRouteHook(self, self.router, routed), "route", innermost=True)

    def _check_memory(self, call: CallInfo, cfg_batched: bool) -> None:
        """A run's first call on CUDA: refuse a plan whose state cannot fit in the free device memory, and
        warn where it takes most of it, with the numbers and the smaller forms its techniques offer."""
        guided = not cfg_batched and bool(self.tracker.guided())
        held = self.estimate_bytes(shapes_of(self.adapter, call.batch_size * (2 if guided else 1), call.grid,
                                             call.text_tokens))
        device = sum(b for kinds in held.values() for kind, b in kinds.items() if not in_host_memory(kind))
        free = torch.cuda.mem_get_info(call.latents.device)[0]
        if device <= 0.8 * free:
            return
        parts = ", ".join(f"{label} {kind} {b / 2**30:.1f} GiB" for label, kinds in held.items()
                          for kind, b in kinds.items() if b)
        options = self.smaller_forms()
        message = (f"the plan will hold {device / 2**30:.1f} GiB on the device ({parts}) with "
                   f"{free / 2**30:.1f} GiB free" + (f"; smaller forms: {'; '.join(options)}" if options else ""))
        if device > free:
            raise ConfigError(message)
        warnings.warn(message, ResourceWarning, stacklevel=2)

    def smaller_forms(self) -> list[str]:
        """The config changes its techniques offer to hold less (`Technique.smaller_forms`)."""
        return [option for technique in self.techniques for option in technique.smaller_forms()]

    def estimate_bytes(self, shapes: CallShapes) -> dict[str, dict[str, int]]:
        """Per technique, the bytes by kind it will hold at most in a run at `shapes` (the token set's
        boundary residuals under the stage-2 technique), as `report()["state_bytes"]` measures them."""
        held = {}
        for technique in self.techniques:
            kinds = dict(technique.estimate_bytes(shapes))
            if self.token_set is not None and Stage.TOKEN_SET in technique.stages:
                kinds.update(self.token_set.estimate_bytes(shapes))
            held[technique.label] = kinds
        return held

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
        self._clock = CallClock()
        # before any block runs: processors set since apply(), caches added by other means than enable_cache
        self.router.check_backends()
        self.follow_step_caches()
        self._follow_compiled_blocks()
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
        call = self.adapter.call_info(args, kwargs)
        self._started = self._clock.start(call.latents.device)
        ctx = self.tracker.on_call(call, cache_context)
        if ctx.run_index != self.run_index:
            self.run_index = ctx.run_index
            self._begin_run(cache_context)
            if call.latents.is_cuda:
                self._check_memory(call, ctx.cfg_batched)
        if self._resets_caches and (cache_context is None or getattr(cache_context, "step_index", None) is None):
            # the pipeline opened no context (SD3, PixArt, DiT) or one without the step: open a full one
            name = ctx.cache_name if cache_context is None else cache_context.name
            _set_cache_context(self.transformer, CacheContext(name, ctx.step_index, ctx.num_steps, ctx.timestep,
                                                              ctx.sigma))
            self._opened_cache_context = cache_context is None
        self.call_state = call_state = CallState(ctx)
        if self.token_set is not None:
            self.token_set.reset_call()
        #: the techniques this call runs through: all of them, or up to a step mask that reuses an output
        self._acting = []
        try:
            for technique in self.techniques:
                self._acting.append(technique)
                technique.begin_call(call_state)
                if call_state.reused_output is not None:
                    break
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
        for technique in reversed(self._acting):
            sample = technique.end_call(call_state, sample)
        self._close_call()
        clock = self._clock.stop(self._started, sample.device)
        ctx = call_state.ctx
        stats: dict[str, Any] = {}
        for technique in self._acting:
            stats.update({key: value for key, value in technique.call_stats(call_state).items()
                          if self.details or key not in technique.picture_stats})
            held = technique.state_bytes() + (self.token_set.state_bytes() if self.token_set and
                                              Stage.TOKEN_SET in technique.stages else 0)
            self.peak_state_bytes[technique.label] = max(self.peak_state_bytes.get(technique.label, 0), held)
        dense = self.cost_model.dense_flops(ctx.call.batch_size, ctx.call.grid.num_tokens, ctx.call.text_tokens,
                                            ctx.call.skipped_blocks)
        self.records.append(CallRecord(ctx.without_tensors(), dense, clock, call_state.ledger, stats))
        if isinstance(output, tuple):
            return (sample,) + tuple(output[1:])
        output.sample = sample
        return output
