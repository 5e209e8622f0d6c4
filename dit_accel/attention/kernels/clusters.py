"""Cluster-block-sparse attention, SVG2's kernel kind: a `ClusterPlan` and the kernels that run it.

SVG2 permutes each head's queries and keys so that every k-means cluster is contiguous and keeps some
(query cluster, key cluster) pairs. A `ClusterPlan` holds that decision, on the device: the
permutations, the cluster offsets (text, in joint attention, one more cluster on each side that keeps
and is kept by every cluster), the kept pairs, optionally a stand-in per key cluster (its mean key
and value, biased by log(its size), attended by the query clusters that skip it) and stage 5's
per-key bias. Kernels see one sequence of key *columns*: the permuted keys, then one column per
stand-in (`ClusterPlan.columns`); a query cluster attends the column clusters its plan keeps.

Kernels, chosen once per technique and device (`cluster_kernel`), never per call:

- `reference`: masked dense attention from fp32 logits over every (query, column) pair: the oracle.
- `torch` (CPU's): each query cluster, cut into row tiles of at most `ROW_TILE`, against its kept
  columns in chunks (`KEY_CHUNKS`), as batched 4-D SDPAs with their log-sum-exp (`dense.lse_kernel`),
  merged per query; batches sorted by rows, so little is padded. It does the kept work plus 5-15%
  (the last chunk of each cluster, rows padded within a batch). What work there is depends
  on the data, and torch's eager ops can only size their outputs from host numbers: it reads the
  (G, QC) cluster sizes and kept widths to the host once per call (one small transfer; on a CPU,
  where it runs by default, that waits for nothing). No Python loop over heads or clusters: its
  loop is over batches, a few per call.
- `flex` (CUDA's, and compiled on CPU): ONE `flex_attention` call; the kept-pair test in
  `mask_mod`, the fp32 column bias (stage 5's bias, the stand-ins' log sizes) in `score_mod`; its
  `BlockMask` built from the plan (`ClusterPlan.block_mask`), never by evaluating queries x keys. No
  host sync. Tiles are all-or-nothing, so key clusters are sized to the tile when it runs.
- `flashinfer`: `flashinfer.sparse.VariableBlockSparseAttentionWrapper` (the official SVG2 kernel:
  cluster sizes as variable block sizes, no tile waste) where the package and a CUDA device are
  present; it has no per-key bias, so plans with stand-ins or a key bias run `flex`. Untested here (no
  CUDA on the machines this was written on).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from ...config import ConfigError
from . import KernelName
from .dense import LseKernel, lse_kernel

#: a stand-in per key cluster: (keys (G, KC, D), values (G, KC, Dv), log-size bias (G, KC))
StandIns = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: rows of one query tile in `torch` (larger clusters are cut evenly): torch's fused CPU kernel runs
#: 0.9-1.0 as fast per pair as on a dense call on 512-768-row blocks, 0.85 on 256, 0.6 on 64-128; past
#: 768 rows it works in 256-row blocks, and a short last one costs (795 rows: 0.7)
ROW_TILE = 768
#: kept columns per SDPA in `torch`, one width per batch (the one that pads least): its fused CPU kernel
#: runs 0.87 as fast per pair as on a dense call on 512 keys, 0.94 on 1,024 or more
KEY_CHUNKS = (512, 640, 768, 896, 1024)
#: elements of the gathered keys and values of one batch in `torch`: 128 MiB of fp32
BATCH_ELEMENTS = 1 << 25
#: a batch of `torch` takes tiles down to this fraction of its first (largest) tile's rows
BATCH_ROWS = 0.9
#: flex's tile (query rows, key columns) per device type
FLEX_TILE = {"cuda": (128, 128), "cpu": (128, 128)}


def permute(x: torch.Tensor, part: slice, permutation: torch.Tensor) -> torch.Tensor:
    """(B, H, S, D) -> (B * H, S, D): the tokens in `part` (image) in each group's `permutation`
    (G, len(part)), then the others (text) in their order."""
    groups = x.shape[0] * x.shape[1]
    image = x[:, :, part].reshape(groups, -1, x.shape[-1])
    image = image.gather(1, permutation.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    text = [t.reshape(groups, -1, x.shape[-1]) for t in (x[:, :, : part.start], x[:, :, part.stop:]) if t.shape[2]]
    return torch.cat([image, *text], 1) if text else image


def token_clusters(offsets: torch.Tensor, length: int) -> torch.Tensor:
    """(G, S) cluster of every permuted position, from (G, C + 1) offsets."""
    positions = torch.arange(length, device=offsets.device).expand(offsets.shape[0], -1)
    return torch.searchsorted(offsets[:, 1:].contiguous(), positions.contiguous(), right=True)


@dataclass(frozen=True)
class Columns:
    """The key columns a kernel attends, as clusters: the permuted keys (image clusters, then text),
    then one column per image key cluster's stand-in."""

    offsets: torch.Tensor  # (G, C + 1)
    keep: torch.Tensor  # (G, QC, C) bool: which query cluster attends which column cluster
    bias: torch.Tensor | None  # (G, K + S) fp32, added to every logit of its column
    stand_ins: int  # S, stand-in columns at the end


