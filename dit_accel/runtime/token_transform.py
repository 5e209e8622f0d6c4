"""Stage 3: blocks that run on pooled image tokens, each block on its own.

At the entry of a block that its technique pools (`Technique.token_groups`), the image tokens it
would see (all of them, or stage 2's subset) are averaged into groups, with their rotary positions and
masks (`ModelAdapter.pool_block_inputs`); the block runs on the groups (text tokens as they are);
at its exit every token gets its group's change added back, dense + up(out_pooled - in_pooled).
The mean of an upsampled change is that change, so pooling block by block follows the trajectory
of pooling once over a whole block range, and outside every block the tensors keep their full
length: step caches on blocks and stage 2 see what they would see without stage 3. A step cache
inside a pooled block (on its attention or MLP) would store outputs whose length changes with the
density; the session refuses it.
"""

from __future__ import annotations

import torch

from ..tokens import gather_tokens
from .hooks import BlockHook
from .session_view import SessionView
from .technique import Technique


class TokenTransformStage:
    """Pool/unpool hooks of one session, innermost on every block (inside stage 2's gather)."""

    def __init__(self, session: SessionView, technique: Technique):
        self.session, self.technique, self.adapter = session, technique, session.adapter
        self.pooled_blocks = technique.transformed_blocks()
        #: (groups, dense image tokens, pooled image tokens) at the entry of the pooled block running now
        self._entry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def attach(self) -> None:
        # on every block: the ledger's token count goes back to dense at the entry of each other block
        for i, block in enumerate(self.adapter.blocks()):
            self.session.hooks.add(block, BlockHook(self, i), f"token_transform.{i}", innermost=True)

    def reset_call(self) -> None:
        self._entry = None

    def enter_block(self, index: int, block, args: tuple, kwargs: dict):
        call_state = self.session.call_state
        if call_state is None:
            return args, kwargs
        call_state.image_tokens = call_state.grid.num_tokens if call_state.tokens is None else call_state.tokens.count
        if index not in self.pooled_blocks:
            return args, kwargs
        adapter = self.adapter
        hidden_arg = adapter.block_signature(block).hidden_arg
        bound = adapter.bind(block, args, kwargs)
        dense = bound[hidden_arg]
        groups = self.technique.token_groups(call_state, index, dense.shape[1])
        if groups is None:
            return args, kwargs
        ids, count = groups
        bound = adapter.pool_block_inputs(block, bound, ids, count, call_state.text_tokens)
        self._entry = (ids, dense, bound[hidden_arg])
        call_state.image_tokens = count
        call_state.record_overhead(f"{self.technique.config.name} token pooling", float(dense.numel()), dense.shape[1])
        return adapter.unbind(block, bound)

    def leave_block(self, index: int, block, output):
        call_state, entry = self.session.call_state, self._entry
        if call_state is None or entry is None:
            return output
        self._entry = None
        ids, dense, pooled = entry
        change = self.adapter.block_hidden_output(block, output) - pooled
        call_state.record_overhead(f"{self.technique.config.name} token unpooling", float(pooled.numel() + dense.numel()),
                             dense.shape[1])
        return self.adapter.replace_block_hidden_output(block, output, dense + gather_tokens(change, ids))
