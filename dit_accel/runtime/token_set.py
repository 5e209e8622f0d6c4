"""Stage 2: the blocks compute only the call's `TokenSelection`, and a step cache around them still sees
full-length tensors.

Without a step cache the image tokens are gathered before the first block and scattered after the
last one the call runs (skip-layer guidance's call skips some), so nothing is copied in between. A
module that a step cache wraps (a foreign diffusers hook with its own `new_forward`: FirstBlockCache
and MagCache on blocks, TaylorSeer and PAB on attention modules) is a *boundary*: there the tokens
are scattered to full length before the cache stores or compares them and gathered again after it,
and the tokens not computed carry what they had at that boundary the last time they were computed (a
block's residual, an attention module's output; a per-branch buffer freed at the end of the run). A
step cache therefore never compares or forecasts tensors of two different token subsets; tokens not
recomputed simply do not change. Buffers are per branch (the step context's `slot`), so a call whose
batch differs from the step's others (skip-layer guidance: B beside 2B) keeps its own.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers.hooks import ModelHook

from ..tokens import gather_tokens, scatter_tokens
from .call_state import CallState
from .estimate import CallShapes
from .hooks import BlockHook
from .session_view import SessionView


def image_part(output: Any, layout: str, text_tokens: int) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The image tokens of an attention module's output, and how to put new ones in their place.

    Joint-attention modules return (image, text) tuples; single-stream ones one tensor laid out as
    their q/k/v sequence (`layout`).
    """
    if isinstance(output, tuple):
        return output[0], lambda image: (image,) + tuple(output[1:])
    if layout == "text_image":
        return output[:, text_tokens:], lambda image: torch.cat([output[:, :text_tokens], image], 1)
    if layout == "image_text":
        cut = output.shape[1] - text_tokens
        return output[:, :cut], lambda image: torch.cat([image, output[:, cut:]], 1)
    return output, lambda image: image


class _GatherOutputHook(ModelHook):
    """Outside a step cache on an attention module: back from full length to the tokens computed."""

    def __init__(self, token_set: "TokenSetStage", layout: str):
        super().__init__()
        self.token_set, self.layout = token_set, layout

    @torch.compiler.disable
    def post_forward(self, module, output):
        call_state = self.token_set.session.call_state
        if call_state is None or call_state.tokens is None:
            return output
        image, rebuild = image_part(output, self.layout, call_state.text_tokens)
        return rebuild(gather_tokens(image, call_state.tokens.index))


