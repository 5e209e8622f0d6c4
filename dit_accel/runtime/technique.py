"""The base class of every technique: one method per stage it can take part in.

The session calls a technique only for the stages its config occupies, in stage order, whatever the
order the configs were given in. Everything a technique remembers between calls is freed in
`end_run` (the pipeline call is over) and when the handle is removed.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention.intercept import AttentionCall
from ..config import Stage
from .call_state import CallState
from .estimate import CallShapes
from .session_view import SessionView
from .stats import Stat, StatKind
from .training import Trainable, TrainingSettings


class Technique:
    """One technique bound to one transformer. Override what its stages need."""

    #: stage 0: rewrites what the pipeline's scheduler sets up (`timesteps_arguments`), so needs a pipeline
    rewrites_schedule: bool = False
    #: whether the technique still works, without its stage 5, where attention never reaches torch's SDPA
    kv_source_optional: bool = False
    #: the keys `call_stats` returns, and how the tools show each (`runtime/stats.py`)
    stats: tuple[Stat, ...] = ()
    #: what `dit_accel.finetune` trains of it, in words (None: nothing; `start_training`)
    trains: str | None = None

    @property
    def picture_stats(self) -> frozenset[str]:
        """The keys of per-call pictures (token sets, label maps): kept only where details are asked for
        (`apply(..., details=True)`, the UI), and worth building only then (`session.details`)."""
        return frozenset(stat.key for stat in self.stats if stat.kind in (StatKind.TOKEN_SET, StatKind.TOKEN_LABELS))

    def __init__(self, config: Any, session: SessionView):
        self.config = config
        self.session = session
        self.adapter = session.adapter
        self.stages: frozenset[Stage] = frozenset()

    @property
    def label(self) -> str:
        return type(self.config).__name__

    def check_plan(self) -> None:
        """Refuse (`ConfigError`) the plan around this technique before anything is attached; also run for
        a step cache that `enable_cache` adds to an applied plan."""

    def timesteps_arguments(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """Stage 0: the arguments of the pipeline scheduler's `set_timesteps` (by name), rewritten."""
        return arguments

    def attach(self) -> None:
        """Add the technique's own hooks (the session adds the stage hooks)."""

    def detach(self) -> None:
        """Take off whatever `attach` added outside `self.session.hooks`."""

    def begin_call(self, call_state: CallState) -> None:
        """Before the blocks run: stage 2 sets `call_state.tokens` here."""

    def end_call(self, call_state: CallState, output: torch.Tensor) -> torch.Tensor:
        """After the blocks ran; may replace the model output (same shape)."""
        return output

    def end_run(self) -> None:
        """The pipeline call is over: drop every tensor kept between calls."""

    def transformed_blocks(self) -> frozenset[int]:
        """Stage 3: the blocks `token_groups` may pool (the session refuses a step cache inside them)."""
        raise NotImplementedError

    def token_groups(self, call_state: CallState, block_index: int, tokens: int) -> tuple[torch.Tensor, int] | None:
        """Stage 3: how the `tokens` image tokens entering the block (all, or stage 2's subset) are
        pooled: (every token's group, (n,) shared or (B, n) per sample like `call_state.tokens.index`; the
        number of groups M), or None to run the block on every token. The runtime pools the tokens and,
        through the adapter, their positions and masks, runs the block, and adds each group's change
        back to its tokens."""
        raise NotImplementedError

    def kv_source(self, call_state: CallState, call: AttentionCall, query: torch.Tensor, key: torch.Tensor,
                  value: torch.Tensor, attn_mask: torch.Tensor | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Stage 5: (key, value, per-key log-count bias or None, attention mask) the kernel attends to."""
        raise NotImplementedError

    def attend(self, call_state: CallState, call: AttentionCall, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, bias: torch.Tensor | None, **sdpa_kwargs) -> tuple[torch.Tensor, int]:
        """Stage 6: (the attention output, (query, key) pairs attended per head and sample); the
        runtime records the pairs, the kernel records its own overhead (`call_state.record_overhead`)."""
        raise NotImplementedError

    def state_bytes(self) -> int:
        """Bytes of tensors held between calls right now (K/V caches, previous outputs)."""
        return 0

    def estimate_bytes(self, shapes: CallShapes) -> dict[str, int]:
        """Before any call: the most bytes `state_bytes` will reach in a run at `shapes`, by kind ("kv_cache",
        "outputs", "slice_copies", "token_cache", ...; a kind ending in "@host" sits in host memory),
        from the adapter and the shapes alone."""
        return {}

    def breaks_block_graph(self) -> bool:
        """Whether a hook of the technique inside a block's body breaks a compiled block's graph (its bodies
        then compile in pieces, and `report()` says so)."""
        return False

    def smaller_forms(self) -> list[str]:
        """Config changes that shrink what `estimate_bytes` counts (for the message when a plan will not fit)."""
        return []

    def start_training(self, settings: TrainingSettings) -> Trainable:
        """Fine-tuning (`trains` is set): make the trainable part and run the calls through it from now on."""
        raise NotImplementedError

    def call_stats(self, call_state: CallState) -> dict[str, Any]:
        """Per-call numbers for `report()` (e.g. tokens computed), under the keys `stats` declares."""
        return {}
