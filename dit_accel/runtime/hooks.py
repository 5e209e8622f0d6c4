"""Removable hooks on diffusers' HookRegistry, innermost or outermost, that leave no trace when removed.

diffusers chains the hooks of one module in registration order, the last one outermost. Some of ours
must sit *inside* every other hook whatever the order of `enable_cache` and `apply` (the ledger and
the token set must see only what really runs, and hand full-length tensors to a step cache around
them), others outside (the call hook opens the step context for everything below). `HookSet.add`
places a hook at either end and remembers it; `remove_all` unlinks each hook exactly where it sits.

Removal does not use `HookRegistry.remove_hook`, which relinks a removed hook's neighbour by its
`forward` even when that neighbour runs through `new_forward` (it would silently bypass the
neighbour), and which overwrites `module.forward` even when accelerate's offload hook has wrapped
it since (that would drop the offload hook).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from diffusers.hooks import HookRegistry, ModelHook
import torch
from diffusers.hooks.hooks import HookFunctionReference
from torch import nn

HOOK_PREFIX = "dit_accel."


def _drop_instance_forward(module: nn.Module) -> None:
    """The registry leaves the class's own bound `forward` on the instance; take it off again."""
    forward = module.__dict__.get("forward")
    if forward is not None and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward


def _chain(fn_ref: HookFunctionReference) -> Callable:
    """The forward of one link of a diffusers hook chain: pre_forward, the link below, post_forward."""

    def forward(module, *args, **kwargs):
        args, kwargs = fn_ref.pre_forward(module, *args, **kwargs)
        return fn_ref.post_forward(module, fn_ref.forward(*args, **kwargs))

    return forward


def _below(fn_ref: HookFunctionReference) -> Callable:
    """What a link calls next: the forward it wraps."""
    return fn_ref.original_forward if fn_ref.original_forward is not None else fn_ref.forward


def _set_below(fn_ref: HookFunctionReference, forward: Callable) -> None:
    if fn_ref.original_forward is not None:
        fn_ref.original_forward = forward
    else:
        fn_ref.forward = forward


def _register_innermost(registry: HookRegistry, hook: ModelHook, name: str) -> Callable:
    """Put `hook` below every hook already on the module; returns the forward it answers as."""
    if not registry._hook_order:
        registry.register_hook(hook, name)
        return registry._module_ref.forward
    if name in registry.hooks:
        raise ValueError(f"hook {name} is already registered")
    registry._module_ref = module = hook.initialize_hook(registry._module_ref)
    bottom = registry._fn_refs[0]
    original = _below(bottom)
    fn_ref = HookFunctionReference()
    fn_ref.pre_forward, fn_ref.post_forward, fn_ref.forward = hook.pre_forward, hook.post_forward, original
    if hasattr(hook, "new_forward"):
        fn_ref.original_forward = original
        fn_ref.forward = functools.update_wrapper(functools.partial(hook.new_forward, module), hook.new_forward)
    rewritten = functools.update_wrapper(functools.partial(_chain(fn_ref), module), original)
    _set_below(bottom, rewritten)
    hook.fn_ref = fn_ref
    registry.hooks[name] = hook
    registry._hook_order.insert(0, name)
    registry._fn_refs.insert(0, fn_ref)
    return rewritten


def _unlink(registry: HookRegistry, name: str, rewritten: Callable | None) -> None:
    """Take hook `name` out of the chain, relinking whatever sits above it. `rewritten` is the forward
    the hook answered as (None: whatever tops the module's chain)."""
    index = registry._hook_order.index(name)
    fn_ref = registry._fn_refs[index]
    below = _below(fn_ref)
    module = registry._module_ref
    wrapped = hasattr(module, "_hf_hook") and hasattr(module, "_old_forward")  # accelerate's hook on top
    if index + 1 < len(registry._fn_refs):
        _set_below(registry._fn_refs[index + 1], below)
    elif module.__dict__.get("forward") is rewritten or (rewritten is None and not wrapped):
        module.forward = below
    elif getattr(module, "_old_forward", None) is rewritten or (rewritten is None and wrapped):
        module._old_forward = below
    # else: the chain no longer reaches the hook (accelerate re-wrapped the original forward after its
    # pipeline call): only the registry's bookkeeping is left to drop
    registry._module_ref = registry.hooks[name].deinitalize_hook(module)
    del registry.hooks[name]
    registry._hook_order.pop(index)
    registry._fn_refs.pop(index)