class TokenSetStage:
    """Gather/scatter hooks of one session; boundaries where a step cache looks."""

    def __init__(self, session: SessionView, cached_blocks: set[int], cached_attentions: dict[Any, str]):
        self.session = session
        self.adapter = session.adapter
        self.cached_blocks = cached_blocks
        #: attention module -> its q/k/v layout, for the attentions a step cache wraps
        self.cached_attentions = cached_attentions
        #: blocks a call skips (skip-layer guidance) -> the blocks after which it scatters to full length
        self._scatter_after: dict[frozenset[int], frozenset[int]] = {}
        #: per (branch, boundary): full-length image tokens the last time each token was computed there
        self._stale: dict[tuple, torch.Tensor] = {}
        #: the latest full-length image hidden state of this call, and whether the blocks now hold a subset
        self._full: torch.Tensor | None = None
        self._gathered = False
        #: the image hidden state entering the running block (gathered when a subset is computed)
        self._block_input: torch.Tensor | None = None

    def attach(self) -> None:
        for i, block in enumerate(self.adapter.blocks()):
            self.session.hooks.add(block, BlockHook(self, i), f"token_set.{i}", innermost=True)
        for attention, layout in self.cached_attentions.items():
            self.session.hooks.add(attention, _GatherOutputHook(self, layout), "token_set.gather_output")

    def reset_call(self) -> None:
        """Before and after every call: no hidden state of a call survives it."""
        self._full, self._gathered, self._block_input = None, False, None

    def end_run(self) -> None:
        self._stale.clear()

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._stale.values())

    def estimate_bytes(self, shapes: CallShapes) -> dict[str, int]:
        """The full-length residuals (blocks) and outputs (attention modules) kept where a step cache looks."""
        boundaries = len(self.cached_blocks) + len(self.cached_attentions)
        held = boundaries * shapes.samples * shapes.tokens * shapes.hidden * shapes.itemsize
        return {"boundary_residuals": held} if held else {}

    def _scatters_after(self, skipped: frozenset[int]) -> frozenset[int]:
        """The blocks of a call that skips `skipped` after which the tokens go back to full length: a
        cached block, the block before one, and the last block that runs."""
        if skipped not in self._scatter_after:
            running = [i for i in range(len(self.adapter.blocks())) if i not in skipped]
            following = dict(zip(running, running[1:] + [None]))
            self._scatter_after[skipped] = frozenset(
                i for i, after in following.items()
                if i in self.cached_blocks or after in self.cached_blocks or after is None)
        return self._scatter_after[skipped]

    # -- blocks --------------------------------------------------------------------------------------
    def enter_block(self, index: int, block, args: tuple, kwargs: dict):
        call_state = self.session.call_state
        if call_state is None:
            return args, kwargs
        tokens = call_state.tokens
        adapter = self.adapter
        hidden_arg = adapter.block_signature(block).hidden_arg
        if tokens is None:
            call_state.image_tokens = call_state.grid.num_tokens
            if index in self.cached_blocks:
                self._block_input = adapter.bind(block, args, kwargs)[hidden_arg]
            return args, kwargs
        bound = adapter.bind(block, args, kwargs)
        rows = tokens.index.shape[0] if tokens.index.ndim == 2 else None
        if rows is not None and bound[hidden_arg].shape[0] != rows:
            raise RuntimeError(f"block {index} runs a batch of {bound[hidden_arg].shape[0]}, the call had {rows}: "
                               "something around the blocks split the batch (FasterCache?), which stage 2 cannot follow")
        if not self._gathered:
            self._full = bound[hidden_arg]
        bound = adapter.gather_block_inputs(block, bound, tokens.index, call_state.text_tokens,
                                            gather_hidden=not self._gathered)
        self._block_input = bound[hidden_arg]
        self._gathered = True
        call_state.image_tokens = tokens.count
        return adapter.unbind(block, bound)

    def leave_block(self, index: int, block, output):
        """Full length where a step cache looks: a cached block's tokens not computed keep the residual
        they had there last time; before another cached block (or after the last that runs) they pass unchanged."""
        call_state = self.session.call_state
        if call_state is None or index not in self._scatters_after(call_state.ctx.call.skipped_blocks):
            return output
        hidden = self.adapter.block_hidden_output(block, output)
        key = (call_state.ctx.slot, "block", index)
        cached = index in self.cached_blocks
        if call_state.tokens is None:
            if cached:
                self._stale[key] = hidden - self._block_input
            return output
        if cached:
            residual = hidden - self._block_input
            stale = self._stale.get(key)
            if stale is None:
                stale = residual.new_zeros(self._full.shape)
            self._stale[key] = stale = scatter_tokens(stale, call_state.tokens.index, residual)
            full = self._full + stale
        else:
            full = scatter_tokens(self._full, call_state.tokens.index, hidden)
        self._full, self._gathered, self._block_input = full, False, None
        return self.adapter.replace_block_hidden_output(block, output, full)

    # -- attention modules a step cache wraps ----------------------------------------------------------
    def scatter_attention_output(self, call_state: CallState, attention, output):
        """Inside the step cache: the attention output at full length, stale where not computed."""
        layout = self.cached_attentions[attention]
        image, rebuild = image_part(output, layout, call_state.text_tokens)
        key = (call_state.ctx.slot, "attention", id(attention))
        if call_state.tokens is None:
            self._stale[key] = image
            return output
        stale = self._stale.get(key)
        if stale is None:
            stale = image.new_zeros((image.shape[0], call_state.grid.num_tokens, *image.shape[2:]))
        full = scatter_tokens(stale, call_state.tokens.index, image)
        self._stale[key] = full
        return rebuild(full)
