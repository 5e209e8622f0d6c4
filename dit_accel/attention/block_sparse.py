"""Block-sparse attention over variable-size blocks of permuted tokens.

After a permutation that makes every cluster contiguous (`kmeans.cluster_permutation`), a plan keeps
some (query cluster, key cluster) pairs: `keep` (G, QC, KC), G = batch * heads. Each query then
attends only to the keys of the clusters its own cluster keeps (every query cluster keeps at least
one key cluster). `reference` builds the token-level mask and runs masked attention (the plain
implementation tests compare against); `gathered` runs each query cluster against exactly the keys
it keeps, so the work done is the kept pairs, and `padded` runs them all as one batched SDPA with
the padding masked. All take the per-key log-count bias of stage 5, broadcastable to (G, 1, K), and
optionally a stand-in key per key cluster (its mean key and value, biased by log(size)) that the
query clusters attend to in place of the clusters they skip, so skipped mass is approximated
rather than dropped (as proxy attention does for windows).
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


#: a stand-in for every key cluster: (keys (G, KC, D), values (G, KC, Dv), log-size bias (G, KC))
StandIns = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_offsets: torch.Tensor,
              k_offsets: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None,
              scale: float | None = None, stand_ins: StandIns | None = None) -> torch.Tensor:
    """(G, Q, D) masked dense attention of permuted (G, S, D) tokens; with `stand_ins`, every query
    also attends to the stand-in of each key cluster its cluster does not keep."""
    q_len, k_len = query.shape[1], key.shape[1]
    mask = token_mask(q_offsets, k_offsets, keep, q_len, k_len)
    bias = torch.zeros(1, 1, k_len) if bias is None else bias.float()
    if stand_ins is not None:
        skipped = ~keep.gather(1, _token_clusters(q_offsets, q_len).unsqueeze(-1).expand(-1, -1, keep.shape[-1]))
        key, value = torch.cat([key, stand_ins[0]], 1), torch.cat([value, stand_ins[1]], 1)
        mask = torch.cat([mask, skipped], -1)
        bias = torch.cat([bias.expand(key.shape[0], 1, -1), stand_ins[2].unsqueeze(1).float()], -1)
    return attention_with_lse(query, key, value, bias, mask, scale)[0]


def _kept_keys(keep: torch.Tensor, k_offsets: torch.Tensor, k_len: int) -> torch.Tensor:
    """(G, QC, K) which permuted keys each query cluster keeps."""
    k_cluster = _token_clusters(k_offsets, k_len)
    return keep.gather(2, k_cluster.unsqueeze(1).expand(-1, keep.shape[1], -1))


def padded_work(q_offsets: torch.Tensor, k_offsets: torch.Tensor, keep: torch.Tensor) -> tuple[int, int]:
    """(pairs `padded` computes, pairs kept) per group: padding every query cluster to the largest
    and every key set to the longest; `sparse` picks the kernel by their ratio."""
    q_sizes = q_offsets.diff(dim=-1)
    kept = (keep.long() * k_offsets.diff(dim=-1).unsqueeze(1)).sum(-1)  # (G, QC) keys kept
    return int(q_sizes.max()) * int(kept.max()) * keep.shape[1], int(pairs(q_offsets, k_offsets, keep).max())


def gathered(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_offsets: torch.Tensor,
             k_offsets: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None,
             scale: float | None = None, stand_ins: StandIns | None = None) -> torch.Tensor:
    """The same as `reference`, computing only each query cluster against the keys it keeps: one
    unmasked SDPA per (group, query cluster) on exactly those keys (plus its stand-ins), so the work
    done is the kept pairs, at one Python step per cluster."""
    groups, q_len, _ = query.shape
    kept_keys = _kept_keys(keep, k_offsets, key.shape[1])
    out = query.new_empty(groups, q_len, value.shape[-1])
    starts, stops = q_offsets[:, :-1].tolist(), q_offsets[:, 1:].tolist()
    for g in range(groups):
        for cluster, (start, stop) in enumerate(zip(starts[g], stops[g])):
            if start == stop:
                continue
            index = kept_keys[g, cluster].nonzero().squeeze(-1)
            keys, values = key[g, index], value[g, index]
            mask = None if bias is None else bias[g % bias.shape[0], :, index]
            if stand_ins is not None:
                skipped = (~keep[g, cluster]).nonzero().squeeze(-1)
                keys, values = torch.cat([keys, stand_ins[0][g, skipped]]), torch.cat([values, stand_ins[1][g, skipped]])
                mask = torch.cat([torch.zeros(1, index.shape[0], dtype=query.dtype) if mask is None else mask,
                                  stand_ins[2][g, skipped].unsqueeze(0).to(query.dtype)], -1)
            four_d = lambda x: x[None, None]  # noqa: E731  (3-D inputs send SDPA down its math path)
            out[g, start:stop] = dense_attention(four_d(query[g, start:stop]), four_d(keys), four_d(values),
                                                 mask if mask is None else four_d(mask), scale=scale)[0, 0]
    return out


def padded(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, q_offsets: torch.Tensor,
           k_offsets: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor | None = None,
           scale: float | None = None, stand_ins: StandIns | None = None) -> torch.Tensor:
    """The same as `reference` as one batched SDPA over (group, query cluster): every cluster padded
    to the largest, every kept key set to the longest (padding masked). No Python loop; the padding
    is computed too, so it pays when clusters are of similar size (`padded_work`)."""
    groups, q_len, dim = query.shape
    clusters = keep.shape[1]
    kept_keys = _kept_keys(keep, k_offsets, key.shape[1])
    counts = kept_keys.sum(-1)  # (G, QC)
    width = int(counts.max())
    index = (~kept_keys).to(torch.int8).argsort(dim=-1, stable=True)[..., :width]  # kept keys first
    present = torch.arange(width, device=key.device) < counts.unsqueeze(-1)  # (G, QC, width)
    spread = lambda x: x.gather(1, index.reshape(groups, -1, 1).expand(-1, -1, x.shape[-1])).view(  # noqa: E731
        groups, clusters, width, x.shape[-1])
    keys, values = spread(key), spread(value)
    mask = torch.zeros(present.shape, dtype=query.dtype, device=key.device).masked_fill(~present, -torch.inf)
    if bias is not None:
        mask = mask + bias.to(query.dtype).expand(groups, 1, -1).gather(2, index.reshape(groups, 1, -1)).view(
            groups, clusters, width)
    if stand_ins is not None:
        keys = torch.cat([keys, stand_ins[0].unsqueeze(1).expand(-1, clusters, -1, -1)], 2)
        values = torch.cat([values, stand_ins[1].unsqueeze(1).expand(-1, clusters, -1, -1)], 2)
        far = stand_ins[2].unsqueeze(1).to(query.dtype).masked_fill(keep, -torch.inf)
        mask = torch.cat([mask, far], -1)
    q_sizes = q_offsets.diff(dim=-1)
    rows = int(q_sizes.max())
    cluster_of = _token_clusters(q_offsets, q_len)
    slot = cluster_of * rows + torch.arange(q_len, device=query.device) - q_offsets.gather(1, cluster_of)
    queries = query.new_zeros(groups, clusters * rows, dim).scatter_(1, slot.unsqueeze(-1).expand(-1, -1, dim), query)
    out = dense_attention(queries.view(groups, clusters, rows, dim), keys, values, mask.unsqueeze(2), scale=scale)
    return out.view(groups, clusters * rows, -1).gather(1, slot.unsqueeze(-1).expand(-1, -1, out.shape[-1]))
