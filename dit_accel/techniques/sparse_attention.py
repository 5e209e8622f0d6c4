"""What the stage-6 sparse attentions (SVG2, proxy) share: when to stay dense, and what was computed.

Both run dense for the first `dense_warmup` of the steps and the first `dense_first_blocks` of the
blocks (the fractions of the official SVG2 scripts), for attentions they cannot make sparse (a mask
per query, causal, grouped heads), where `sparse` declines, and where their plan cannot save: before
any planning work, `why_no_saving` judges from the shapes, the grid, the config and the step count
alone (no host sync) whether the plan can save (not with too few tokens to pay for the planning, nor
at a density near 1); such a layer runs dense at no overhead, unless the config's `plan_every_layer`
asks for the real path everywhere (what `keep_all()` runs). Each call counts, per block, the (query,
key) pairs computed against the dense ones: `attention_density` in `report()`, with its
`attention_density_by_block` for the UI, and the attentions that ran dense and why (`dense_layers`).
A kernel whose pair count depends on data (SVG2's) hands it over as a device scalar: it is summed on
the device and read to the host with the rest of the ledger when `report()` is made, not per call.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

import torch

from ..attention.intercept import AttentionCall, dense_attention, mask_bias, per_key
from ..runtime.call_state import CallState
from ..runtime.stats import Stat, StatKind
from ..runtime.technique import Technique

#: a target density (top-p, a kept ratio) from which a layer cannot save enough to pay for its planning
DENSE_ABOVE = 0.95
#: the least share of a layer's dense attention (pairs, or time where a kernel measures it) a plan must
#: save to run sparse
MIN_SAVING = 0.1


def per_key_bias(bias: torch.Tensor | None, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Stage 5's log-count bias and a per-key mask (text padding) as one (B|1, H|1, 1, K) logit bias."""
    if mask is not None:
        mask = mask_bias(mask, torch.float32)
        mask = mask.view(*[1] * (4 - mask.ndim), *mask.shape)
    total = mask if bias is None else (bias.float() if mask is None else bias.float() + mask)
    return None if total is None else total.to(dtype)


class SparseAttention(Technique):
    """Base of the stage-6 techniques: subclasses implement `why_no_saving` and `sparse`."""

    stats = (Stat("attention_density", StatKind.VALUE),
             Stat("attention_density_by_block", StatKind.BLOCK_FRACTION, "attention density", listed=True),
             Stat("dense_layers", StatKind.DETAIL))

    def __init__(self, config, session):
        super().__init__(config, session)
        self._dense_blocks = math.floor(config.dense_first_blocks * len(self.adapter.blocks()))
        #: per block this call: [pairs computed (a number, or a device scalar), dense pairs]
        self._pairs: dict[int, list] = defaultdict(lambda: [0.0, 0.0])
        #: attentions of this call that ran dense, by reason
        self._dense_layers: Counter[str] = Counter()
        #: per attention shape (and step count): why its plan cannot save, None where it can
        self._verdicts: dict[tuple, str | None] = {}
        #: the device of the attention running now
        self.device = torch.device("cpu")

    def begin_call(self, call_state: CallState) -> None:
        self._pairs = defaultdict(lambda: [0.0, 0.0])
        self._dense_layers = Counter()

    def sparse_steps(self, call_state: CallState) -> int | None:
        """Steps of the run after the dense warm-up (None: the run's length is unknown)."""
        steps = call_state.ctx.num_steps
        return None if steps is None else max(1, steps - math.floor(self.config.dense_warmup * steps))

    def _why_dense(self, call_state: CallState, call: AttentionCall, query: torch.Tensor, key: torch.Tensor,
                   mask: torch.Tensor | None, sdpa_kwargs: dict) -> str | None:
        """Why this attention runs dense (None: it runs sparse), from shapes and the step alone."""
        if sdpa_kwargs.get("is_causal") or sdpa_kwargs.get("dropout_p") or key.shape[1] != query.shape[1] or \
                not per_key(mask):
            return "mask per query, causal or grouped heads"
        steps = call_state.ctx.num_steps
        if steps is not None and call_state.ctx.step_index < math.floor(self.config.dense_warmup * steps):
            return "warm-up step"
        if call.block_index < self._dense_blocks:
            return "first blocks"
        if self.config.plan_every_layer:
            return None
        # block parity: proxy attention shifts its windows on odd blocks
        shape = (call.layout, call.text_tokens, query.shape[2], key.shape[2], query.shape[-1], call_state.grid, steps,
                 call.block_index % 2)
        if shape not in self._verdicts:
            self._verdicts[shape] = self.why_no_saving(call_state, call, query.shape[2], key.shape[2])
        return self._verdicts[shape]

    def why_no_saving(self, call_state: CallState, call: AttentionCall, queries: int, keys: int) -> str | None:
        """Why an attention of `queries` x `keys` tokens cannot save (None: it can), from the shapes,
        the grid and the step count alone, before any planning work."""
        raise NotImplementedError

    def sparse(self, call_state: CallState, call: AttentionCall, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, key_bias: torch.Tensor | None, scale: float | None
               ) -> tuple[torch.Tensor, float | torch.Tensor] | str | None:
        """(output, pairs computed per sample and head: a number or a device scalar), or why this
        attention runs dense (None: its tokens cannot be placed)."""
        raise NotImplementedError

    def attend(self, call_state, call, query, key, value, bias, **sdpa_kwargs):
        mask = sdpa_kwargs.pop("attn_mask", None)
        self.device = query.device
        dense_pairs = query.shape[2] * key.shape[2]
        counts = self._pairs[call.block_index]
        counts[1] += dense_pairs
        reason = self._why_dense(call_state, call, query, key, mask, sdpa_kwargs)
        if reason is None:
            # in fp32: a bf16 log-count bias is off by up to 1/32 (kernels take fp32 biases whatever the inputs)
            result = self.sparse(call_state, call, query, key, value, per_key_bias(bias, mask, torch.float32),
                                 sdpa_kwargs.get("scale"))
            if isinstance(result, tuple):
                counts[0] += result[1]
                return result[0], result[1].round() if isinstance(result[1], torch.Tensor) else round(result[1])
            reason = result or "tokens not placed on the grid"
        self._dense_layers[reason] += 1
        counts[0] += dense_pairs
        return dense_attention(query, key, value, bias, attn_mask=mask, **sdpa_kwargs), dense_pairs

    def call_stats(self, call_state: CallState) -> dict[str, Any]:
        computed = sum(c for c, _ in self._pairs.values())
        dense = sum(d for _, d in self._pairs.values())
        return {"attention_density": computed / dense if dense else 1.0,
                "attention_density_by_block": {b: c / d for b, (c, d) in sorted(self._pairs.items()) if d},
                "dense_layers": dict(self._dense_layers)}
