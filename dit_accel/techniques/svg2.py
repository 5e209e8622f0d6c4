"""SVG2 semantic-aware permutation sparse attention (Sparse VideoGen2, arXiv 2505.18875), stage 6.

Per head, the image queries and the image keys are clustered by k-means (separately, with their own
cluster counts; a layer's centroids warm-start its next call). Every (query cluster, key cluster)
pair is scored by the attention of the centroids, weighted by the key cluster's size; each query
cluster keeps the key clusters that make up `top_p` of that mass (at least `min_key_cluster_ratio`
of them). Tokens are permuted so clusters are contiguous, the block-sparse kernel computes the kept
pairs, and the output is permuted back. Text tokens attend and are attended densely (one more
cluster on each side); cross-attention is untouched. Batches and CFG work: every (sample, head) is
clustered on its own. The first `dense_warmup` of the steps and `dense_first_blocks` of the blocks
run dense. k-means and the pair scoring are recorded in the ledger as overhead.

With `stand_ins` (default), a query cluster also attends to one stand-in per key cluster it skips:
that cluster's mean key and value, biased by log(its size), as proxy attention does for windows
(after SVG-EAR's compensation). The skipped mass is then approximated instead of dropped, at one
extra key per skipped cluster. The kernel is `block_sparse.gathered` on CPU (measured faster than
the padded batched kernel at every size tried, 1.8k-16k tokens, even at 1.5x padding) and
`block_sparse.padded` elsewhere (no Python loop per cluster).

A layer where clustering cannot pay runs dense, decided from its shapes before any k-means
(`why_no_saving`): too few tokens (one query or key cluster: below ~380 image tokens at the default
cluster sizes; or a k-means that costs more than the plan could skip) or a target density near 1
(top_p or min_key_cluster_ratio of 0.95 or more). `report()` counts those layers per call
(`dense_layers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention import block_sparse, kmeans, pooling
from ..config import AccelerationConfig, Stage, param
from ..runtime.registry import register_technique
from ..runtime.search_space import every_preset
from ..runtime.stats import Stat, StatKind
from .sparse_attention import DENSE_ABOVE, SparseAttention

#: tokens per cluster of the official Wan 720p settings (75,600 tokens: 300 query, 1,000 key clusters)
TOKENS_PER_QUERY_CLUSTER = 252
TOKENS_PER_KEY_CLUSTER = 76


@dataclass(frozen=True)
class SVG2Config(AccelerationConfig):
    """k-means on Q and K per head, cluster pairs kept by top-p of centroid attention."""

    top_p: float = param(0.9, "attention mass of key clusters kept per query cluster; 1.0 keeps every pair",
                         low=0.0, high=1.0, low_open=True)
    query_clusters: int | None = param(None, "k-means clusters of the image queries per head; None: one per 252 "
                                             "tokens (the official 720p ratio)", low=1, high=1 << 20)
    key_clusters: int | None = param(None, "k-means clusters of the image keys per head; None: one per 76 tokens",
                                     low=1, high=1 << 20)
    kmeans_iters_first: int = param(50, "k-means iterations at a layer's first sparse call", low=1, high=10_000)
    kmeans_iters_next: int = param(2, "warm-started k-means iterations at later calls", low=0, high=10_000)
    min_key_cluster_ratio: float = param(0.1, "fraction of key clusters always kept per query cluster",
                                         low=0.0, high=1.0)
    dense_first_blocks: float = param(0.03, "fraction of blocks (from the first) kept dense", low=0.0, high=1.0)
    dense_warmup: float = param(0.2, "fraction of steps (from the first) kept dense", low=0.0, high=1.0)
    stand_ins: bool = param(True, "attend to each skipped key cluster through its mean key and value (log-size "
                                  "biased) instead of dropping it; False is the paper's SVG2")
    plan_every_layer: bool = param(False, "cluster every layer, also where that cannot save (too few tokens, "
                                          "density near 1); False runs those dense at no overhead")

    name = "svg2"
    #: chosen on the reference video model (4 captions, CFG 4, 20 steps): quality 25.0 dB and fast
    #: 21.3 dB vs dense (balanced lies between); its diffuse attention needs many clusters for 90% of
    #: the mass, so these keep more steps and the first block dense
    presets = {
        "quality": dict(dense_warmup=0.5, dense_first_blocks=0.25),
        "balanced": dict(dense_warmup=0.4, dense_first_blocks=0.25),
        "fast": dict(dense_warmup=0.4, dense_first_blocks=0.25, top_p=0.8),
    }

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.ATTENTION_KERNEL})

    @classmethod
    def keep_all(cls) -> "SVG2Config":
        """Every cluster pair kept from the first step and block on: k-means, permutation and the
        block-sparse kernel all run, and the output is the dense one."""
        return cls(top_p=1.0, min_key_cluster_ratio=1.0, dense_first_blocks=0.0, dense_warmup=0.0,
                   plan_every_layer=True)

    def clusters_for(self, queries: int, keys: int) -> tuple[int, int]:
        query = self.query_clusters or max(1, round(queries / TOKENS_PER_QUERY_CLUSTER))
        key = self.key_clusters or max(1, round(keys / TOKENS_PER_KEY_CLUSTER))
        return min(query, queries), min(key, keys)


def kept_cluster_pairs(query_centroids: torch.Tensor, key_centroids: torch.Tensor, key_sizes: torch.Tensor,
                       scale: float, top_p: float, min_kept: int) -> torch.Tensor:
    """(G, QC, KC) pairs whose size-weighted centroid attention reaches `top_p` per query cluster (at
    least `min_kept` key clusters each); empty key clusters are never kept."""
    logits = (query_centroids @ key_centroids.transpose(1, 2)) * scale + key_sizes.clamp(min=1).log().unsqueeze(1)
    logits = logits.masked_fill(key_sizes.unsqueeze(1) == 0, float("-inf"))
    mass = logits.softmax(-1)
    order = mass.argsort(-1, descending=True)
    before = mass.gather(-1, order).cumsum(-1) - mass.gather(-1, order)  # mass of the clusters ranked above
    rank = torch.arange(mass.shape[-1], device=mass.device)
    kept_sorted = (before < top_p) | (rank < min_kept)
    return torch.zeros_like(kept_sorted).scatter(-1, order, kept_sorted) & (key_sizes.unsqueeze(1) > 0)


@register_technique(SVG2Config, "SVG2 sparse attention: k-means permutation, top-p cluster pairs",
                    search_space=every_preset(SVG2Config))
class SVG2(SparseAttention):
    stats = SparseAttention.stats + (Stat("svg2_query_clusters", StatKind.TOKEN_LABELS,
                                          "SVG2: query clusters of one head"),)

    def __init__(self, config: SVG2Config, session):
        super().__init__(config, session)
        #: per (slot, block, attention): the (query, key) centroids the layer ended its last call with
        self.centroids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        #: this call's query clusters of one head over the grid (`_record_cluster_map`)
        self._cluster_map: dict | None = None

    def begin_call(self, call_state) -> None:
        super().begin_call(call_state)
        self._cluster_map = None

    def end_run(self) -> None:
        self.centroids.clear()

    def _record_cluster_map(self, call_state, call, labels: torch.Tensor) -> None:
        """The query clusters of the first sample's first head at the call's first sparse attention,
        over the grid (-1 where a token was not computed), for the UI."""
        grid = call_state.grid
        cluster_map = torch.full((grid.num_tokens,), -1, dtype=torch.long)
        placed = call_state.placed(labels.shape[1])
        if placed is not None:
            index = placed[1].index if placed[1].shared else placed[1].index[0]
            cluster_map[index.cpu()] = labels[0].cpu()
        self._cluster_map = {"block": call.block_index,
                             "labels": cluster_map.view(grid.frames, grid.rows, grid.cols).tolist()}

    def call_stats(self, call_state) -> dict:
        stats = super().call_stats(call_state)
        if self._cluster_map is not None:
            stats["svg2_query_clusters"] = self._cluster_map
        return stats

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.centroids.values() for t in pair)

    def why_no_saving(self, call_state, call, queries, keys):
        """Too few tokens: one query cluster (every query would keep the key clusters of the mean query,
        which spreads its attention widest) or one key cluster, or a k-means (averaged over the run's
        sparse steps) that costs more than the plan could skip at best; or a target density near 1."""
        config = self.config
        if max(config.top_p, config.min_key_cluster_ratio) >= DENSE_ABOVE:
            return "density near 1"
        q_image, k_image = call.image_slice(queries), call.image_slice(keys)
        image_q, image_k = q_image.stop - q_image.start, k_image.stop - k_image.start
        q_clusters, k_clusters = config.clusters_for(image_q, image_k)
        if min(q_clusters, k_clusters) < 2:
            return "too few tokens"
        least_kept = max(1, math.ceil(config.min_key_cluster_ratio * k_clusters))
        # at best each query keeps the least key clusters, and attends to one stand-in per skipped one
        skippable = image_q * (k_clusters - least_kept) * (image_k / k_clusters - (1 if config.stand_ins else 0))
        steps = self.sparse_steps(call_state) or 1
        iterations = (config.kmeans_iters_first + (steps - 1) * max(config.kmeans_iters_next, 1)) / steps
        # k-means: 2 * iterations * head_dim * points * clusters FLOPs; an attended pair: 4 * head_dim
        kmeans_pairs = iterations * (image_q * q_clusters + image_k * k_clusters) / 2
        return "too few tokens" if kmeans_pairs >= skippable else None

    def sparse(self, call_state, call, query, key, value, key_bias, scale):
        batch, heads, q_len, dim = query.shape
        k_len = key.shape[2]
        q_image, k_image = call.image_slice(q_len), call.image_slice(k_len)
        groups = batch * heads
        flat = lambda x, part: x[:, :, part].reshape(groups, -1, x.shape[-1])  # noqa: E731
        image_q, image_k = flat(query, q_image), flat(key, k_image)
        q_clusters, k_clusters = self.config.clusters_for(image_q.shape[1], image_k.shape[1])
        cache_key = (call_state.ctx.slot, call.block_index, call.attention_index)
        warm = self.centroids.get(cache_key)
        if warm is not None and (warm[0].shape != (groups, q_clusters, dim) or warm[1].shape != (groups, k_clusters, dim)):
            warm = None
        iterations = self.config.kmeans_iters_first if warm is None else self.config.kmeans_iters_next
        q_labels, q_centroids, _ = kmeans.kmeans(image_q, q_clusters, iterations, None if warm is None else warm[0])
        k_labels, k_centroids, k_sizes = kmeans.kmeans(image_k, k_clusters, iterations,
                                                       None if warm is None else warm[1])
        self.centroids[cache_key] = (q_centroids, k_centroids)
        if self._cluster_map is None:
            self._record_cluster_map(call_state, call, q_labels)
        keep = kept_cluster_pairs(q_centroids, k_centroids, k_sizes, scale or dim ** -0.5, self.config.top_p,
                     math.ceil(self.config.min_key_cluster_ratio * k_clusters))
        call_state.record_overhead("svg2 k-means", 2.0 * groups * max(iterations, 1) * dim *
                             (image_q.shape[1] * q_clusters + image_k.shape[1] * k_clusters), image_q.shape[1])

        # text (joint attention) is one more cluster on each side, kept by and keeping every cluster
        q_perm, q_offsets = kmeans.cluster_permutation(q_labels, q_clusters)
        k_perm, k_offsets = kmeans.cluster_permutation(k_labels, k_clusters)
        q_text, k_text = q_len - image_q.shape[1], k_len - image_k.shape[1]
        q_offsets = torch.cat([q_offsets, q_offsets[:, -1:] + q_text], -1) if q_text else q_offsets
        k_offsets = torch.cat([k_offsets, k_offsets[:, -1:] + k_text], -1) if k_text else k_offsets
        if k_text:
            keep = torch.cat([keep, keep.new_ones(groups, keep.shape[1], 1)], -1)
        if q_text:
            keep = torch.cat([keep, keep.new_ones(groups, 1, keep.shape[-1])], 1)

        def order(x, part, permutation):
            """The permuted image tokens, then the text tokens, as (G, S, D)."""
            image = flat(x, part).gather(1, permutation.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            text = [x[:, :, : part.start], x[:, :, part.stop:]]
            return torch.cat([image] + [t.reshape(groups, -1, x.shape[-1]) for t in text if t.shape[2]], 1)

        if key_bias is not None:
            key_bias = key_bias.expand(batch, heads, 1, k_len).reshape(groups, 1, k_len)
        stand_ins = None
        if self.config.stand_ins:
            image_bias = None if key_bias is None else key_bias[:, :, k_image].unsqueeze(1)
            means_k, means_v, log_sizes = pooling.pool(image_k.unsqueeze(1), flat(value, k_image).unsqueeze(1),
                                                       k_labels, k_clusters, image_bias)
            stand_ins = (means_k[:, 0], means_v[:, 0], log_sizes.reshape(groups, k_clusters))
            if k_text:  # the text cluster is always kept: its stand-in is never attended
                stand_ins = (torch.cat([stand_ins[0], stand_ins[0][:, :1]], 1),
                             torch.cat([stand_ins[1], stand_ins[1][:, :1]], 1),
                             torch.cat([stand_ins[2], torch.full_like(stand_ins[2][:, :1], -torch.inf)], 1))
        if key_bias is not None:
            image_bias = key_bias[:, :, k_image].gather(2, k_perm.unsqueeze(1))
            key_bias = torch.cat([image_bias, key_bias[:, :, : k_image.start], key_bias[:, :, k_image.stop:]], 2)
        kernel = block_sparse.gathered if query.device.type == "cpu" else block_sparse.padded
        out = kernel(order(query, q_image, q_perm), order(key, k_image, k_perm), order(value, k_image, k_perm),
                     q_offsets, k_offsets, keep, key_bias, scale, stand_ins)
        pairs = float(block_sparse.pairs(q_offsets, k_offsets, keep).float().mean())
        if stand_ins is not None:  # one more key per skipped non-empty key cluster
            skipped = (~keep & (k_offsets.diff(dim=-1) > 0).unsqueeze(1)).float()
            pairs += float((skipped.sum(-1) * q_offsets.diff(dim=-1)).sum(-1).float().mean())

        # back to the processor's order: un-permute the image queries, text where it was
        image_out = out[:, : image_q.shape[1]]
        restored = torch.empty_like(image_out).scatter_(1, q_perm.unsqueeze(-1).expand_as(image_out), image_out)
        text_out = out[:, image_q.shape[1]:]
        before, after = text_out[:, : q_image.start], text_out[:, q_image.start:]
        result = torch.cat([before, restored, after], 1).view(batch, heads, q_len, -1)
        return result, pairs
