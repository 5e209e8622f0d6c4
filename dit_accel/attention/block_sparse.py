"""Block-sparse attention over variable-size blocks of permuted tokens.

After a permutation that makes every cluster contiguous (`kmeans.cluster_permutation`), a plan keeps
some (query cluster, key cluster) pairs: `keep` (G, QC, KC), G = batch * heads. Each query then
attends only to the keys of the clusters its own cluster keeps (every query cluster keeps at least
one key cluster). `reference` builds the token-level
mask and runs masked attention (the plain implementation tests compare against); `gathered` runs
one padded batch of SDPA calls, each query cluster against the keys it keeps, so the work done is
the kept pairs plus padding. Both take the per-key log-count bias of stage 5, broadcastable to
(G, 1, K).
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
              k_offsets: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """(G, Q, D) masked dense attention of permuted (G, S, D) tokens."""
    mask = token_mask(q_offsets, k_offsets, keep, query.shape[1], key.shape[1])
    return attention_with_lse(query, key, value, bias, mask)[0]


def gathered(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_offsets: torch.Tensor,
             k_offsets: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same as `reference`, computing only each query cluster against the keys it keeps (padded)."""
    groups, q_len, dim = query.shape
    k_len = key.shape[1]
    clusters = keep.shape[1]
    k_cluster = _token_clusters(k_offsets, k_len)
    kept_keys = keep.gather(2, k_cluster.unsqueeze(1).expand(-1, clusters, -1))  # (G, QC, K)
    widest = int(kept_keys.sum(-1).max())
    # the kept keys of each query cluster first, in order (a stable sort of "not kept")
    key_index = (~kept_keys).to(torch.int8).argsort(dim=-1, stable=True)[..., :widest]  # (G, QC, L)
    key_valid = kept_keys.gather(2, key_index)
    q_sizes = q_offsets.diff(dim=-1)
    tallest = int(q_sizes.max())
    rows = q_offsets[:, :-1].unsqueeze(-1) + torch.arange(tallest, device=query.device)  # (G, QC, M)
    row_valid = rows < q_offsets[:, 1:].unsqueeze(-1)
    rows = rows.clamp(max=q_len - 1)
    flat_q = rows.reshape(groups, -1)
    q_blocks = query.gather(1, flat_q.unsqueeze(-1).expand(-1, -1, dim)).view(groups * clusters, tallest, dim)
    flat_k = key_index.reshape(groups, -1).unsqueeze(-1)
    k_blocks = key.gather(1, flat_k.expand(-1, -1, dim)).view(groups * clusters, widest, dim)
    v_blocks = value.gather(1, flat_k.expand(-1, -1, value.shape[-1])).view(groups * clusters, widest, -1)
    mask = key_valid.view(groups * clusters, 1, widest)
    if bias is not None:
        bias = bias.expand(groups, 1, k_len).reshape(groups, k_len).gather(1, key_index.reshape(groups, -1))
        bias = bias.view(groups * clusters, 1, widest)
    blocks = dense_attention(q_blocks, k_blocks, v_blocks, bias, attn_mask=mask)  # (G * QC, M, D)
    out = query.new_zeros(groups, q_len, value.shape[-1])
    valid = row_valid.reshape(groups, -1)
    out.view(-1, value.shape[-1]).index_copy_(
        0, (flat_q + torch.arange(groups, device=query.device).unsqueeze(1) * q_len)[valid],
        blocks.view(groups, -1, value.shape[-1])[valid])
    return out
