"""Compiled blocks under a plan: the plan's block hooks run eagerly around the block's compiled body.

`transformer.compile_repeated_blocks()` (or `block.compile()`, or `transformer.compile()` for all of it)
compiles a block's `_call_impl`, which
runs whatever forward the block has: under a plan, the hook chain. dit-accel's block hooks (stage 2
gathers, stage 3 pooling, the ledger, the attention route) are Python bookkeeping that dynamo cannot
trace as one graph, so while a plan is attached the compiled call moves one level down: the block
runs its hooks eagerly and its own forward (attention and MLP) through the compiler settings the user
chose (the same `torch.compile` context). A routed attention call is one custom op in that graph
(`attention/intercept.py`). `restore` puts every compiled call back as it was.

Where a hook of the plan sits inside the body and breaks its graph (the exact ledger's per-unit hooks,
a step cache on attention modules, DyDiT's MLP token skipping), the body compiles in pieces with
torch.compile's defaults instead, and the session says so.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .hooks import body_of, set_body


def _recompile(compiled_call: Callable, body: Callable, breaks: bool) -> Callable:
    """`body` through the same compiler settings as `compiled_call` (a `torch.compile` result); where the body
    `breaks` its graph, torch.compile's defaults, which compile it in pieces."""
    if breaks:
        return torch.compile(body)
    for cell in getattr(compiled_call, "__closure__", None) or ():
        context = cell.cell_contents
        if type(context).__name__ == "OptimizeContext" and callable(context):
            return context(body)
    return torch.compile(body)


class CompiledBlocks:
    """The blocks whose compiled call a session moved below its hooks, and what each had."""

    def __init__(self) -> None:
        #: block -> (its compiled call, the body its innermost hook called before)
        self._moved: dict[nn.Module, tuple[Callable, Callable]] = {}

    def follow(self, transformer: nn.Module, blocks: list[nn.Module], breaks: bool) -> bool:
        """Move the compiled call of each block compiled since (`compile_repeated_blocks` after `apply`) below
        its hooks; where the whole transformer was compiled in place (`transformer.compile()`), its blocks'
        bodies get its settings (its graph breaks at the plan's block hooks, which would otherwise run the
        bodies eagerly). `breaks`: something in the bodies breaks a graph, so they compile in pieces.
        Returns whether any block is compiled."""
        whole = transformer.__dict__.get("_compiled_call_impl")
        for block in blocks:
            own = block.__dict__.get("_compiled_call_impl")
            if (own is None and whole is None) or block in self._moved or not hasattr(block, "_diffusers_hook"):
                continue
            body = body_of(block)
            self._moved[block] = (own, body)
            block._compiled_call_impl = None
            set_body(block, _recompile(own or whole, body, breaks))
        return bool(self._moved)

    def restore(self) -> None:
        for block, (own, body) in self._moved.items():
            set_body(block, body)
            block._compiled_call_impl = own
        self._moved.clear()