@dataclass
class ClusterPlan:
    """One attention's clusters and kept pairs (G = batch * heads; every group permuted on its own)."""

    batch: int
    heads: int
    #: tokens in the processor's query and key sequences, and where their image tokens sit
    q_len: int
    k_len: int
    q_image: slice
    k_image: slice
    #: (G, image queries), (G, image keys): the order that makes every cluster contiguous
    q_perm: torch.Tensor
    k_perm: torch.Tensor
    #: (G, QC + 1), (G, KC + 1) over the permuted tokens, text (when present) the last cluster
    q_offsets: torch.Tensor
    k_offsets: torch.Tensor
    #: (G, QC, KC) bool, every query cluster keeping at least one non-empty key cluster
    keep: torch.Tensor
    #: one per image key cluster (text excluded), or None
    stand_ins: StandIns | None = None
    #: (G, K) fp32 over the permuted keys, or None
    key_bias: torch.Tensor | None = None
    scale: float | None = None
    #: (G, image queries) cluster of every image query, in the processor's order (for the UI)
    q_labels: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    def order_queries(self, query: torch.Tensor) -> torch.Tensor:
        """(B, H, Q, D) in the processor's order -> (G, Q, D): permuted image queries, then text."""
        return permute(query, self.q_image, self.q_perm)

    def order_keys(self, key: torch.Tensor) -> torch.Tensor:
        """(B, H, K, D) in the processor's order -> (G, K, D): permuted image keys, then text."""
        return permute(key, self.k_image, self.k_perm)

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """(G, Q, Dv) in the permuted order -> (B, H, Q, Dv) in the processor's order."""
        image_len = self.q_perm.shape[1]
        image = torch.empty_like(out[:, :image_len]).scatter_(
            1, self.q_perm.unsqueeze(-1).expand(-1, -1, out.shape[-1]), out[:, :image_len])
        text = out[:, image_len:]
        before, after = text[:, : self.q_image.start], text[:, self.q_image.start:]
        return torch.cat([before, image, after], 1).view(self.batch, self.heads, out.shape[1], -1)

    @property
    def columns(self) -> Columns:
        """The key columns the kernels attend, built once per plan."""
        if "columns" not in self._cache:
            self._cache["columns"] = self._columns()
        return self._cache["columns"]

    def _columns(self) -> Columns:
        key_bias = None if self.key_bias is None else self.key_bias.float()
        if self.stand_ins is None:
            return Columns(self.k_offsets, self.keep, key_bias, 0)
        log_sizes = self.stand_ins[2].float()
        groups, count = log_sizes.shape
        present = self.k_offsets.diff(dim=-1)[:, :count] > 0
        after = self.k_len + torch.arange(1, count + 1, device=log_sizes.device)
        offsets = torch.cat([self.k_offsets, after.expand(groups, -1)], 1)
        keep = torch.cat([self.keep, ~self.keep[:, :, :count] & present.unsqueeze(1)], 2)
        key_bias = log_sizes.new_zeros(groups, self.k_len) if key_bias is None else key_bias
        return Columns(offsets, keep, torch.cat([key_bias, log_sizes], 1), count)

    def extended(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """(G, K, D) permuted keys (`which` 0) or values (1) with the stand-ins' columns appended."""
        if self.stand_ins is None:
            return x
        return torch.cat([x, self.stand_ins[which].to(x.dtype)], 1)

    def pairs(self) -> torch.Tensor:
        """(G,) fp32 (query, column) pairs attended: kept pairs and stand-ins; on the device, no sync."""
        columns = self.columns
        q_sizes = self.q_offsets.diff(dim=-1).float()
        widths = (columns.keep.float() * columns.offsets.diff(dim=-1).float().unsqueeze(1)).sum(-1)
        return (q_sizes * widths).sum(-1)

    def order_key_bias(self, bias: torch.Tensor) -> torch.Tensor:
        """(B|1, H|1, 1, K) per-key bias in the processor's order -> (G, K) over the permuted keys."""
        bias = bias.expand(self.batch, self.heads, 1, self.k_len).transpose(-1, -2)
        return permute(bias, self.k_image, self.k_perm)[..., 0]

    def block_mask(self, tile: tuple[int, int], q_len: int, kv_len: int) -> tuple[BlockMask, torch.Tensor]:
        """(flex's `BlockMask` over queries padded to `q_len` and columns to `kv_len`, the tiles computed):
        from the plan, never by evaluating queries x keys. A tile is computed where its rows' and
        columns' clusters keep a pair (a 2-D prefix sum of the kept cluster pairs over the rectangle
        between the tile's first and last clusters, found by `searchsorted` on the offsets), and full
        (no `mask_mod`) where they keep every such pair. Static shapes, no host sync."""
        key = ("block_mask", tile, q_len, kv_len)
        if key not in self._cache:
            self._cache[key] = self._block_mask(tile, q_len, kv_len)
        return self._cache[key]

    def _block_mask(self, tile: tuple[int, int], q_len: int, kv_len: int) -> tuple[BlockMask, torch.Tensor]:
        columns = self.columns
        q_offsets = torch.cat([self.q_offsets, self.q_offsets.new_full((self.q_offsets.shape[0], 1), q_len)], 1)
        c_offsets = torch.cat([columns.offsets, columns.offsets.new_full((columns.offsets.shape[0], 1), kv_len)], 1)
        q_present = q_offsets.diff(dim=-1) > 0  # (G, QC + 1), the last: padding, never kept
        c_present = c_offsets.diff(dim=-1) > 0
        keep = columns.keep.new_zeros(q_present.shape + c_present.shape[1:])
        keep[:, :-1, :-1] = columns.keep
        keep &= q_present.unsqueeze(-1) & c_present.unsqueeze(1)
        prefix = torch.nn.functional.pad(keep.int().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (G, QC + 2, C + 2)
        q_count = torch.nn.functional.pad(q_present.int().cumsum(1), (1, 0))
        c_count = torch.nn.functional.pad(c_present.int().cumsum(1), (1, 0))
        q_first, q_last = _tile_clusters(q_offsets, q_len, tile[0])  # (G, QB)
        c_first, c_last = _tile_clusters(c_offsets, kv_len, tile[1])  # (G, KB)
        r0, r1 = q_first.unsqueeze(-1), q_last.unsqueeze(-1) + 1  # (G, QB, 1)
        c0, c1 = c_first.unsqueeze(1), c_last.unsqueeze(1) + 1  # (G, 1, KB)
        width = prefix.shape[2]
        flat = prefix.flatten(1)
        at = lambda r, c: flat.gather(1, (r * width + c).flatten(1)).view(r.shape[0], r.shape[1], c.shape[2])  # noqa: E731
        kept = at(r1, c1) - at(r0, c1) - at(r1, c0) + at(r0, c0)
        area = (q_count.gather(1, r1[..., 0]) - q_count.gather(1, r0[..., 0])).unsqueeze(-1) * \
            (c_count.gather(1, c1[:, 0]) - c_count.gather(1, c0[:, 0])).unsqueeze(1)
        full = (kept == area) & (area > 0)
        partial = (kept > 0) & ~full

        def listed(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """(count (1, G, QB), key tiles first (1, G, QB, KB)) of the chosen tiles."""
            return (chosen.sum(-1, dtype=torch.int32).unsqueeze(0),
                    (~chosen).byte().argsort(dim=-1, stable=True).int().unsqueeze(0))

        q_cluster = token_clusters(q_offsets, q_len)  # (G, q_len): padding rows in the padding cluster
        c_cluster = token_clusters(c_offsets, kv_len)

        def mask_mod(b, h, q, kv):
            return keep[h, q_cluster[h, q], c_cluster[h, kv]]

        mask = BlockMask.from_kv_blocks(*listed(partial), *listed(full), BLOCK_SIZE=tile, mask_mod=mask_mod,
                                        seq_lengths=(q_len, kv_len), compute_q_blocks=False)
        return mask, (partial | full).sum(dtype=torch.float32)


def _tile_clusters(offsets: torch.Tensor, length: int, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, tiles) cluster of each tile's first and of its last position."""
    starts = torch.arange(0, length, tile, device=offsets.device)
    ends = (starts + tile).clamp(max=length) - 1
    bounds = offsets[:, 1:].contiguous()
    find = lambda p: torch.searchsorted(bounds, p.expand(offsets.shape[0], -1).contiguous(), right=True)  # noqa: E731
    return find(starts), find(ends)


# ------------------------------------------------------------------------------------------------ kernels


def reference(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: ClusterPlan) -> torch.Tensor:
    """(G, Q, Dv) masked dense attention of the permuted (G, S, D) tokens from fp32 logits over every
    (query, column) pair: the plain oracle the other kernels are tested against."""
    columns = plan.columns
    keys, values = plan.extended(key, 0), plan.extended(value, 1)
    q_len, c_len = query.shape[1], keys.shape[1]
    clusters = columns.keep.shape[-1]
    rows = columns.keep.gather(1, token_clusters(plan.q_offsets, q_len).unsqueeze(-1).expand(-1, -1, clusters))
    mask = rows.gather(2, token_clusters(columns.offsets, c_len).unsqueeze(1).expand(-1, q_len, -1))
    scale = query.shape[-1] ** -0.5 if plan.scale is None else plan.scale
    logits = (query.float() @ keys.float().transpose(1, 2)) * scale
    if columns.bias is not None:
        logits = logits + columns.bias.unsqueeze(1)
    weights = logits.masked_fill(~mask, float("-inf")).softmax(-1).nan_to_num(0.0)
    return (weights @ values.float()).to(value.dtype)


@dataclass(frozen=True)
class TorchClusters:
    """The `torch` kernel (see the module doc)."""

    with_lse: LseKernel
    row_tile: int = ROW_TILE
    #: the key-chunk widths a batch may take (the one that pads its units' kept columns least)
    key_chunks: tuple[int, ...] = KEY_CHUNKS

    @staticmethod
    def work(plan: ClusterPlan) -> torch.Tensor:
        """The pairs it computes, as a fraction of the dense ones (a device scalar)."""
        return plan.pairs().sum() / (plan.batch * plan.heads * plan.q_len * plan.k_len)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: ClusterPlan) -> torch.Tensor:
        groups, q_len, dim = query.shape
        columns, device = plan.columns, query.device
        keys, values = plan.extended(key, 0), plan.extended(value, 1)
        c_len, dim_v = keys.shape[1], values.shape[-1]
        kept = columns.keep.long() * columns.offsets.diff(dim=-1).unsqueeze(1)  # (G, QC, C) columns kept
        widths = kept.sum(-1)  # (G, QC)
        ends = kept.cumsum(-1)  # where each column cluster ends among a query cluster's kept columns
        host = np.asarray(torch.stack([plan.q_offsets.diff(dim=-1), widths]).tolist())  # the call's one read

        # padding reads row 0 (its keys are masked, its queries' outputs go to a spare last row of `out`)
        queries, flat_k, flat_v = query.reshape(-1, dim), keys.reshape(-1, dim), values.reshape(-1, dim_v)
        bias = None if columns.bias is None else columns.bias.reshape(-1)
        # only stage 5's bias can remove every key of a chunk (text padding): else skip that check
        with_lse = functools.partial(self.with_lse, every_query_has_keys=plan.key_bias is None)
        pad_q = groups * q_len
        out = query.new_empty(pad_q + 1, dim_v)
        for batch in _batches(host[0], host[1], self.row_tile, self.key_chunks, dim + dim_v):
            g, c, first, count, chunks, s_g, s_c, s_chunk = (torch.from_numpy(a).to(device) for a in batch.arrays)
            width = batch.width
            within = torch.arange(batch.rows, device=device)
            present = within < count.unsqueeze(1)
            q_index = (g * q_len + first).unsqueeze(1) + within  # (units, rows)
            position = s_chunk.unsqueeze(1) * width + torch.arange(width, device=device)  # (n, W) among the kept
            item_ends = ends[s_g, s_c]  # (n, C)
            cluster = torch.searchsorted(item_ends, position, right=True).clamp(max=item_ends.shape[1] - 1)
            column = columns.offsets[s_g].gather(1, cluster) + position - \
                (item_ends - kept[s_g, s_c]).gather(1, cluster)
            valid = position < widths[s_g, s_c].unsqueeze(1)
            c_index = (s_g.unsqueeze(1) * c_len + column).masked_fill_(~valid, 0).reshape(-1)
            logit_bias = torch.zeros(valid.shape, device=device) if bias is None else \
                bias.index_select(0, c_index).view(-1, width)
            logit_bias = logit_bias.masked_fill(~valid, float("-inf"))
            sub_q = queries.index_select(0, q_index.masked_fill(~present, 0).reshape(-1)).view(-1, batch.rows, dim)
            part, lse = with_lse(sub_q.repeat_interleave(chunks, 0, output_size=batch.items).unsqueeze(0),
                                 flat_k.index_select(0, c_index).view(1, -1, width, dim),
                                 flat_v.index_select(0, c_index).view(1, -1, width, dim_v),
                                 logit_bias[None, :, None], plan.scale)
            merged = _merge_chunks(part[0], lse[0], chunks, batch.items)
            out.index_copy_(0, q_index.masked_fill_(~present, pad_q).reshape(-1), merged.reshape(-1, dim_v).to(out.dtype))
        return out[:pad_q].view(groups, q_len, dim_v)


@dataclass(frozen=True)
class _Batch:
    """Units (query cluster x row tile) computed together, as host arrays: per unit its group, cluster,
    first row, rows and key chunks, then per chunk (sub-item) its group, cluster and chunk index."""

    rows: int
    width: int
    items: int
    arrays: tuple[np.ndarray, ...]


def _batches(q_sizes: np.ndarray, widths: np.ndarray, row_tile: int, key_chunks: tuple[int, ...], channels: int):
    """The batches of one call, from the (G, QC) cluster sizes and kept widths on the host: every query
    cluster cut into row tiles of at most `row_tile` rows, sorted by rows (most first), a batch taking
    tiles down to `BATCH_ROWS` of its first one's rows while its gathered keys and values fit
    `BATCH_ELEMENTS`, its key chunks of the width in `key_chunks` that pads their kept columns least;
    a tile's key chunks all in its batch."""
    group, cluster = np.nonzero(q_sizes > 0)
    sizes, width = q_sizes[group, cluster], widths[group, cluster]
    tiles = -(-sizes // row_tile)
    rows = -(-sizes // tiles)
    unit = np.repeat(np.arange(group.size), tiles)
    tile = np.arange(unit.size) - np.repeat(np.cumsum(tiles) - tiles, tiles)
    first = np.concatenate([np.zeros((q_sizes.shape[0], 1), dtype=q_sizes.dtype), np.cumsum(q_sizes, 1)], 1)
    starts = first[group[unit], cluster[unit]] + tile * rows[unit]
    counts = np.minimum(rows[unit], sizes[unit] - tile * rows[unit])
    order = np.argsort(-counts, kind="stable")
    units = [a[order] for a in (group[unit], cluster[unit], starts, counts, width[unit])]
    counts, kept = units[3], units[4]
    start, widest = 0, max(key_chunks)
    while start < counts.size:
        rows = int(counts[start])
        stop = start + max(1, int(np.searchsorted(-counts[start:], -BATCH_ROWS * rows, side="right")))
        budget = max(1, BATCH_ELEMENTS // ((widest + rows) * channels))  # chunks of the widest, at most
        stop = start + max(1, int(np.searchsorted(np.cumsum(-(-kept[start:stop] // min(key_chunks))), budget,
                                                  side="right")))
        padded = [int((-(-kept[start:stop] // w) * w).sum()) for w in key_chunks]
        chunk = key_chunks[int(np.argmin(padded))]
        g, c, first_row, count, unit_kept = (np.ascontiguousarray(a[start:stop]) for a in units)
        chunks = -(-unit_kept // chunk)
        sub = np.repeat(np.arange(g.size), chunks)
        sub_chunk = np.arange(sub.size) - np.repeat(np.cumsum(chunks) - chunks, chunks)
        yield _Batch(rows, chunk, int(sub.size), (g, c, first_row, count, chunks, g[sub], c[sub], sub_chunk))
        start = stop


def _merge_chunks(out: torch.Tensor, lse: torch.Tensor, chunks: torch.Tensor, items: int) -> torch.Tensor:
    """(units, rows, Dv) fp32 attention over all of each unit's key chunks, from each chunk's (items,
    rows, Dv) output and (items, rows) log-sum-exp, a unit's chunks consecutive (`chunks` per unit)."""
    top = torch.segment_reduce(lse, "max", lengths=chunks, axis=0)
    weight = torch.exp(lse - top.repeat_interleave(chunks, 0, output_size=items)).nan_to_num(0.0)
    total = torch.segment_reduce(weight, "sum", lengths=chunks, axis=0)
    weighted = torch.segment_reduce(out.float() * weight.unsqueeze(-1), "sum", lengths=chunks, axis=0)
    return weighted / total.unsqueeze(-1)


@functools.cache
def _compiled_flex() -> Callable:
    return torch.compile(flex_attention, dynamic=False)


@dataclass(frozen=True)
class FlexClusters:
    """The `flex` kernel (see the module doc)."""

    tile: tuple[int, int] = (128, 128)
    #: compiled (what runs), or flex's eager reference path (tests)
    compiled: bool = True

    def _lengths(self, plan: ClusterPlan) -> tuple[int, int]:
        """Queries and columns, padded to whole tiles."""
        columns = plan.q_len, plan.k_len + plan.columns.stand_ins
        return tuple(-(-n // t) * t for n, t in zip(columns, self.tile))

    def work(self, plan: ClusterPlan) -> torch.Tensor:
        """The pairs of the tiles it computes, as a fraction of the dense pairs (a device scalar)."""
        tiles = plan.block_mask(self.tile, *self._lengths(plan))[1]
        return tiles * (self.tile[0] * self.tile[1]) / (plan.batch * plan.heads * plan.q_len * plan.k_len)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: ClusterPlan) -> torch.Tensor:
        columns = plan.columns
        keys, values = plan.extended(key, 0), plan.extended(value, 1)
        q_len, c_len = query.shape[1], keys.shape[1]
        q_pad, c_pad = self._lengths(plan)
        pad = lambda x, to: torch.nn.functional.pad(x, (0, 0, 0, to - x.shape[1]))  # noqa: E731
        mask = plan.block_mask(self.tile, q_pad, c_pad)[0]
        score_mod = None
        if columns.bias is not None:
            bias = torch.nn.functional.pad(columns.bias.float(), (0, c_pad - c_len))

            def score_mod(score, b, h, q, kv):
                return score + bias[h, kv]

        attend = _compiled_flex() if self.compiled else flex_attention
        out = attend(pad(query, q_pad).unsqueeze(0), pad(keys, c_pad).unsqueeze(0), pad(values, c_pad).unsqueeze(0),
                     score_mod=score_mod, block_mask=mask, scale=plan.scale)
        return out[0, :, :q_len]


@dataclass(frozen=True)
class FlashInferClusters:
    """The `flashinfer` kernel (see the module doc); plans it cannot run go to `fallback`."""

    fallback: FlexClusters
    workspace: torch.Tensor

    def work(self, plan: ClusterPlan) -> torch.Tensor:
        runs_flex = plan.stand_ins is not None or plan.key_bias is not None
        return self.fallback.work(plan) if runs_flex else TorchClusters.work(plan)

    def __call__(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, plan: ClusterPlan) -> torch.Tensor:
        if plan.stand_ins is not None or plan.key_bias is not None or query.dtype not in (torch.float16, torch.bfloat16):
            return self.fallback(query, key, value, plan)
        import flashinfer

        groups, _, dim = query.shape
        wrapper = flashinfer.sparse.VariableBlockSparseAttentionWrapper(self.workspace)
        wrapper.plan(plan.keep, plan.q_offsets.diff(dim=-1).int(), plan.k_offsets.diff(dim=-1).int(), groups, groups,
                     dim, sm_scale=plan.scale, q_data_type=query.dtype)
        return wrapper.run(query.contiguous(), key.contiguous(), value.contiguous())


@dataclass(frozen=True)
class ClusterKernel:
    """A cluster kernel as a technique holds it: the kernel, and what to expect of it."""

    name: str
    run: TorchClusters | FlexClusters | FlashInferClusters
    #: its speed per pair of `run.work` against dense SDPA's on the device (1.0: as fast): with it a
    #: technique judges whether a plan saves time
    speed: float = 1.0
    #: tokens per key cluster when the config names no count (None: the technique's own default)
    key_cluster_tokens: int | None = None


#: (kernel, device type) -> `ClusterKernel.speed`: on CPU measured (benchmarks/svg2_layer.py); on CUDA
#: assumed until measured there (any other device: as the CPU)
SPEED = {("torch", "cpu"): 0.6, ("flex", "cpu"): 0.45, ("torch", "cuda"): 0.5, ("flex", "cuda"): 0.9}


def flashinfer_installed() -> bool:
    try:
        import flashinfer.sparse  # noqa: F401
    except ImportError:
        return False
    return True


def flashinfer_available(device: torch.device) -> bool:
    return torch.device(device).type == "cuda" and flashinfer_installed()


def cluster_kernel(name: KernelName, device: torch.device) -> ClusterKernel:
    """The cluster kernel `name` for `device`, once per technique and device. "auto": flashinfer where it
    is installed on CUDA, else flex on CUDA; elsewhere torch (measured faster than compiled flex on this
    CPU: docs/DESIGN.md)."""
    device = torch.device(device)
    if name == "auto":
        name = ("flashinfer" if flashinfer_available(device) else "flex") if device.type == "cuda" else "torch"
    tile = FLEX_TILE.get(device.type, (128, 128))
    if name == "torch":
        return ClusterKernel("torch", TorchClusters(lse_kernel(device)), SPEED.get(("torch", device.type), 0.5))
    if name == "flex":
        return ClusterKernel("flex", FlexClusters(tile), SPEED.get(("flex", device.type), 0.5), key_cluster_tokens=tile[1])
    if name == "flashinfer":
        if not flashinfer_available(device):
            raise ConfigError(f"SVG2Config.kernel 'flashinfer' needs the flashinfer package and a CUDA device "
                              f"(here: {device}, flashinfer {'not ' if device.type == 'cuda' else ''}installed); "
                              "use 'auto', 'torch' or 'flex'")
        workspace = torch.empty(128 << 20, dtype=torch.uint8, device=device)
        return ClusterKernel("flashinfer", FlashInferClusters(FlexClusters(tile), workspace), SPEED[("flex", "cuda")],
                             key_cluster_tokens=tile[1])
    raise ConfigError(f"no cluster kernel {name!r}: use 'auto', 'torch', 'flex' or 'flashinfer'")
