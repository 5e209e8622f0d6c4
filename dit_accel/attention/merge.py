"""Partial attentions and their exact log-sum-exp merge.

Proxy attention's `torch` window kernel splits each query's keys into an exact local window and one
pooled proxy per other window. Each part is an attention over its own keys that also returns, per
query, the log-sum-exp of its logits; two parts merge exactly:
out = (e^{lse_a} out_a + e^{lse_b} out_b) / (e^{lse_a} + e^{lse_b}). `attention_with_lse` is the plain
reference (materialised fp32 logits); the fused implementations are in `kernels/dense.py`.
"""

from __future__ import annotations

import torch


def attention_with_lse(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None, scale: float | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, Q, D), lse (B, H, Q)); `bias` adds to the logits (a pooled key's log count),
    `mask` (bool, True = attend) removes keys. A query with no key left gets lse -inf and output 0."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    logits = (query @ key.transpose(-1, -2)).float() * scale
    if bias is not None:
        logits = logits + bias.float()
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse.unsqueeze(-1).clamp(min=torch.finfo(torch.float32).min))
    weights = torch.nan_to_num(weights, nan=0.0)
    return (weights.to(value.dtype) @ value), lse


def merge(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention over the union of two disjoint key sets, from the two partial attentions."""
    lse = torch.logaddexp(lse_a, lse_b)
    # out_a + (out_b - out_a) * share of b; a part without keys (lse -inf) has share 0
    share = torch.sigmoid(lse_b - lse_a).nan_to_num(0.0).unsqueeze(-1)
    out = torch.lerp(out_a.float(), out_b.float(), share) if out_a.dtype != torch.float32 else \
        torch.lerp(out_a, out_b, share)
    return out.to(out_a.dtype), lse
