"""Removable hooks on diffusers' HookRegistry, with bookkeeping so removal leaves no trace."""

from __future__ import annotations

from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

HOOK_PREFIX = "dit_accel."


def _drop_instance_forward(module: nn.Module) -> None:
    """The registry leaves the class's own bound `forward` on the instance; take it off again."""
    forward = module.__dict__.get("forward")
    if forward is not None and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward


class HookSet:
    """Hooks one handle added; `remove_all` takes them off and drops registries it created."""

    def __init__(self) -> None:
        self._added: list[tuple[nn.Module, str]] = []
        self._created_registries: list[nn.Module] = []

    def add(self, module: nn.Module, hook: ModelHook, name: str) -> None:
        if not hasattr(module, "_diffusers_hook"):
            self._created_registries.append(module)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, HOOK_PREFIX + name)
        self._added.append((module, HOOK_PREFIX + name))

    def remove_all(self) -> None:
        for module, name in reversed(self._added):
            module._diffusers_hook.remove_hook(name, recurse=False)
        for module in self._created_registries:
            if not module._diffusers_hook.hooks:
                del module._diffusers_hook
        touched = {id(m): m for m, _ in self._added}
        for module in touched.values():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is None or not registry.hooks:
                _drop_instance_forward(module)
            if registry is not None:
                registry.invalidate_child_registries_cache()
        self._added.clear()
        self._created_registries.clear()
