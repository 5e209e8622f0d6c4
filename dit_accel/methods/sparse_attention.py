"""What the stage-6 sparse attentions (SVG2, proxy) share: when to stay dense, and what was computed.

Both run dense for the first `dense_warmup` of the steps and the first `dense_first_blocks` of the
blocks (the fractions of the official SVG2 scripts), for attentions they cannot make sparse (a mask
per query, causal, grouped heads) and where `sparse` declines. Each call counts, per block, the
(query, key) pairs computed against the dense ones: `attention_density` in `report()`, with its
`attention_density_by_block` for the UI.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch

from ..attention.intercept import AttentionCall, dense_attention, mask_bias, per_key
from ..runtime.plan import CallPlan
from ..runtime.technique import Technique


def per_key_bias(bias: torch.Tensor | None, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Stage 5's log-count bias and a per-key mask (text padding) as one (B|1, H|1, 1, K) logit bias."""
    if mask is not None:
        mask = mask_bias(mask, torch.float32)
        mask = mask.view(*[1] * (4 - mask.ndim), *mask.shape)
    total = mask if bias is None else (bias.float() if mask is None else bias.float() + mask)
    return None if total is None else total.to(dtype)


class SparseAttention(Technique):
    """Base of the stage-6 techniques: subclasses implement `sparse`."""

    def __init__(self, config, session):
        super().__init__(config, session)
        self._dense_blocks = math.floor(config.dense_first_blocks * len(self.adapter.blocks()))
        #: per block this call: [pairs computed, dense pairs]
        self._pairs: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])

    def begin_call(self, plan: CallPlan) -> None:
        self._pairs = defaultdict(lambda: [0.0, 0.0])

    def dense_here(self, plan: CallPlan, call: AttentionCall) -> bool:
        steps = plan.ctx.num_steps
        warmup = math.floor(self.config.dense_warmup * steps) if steps is not None else 0
        return plan.ctx.step_index < warmup or call.block_index < self._dense_blocks

    def sparse(self, plan: CallPlan, call: AttentionCall, query: torch.Tensor, key: torch.Tensor,
               value: torch.Tensor, key_bias: torch.Tensor | None, scale: float | None
               ) -> tuple[torch.Tensor, float] | None:
        """(output, pairs computed per sample and head), or None to run this attention dense."""
        raise NotImplementedError

    def attend(self, plan, call, query, key, value, bias, **sdpa_kwargs):
        mask = sdpa_kwargs.pop("attn_mask", None)
        simple = not sdpa_kwargs.get("is_causal") and not sdpa_kwargs.get("dropout_p") and \
            key.shape[1] == query.shape[1]
        dense_pairs = query.shape[2] * key.shape[2]
        counts = self._pairs[call.block_index]
        counts[1] += dense_pairs
        if per_key(mask) and simple and not self.dense_here(plan, call):
            result = self.sparse(plan, call, query, key, value, per_key_bias(bias, mask, query.dtype),
                                 sdpa_kwargs.get("scale"))
            if result is not None:
                counts[0] += result[1]
                return result[0], round(result[1])
        counts[0] += dense_pairs
        return dense_attention(query, key, value, bias, attn_mask=mask, **sdpa_kwargs), dense_pairs

    def call_stats(self, plan: CallPlan) -> dict[str, Any]:
        computed = sum(c for c, _ in self._pairs.values())
        dense = sum(d for _, d in self._pairs.values())
        return {"attention_density": computed / dense if dense else 1.0,
                "attention_density_by_block": {b: c / d for b, (c, d) in sorted(self._pairs.items()) if d}}