@dataclass
class _Added:
    module: nn.Module
    name: str
    rewritten: Callable


class HookSet:
    """Hooks one handle added; `remove_all` takes them off again."""

    def __init__(self) -> None:
        self._added: list[_Added] = []

    def add(self, module: nn.Module, hook: ModelHook, name: str, *, innermost: bool = False) -> None:
        """Register `hook` outermost (default) or innermost on `module`."""
        registry = HookRegistry.check_if_exists_or_initialize(module)
        full_name = HOOK_PREFIX + name
        if innermost:
            rewritten = _register_innermost(registry, hook, full_name)
        else:
            registry.register_hook(hook, full_name)
            rewritten = registry._module_ref.forward
        self._added.append(_Added(module, full_name, rewritten))

    def __len__(self) -> int:
        return len(self._added)

    def remove_all(self) -> None:
        self.remove_since(0)

    def remove_since(self, count: int) -> None:
        """Take off the hooks added after the first `count`, last added first."""
        for added in reversed(self._added[count:]):
            _unlink(added.module._diffusers_hook, added.name, added.rewritten)
        del self._added[count:]


@dataclass(frozen=True)
class Leftovers:
    """Which modules under a root had a hook registry or an instance `forward` before hooks were added."""

    registries: frozenset[int]
    forwards: frozenset[int]

    @classmethod
    def of(cls, root: nn.Module) -> "Leftovers":
        modules = list(root.modules())
        return cls(frozenset(id(m) for m in modules if hasattr(m, "_diffusers_hook")),
                   frozenset(id(m) for m in modules if "forward" in m.__dict__))


def remove_named_hooks(root: nn.Module, names: tuple[str, ...]) -> None:
    """Take every hook called one of `names` off the modules under `root` (a diffusers cache's hooks)."""
    for module in root.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name in names:
            if registry is not None and name in registry.hooks:
                _unlink(registry, name, None)


def drop_leftovers(root: nn.Module, before: Leftovers) -> None:
    """Empty registries that hooks created under `root`, and the bound `forward` diffusers leaves on an
    instance, go again."""
    for module in root.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.hooks:
            continue
        if registry is not None and id(module) not in before.registries:
            del module._diffusers_hook
        if id(module) not in before.forwards:
            _drop_instance_forward(module)


def invalidate_registry_caches(root: nn.Module) -> None:
    """Hooks were added or removed under `root`: diffusers' cached child-registry lists are stale
    (a stateful hook added later would never receive `cache_context`)."""
    registry = getattr(root, "_diffusers_hook", None)
    if registry is not None:
        registry.invalidate_child_registries_cache()
    else:
        for module in root.modules():
            if hasattr(module, "_diffusers_hook"):
                module._diffusers_hook._child_registries_cache = None


class BlockBoundaries(Protocol):
    """What a `BlockHook` hands a block's entry and exit to (stage 2's token set, stage 3's pooling)."""

    def enter_block(self, index: int, block: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]: ...

    def leave_block(self, index: int, block: nn.Module, output: Any) -> Any: ...


class BlockHook(ModelHook):
    """On block `index`: its inputs go through `owner.enter_block`, its output through `owner.leave_block`."""

    def __init__(self, owner: BlockBoundaries, index: int):
        super().__init__()
        self.owner, self.index = owner, index

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        return self.owner.enter_block(self.index, module, args, kwargs)

    @torch.compiler.disable
    def post_forward(self, module, output):
        return self.owner.leave_block(self.index, module, output)


def body_of(module: nn.Module) -> Callable:
    """What the innermost hook on `module` calls: the module's own forward (its body)."""
    return _below(module._diffusers_hook._fn_refs[0])


def set_body(module: nn.Module, body: Callable) -> None:
    """Make the innermost hook on `module` call `body` in place of what it calls now."""
    _set_below(module._diffusers_hook._fn_refs[0], body)
