"""Run the blocks on a subset of the image tokens: gather before the first block, scatter after the last.

Techniques that compute fewer tokens (RAS) choose an index per call; these hooks do the rest
through the adapter: the image-token argument of the first block is gathered, every block gets the
matching rows of its rotary table (and attention mask), and the last block's image tokens are
scattered back into a full-length tensor so the transformer's output layers see the usual shape.
"""

from __future__ import annotations

from typing import Callable

import torch
from diffusers.hooks import ModelHook

from ..models.base import scatter_tokens
from .context import StepContext
from .session import Session

IndexFn = Callable[[StepContext], "torch.Tensor | None"]


class _GatherHook(ModelHook):
    def __init__(self, subset: "TokenSubset", block, first: bool, last: bool):
        super().__init__()
        self.subset, self.block, self.first, self.last = subset, block, first, last

    def pre_forward(self, module, *args, **kwargs):
        index = self.subset.active_index
        if index is None:
            return args, kwargs
        adapter = self.subset.session.adapter
        bound = adapter.bind(module, args, kwargs)
        if self.first:
            self.subset.full_hidden = bound[adapter.block_signature(module).hidden_arg]
        text_tokens = self.subset.session.context.call.text_tokens
        bound = adapter.gather_block_inputs(module, bound, index, text_tokens, gather_hidden=self.first)
        return adapter.unbind(module, bound)

    def post_forward(self, module, output):
        index = self.subset.active_index
        if index is None or not self.last:
            return output
        adapter = self.subset.session.adapter
        hidden = adapter.block_hidden_output(module, output)
        full = scatter_tokens(self.subset.full_hidden, index, hidden)
        self.subset.full_hidden = None
        return adapter.replace_block_hidden_output(module, output, full)


class TokenSubset:
    """Block hooks that make the blocks see only `index_fn(ctx)` image tokens (None: all tokens)."""

    def __init__(self, session: Session, name: str, index_fn: IndexFn):
        self.session, self.name, self.index_fn = session, name, index_fn
        self.active_index: torch.Tensor | None = None
        self.full_hidden: torch.Tensor | None = None

    def attach(self) -> None:
        blocks = self.session.adapter.blocks()
        for i, block in enumerate(blocks):
            hook = _GatherHook(self, block, first=i == 0, last=i == len(blocks) - 1)
            self.session.hooks.add(block, hook, f"{self.name}.gather.{i}")

    def begin_call(self, ctx: StepContext) -> None:
        index = self.index_fn(ctx)
        if index is not None and index.ndim == 2 and not self.session.adapter.per_sample_positions:
            raise ValueError(f"{self.session.adapter.family} needs one token subset shared by the batch")
        self.active_index = index

    def end_call(self) -> None:
        self.active_index = None
        self.full_hidden = None
