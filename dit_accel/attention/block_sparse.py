"""Block-sparse attention over variable-size blocks of permuted tokens.

After a permutation that makes every cluster contiguous (`kmeans.cluster_permutation`), a plan keeps
some (query cluster, key cluster) pairs: `keep` (G, QC, KC), G = batch * heads. Each query then
attends only to the keys of the clusters its own cluster keeps (every query cluster keeps at least
one key cluster). `reference` builds the token-level mask and runs masked attention (the plain
implementation tests compare against); `gathered` runs each query cluster against exactly the keys
it keeps, so the work done is the kept pairs. Both take the per-key log-count bias of stage 5,
broadcastable to (G, 1, K).
"""

from __future__ import annotations

import torch

from .intercept import dense_attention
from .merge import attention_with_lse


def _token_clusters(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """(G, S) cluster of every permuted position, from (G, C + 1) offsets."""
    positions = torch.arange(length, device=offsets.device).expand(offsets.shape[0], -1)
    return torch.searchsorted(offsets[:, 1:].contiguous(), positions.contiguous(), right=True)


def token_mask(q_offsets: torch.Tensor, k_offsets: torch.Tensor, keep: torch.Tensor, q_len: int,
               k_len: int) -> torch.Tensor:
    """(G, Q, K) bool: which permuted query attends to which permuted key."""
    q_cluster = _token_clusters(q_offsets, q_len)
    k_cluster = _token_clusters(k_offsets, k_len)
    rows = keep.gather(1, q_cluster.unsqueeze(-1).expand(-1, -1, keep.shape[-1]))  # (G, Q, KC)
    return rows.gather(2, k_cluster.unsqueeze(1).expand(-1, q_len, -1))


def pairs(q_offsets: torch.Tensor, k_offsets: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(G,) attended (query, key) pairs: kept cluster pairs weighted by both cluster sizes."""
    q_sizes = q_offsets.diff(dim=-1).float()
    k_sizes = k_offsets.diff(dim=-1).float()
    return torch.einsum("gi,gij,gj->g", q_sizes, keep.float(), k_sizes).round().long()


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_offsets: torch.Tensor,
              k_offsets: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None,
              scale: float | None = None) -> torch.Tensor:
    """(G, Q, D) masked dense attention of permuted (G, S, D) tokens."""
    mask = token_mask(q_offsets, k_offsets, keep, query.shape[1], key.shape[1])
    return attention_with_lse(query, key, value, bias, mask, scale)[0]


def gathered(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_offsets: torch.Tensor,
             k_offsets: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None,
             scale: float | None = None) -> torch.Tensor:
    """The same as `reference`, computing only each query cluster against the keys it keeps: one
    unmasked SDPA per (group, query cluster) on exactly those keys (a mask would send torch's CPU SDPA
    down its slow path), so the work done is the kept pairs."""
    groups, q_len, _ = query.shape
    k_cluster = _token_clusters(k_offsets, key.shape[1])
    kept_keys = keep.gather(2, k_cluster.unsqueeze(1).expand(-1, keep.shape[1], -1))  # (G, QC, K)
    out = query.new_empty(groups, q_len, value.shape[-1])
    starts, stops = q_offsets[:, :-1].tolist(), q_offsets[:, 1:].tolist()
    for g in range(groups):
        for cluster, (start, stop) in enumerate(zip(starts[g], stops[g])):
            if start == stop:
                continue
            index = kept_keys[g, cluster].nonzero().squeeze(-1)
            mask = None if bias is None else bias[g % bias.shape[0], :, index].unsqueeze(0)
            out[g, start:stop] = dense_attention(query[g, start:stop].unsqueeze(0), key[g, index].unsqueeze(0),
                                                 value[g, index].unsqueeze(0), mask, scale=scale)[0]
    return out
