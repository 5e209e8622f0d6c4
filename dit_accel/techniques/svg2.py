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
extra key per skipped cluster.

The plan (`kernels.clusters.ClusterPlan`) runs on the cluster kernel `kernel` names, chosen once per
device: flashinfer's variable-block kernel where it is installed on CUDA, else one compiled
FlexAttention call on CUDA (key clusters then sized to its tile), and on other devices the `torch`
kernel (batched fused SDPAs over each cluster's kept keys; measured faster than compiled flex on this
CPU). Planning makes no host sync; the pairs a call attended stay on the device until `report()`.

A layer where clustering cannot pay runs dense, decided from its shapes before any k-means
(`why_no_saving`): too few tokens (one query or key cluster: below ~380 image tokens at the default
cluster sizes; or a k-means that costs more than the plan could skip) or a target density near 1
(top_p or min_key_cluster_ratio of 0.95 or more). A layer's first sparse call of a run also reads
what its plan costs the kernel (one host read per layer and run): where that would save under
`MIN_SAVING` of the dense attention's time (diffuse attention keeps most pairs at any top_p), the
layer runs dense for the rest of the run, without k-means. `report()` counts those layers per call
(`dense_layers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention import kmeans, pooling
from ..attention.kernels import KernelName
from ..attention.kernels.clusters import ClusterKernel, ClusterPlan, cluster_kernel, flashinfer_installed
from ..config import AccelerationConfig, ConfigError, Stage, param
from ..runtime.estimate import CallShapes, attention_shapes
from ..runtime.registry import register_technique
from ..runtime.search_space import every_preset
from ..runtime.stats import Stat, StatKind
from .sparse_attention import DENSE_ABOVE, MIN_SAVING, SparseAttention

#: tokens per cluster of the official Wan 720p settings (75,600 tokens: 300 query, 1,000 key clusters)
TOKENS_PER_QUERY_CLUSTER = 252
TOKENS_PER_KEY_CLUSTER = 76
#: k-means iterations of the first call's probe (`probe`)
PROBE_ITERATIONS = 5


@dataclass(frozen=True)
class SVG2Config(AccelerationConfig):
    """k-means on Q and K per head, cluster pairs kept by top-p of centroid attention."""

    top_p: float = param(0.9, "attention mass of key clusters kept per query cluster; 1.0 keeps every pair",
                         low=0.0, high=1.0, low_open=True)
    query_clusters: int | None = param(None, "k-means clusters of the image queries per head; None: one per 252 "
                                             "tokens (the official 720p ratio)", low=1, high=1 << 20)
    key_clusters: int | None = param(None, "k-means clusters of the image keys per head; None: one per 76 tokens "
                                           "(one per 128, its tile, on the flex kernel)", low=1, high=1 << 20)
    kmeans_iters_first: int = param(50, "k-means iterations at a layer's first sparse call", low=1, high=10_000)
    kmeans_iters_next: int = param(2, "warm-started k-means iterations at later calls", low=0, high=10_000)
    min_key_cluster_ratio: float = param(0.1, "fraction of key clusters always kept per query cluster",
                                         low=0.0, high=1.0)
    dense_first_blocks: float = param(0.03, "fraction of blocks (from the first) kept dense", low=0.0, high=1.0)
    dense_warmup: float = param(0.2, "fraction of steps (from the first) kept dense", low=0.0, high=1.0)
    stand_ins: bool = param(True, "attend to each skipped key cluster through its mean key and value (log-size "
                                  "biased) instead of dropping it; False is the paper's SVG2")
    plan_every_layer: bool = param(False, "cluster every layer, also where that cannot save (too few tokens, "
                                          "density near 1, a first plan that saves under 10%); False runs those "
                                          "dense at no overhead")
    kernel: KernelName = param("auto", "cluster kernel: auto (flashinfer where installed on CUDA, else flex on "
                                       "CUDA; torch elsewhere), torch, flex, flashinfer")

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

    def clusters_for(self, queries: int, keys: int, key_tokens: int | None = None) -> tuple[int, int]:
        """(query, key) cluster counts for `queries` and `keys` image tokens, one key cluster per
        `key_tokens` where a kernel asks for it (flex: its tile), at most one per token."""
        query = self.query_clusters or max(1, round(queries / TOKENS_PER_QUERY_CLUSTER))
        key = self.key_clusters or max(1, round(keys / (key_tokens or TOKENS_PER_KEY_CLUSTER)))
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
        if config.kernel == "flashinfer" and not flashinfer_installed():  # at apply; the device at its first call
            raise ConfigError("SVG2Config.kernel 'flashinfer' needs the flashinfer package (the [gpu] extra) and a "
                              "CUDA device; use 'auto', 'torch' or 'flex'")
        super().__init__(config, session)
        #: per (slot, block, attention): the (query, key) centroids the layer ended its last call with
        self.centroids: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        #: per (slot, block, attention) this run: why its plan cannot save (None: it can), from its first
        #: sparse call
        self._measured: dict[tuple, str | None] = {}
        #: the cluster kernel per device, chosen at its first call there
        self._kernels: dict[torch.device, ClusterKernel] = {}
        #: this call's query clusters of one head over the grid (`_record_cluster_map`)
        self._cluster_map: dict | None = None

    def begin_call(self, call_state) -> None:
        super().begin_call(call_state)
        self._cluster_map = None

    def end_run(self) -> None:
        self.centroids.clear()
        self._measured.clear()

    def _kernel(self, device: torch.device) -> ClusterKernel:
        kernel = self._kernels.get(device)
        if kernel is None:
            kernel = self._kernels[device] = cluster_kernel(self.config.kernel, device)
        return kernel

    def _clusters(self, call_state, queries: int, keys: int) -> tuple[int, int]:
        """Cluster counts from the grid where the tokens lie on it (the same counts whatever subset RAS
        computes, so the warm start survives), from the tokens themselves where they are pooled."""
        placed = lambda n: call_state.grid.num_tokens if call_state.placed(n) is not None else n  # noqa: E731
        q_clusters, k_clusters = self.config.clusters_for(placed(queries), placed(keys),
                                                          self._kernel(self.device).key_cluster_tokens)
        return min(q_clusters, queries), min(k_clusters, keys)

    def _record_cluster_map(self, call_state, call, labels: torch.Tensor) -> None:
        """The query clusters of the first sample's first head at the call's first sparse attention,
        over the grid (-1 where a token was not computed), for the UI; on the device."""
        grid = call_state.grid
        placed = call_state.placed(labels.shape[0])
        cluster_map = torch.full((grid.num_tokens,), -1, dtype=torch.int32, device=labels.device)
        if placed is not None:
            index = placed[1].index if placed[1].shared else placed[1].index[0]
            cluster_map.index_copy_(0, index.to(labels.device), labels.to(torch.int32))
        self._cluster_map = {"block": call.block_index, "labels": cluster_map.view(grid.frames, grid.rows, grid.cols)}

    def call_stats(self, call_state) -> dict:
        stats = super().call_stats(call_state)
        if self._cluster_map is not None:
            stats["svg2_query_clusters"] = self._cluster_map
        return stats

    def state_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for pair in self.centroids.values() for t in pair)

    def estimate_bytes(self, shapes: CallShapes) -> dict[str, int]:
        """Every layer's fp32 query and key centroids, kept for the next call's warm start."""
        queries, keys = self.config.clusters_for(shapes.tokens, shapes.tokens)
        return {"centroids": sum(shapes.samples * a.heads * (queries + keys) * a.head_dim * 4
                                 for a in attention_shapes(self.adapter))}

    def why_no_saving(self, call_state, call, queries, keys):
        """Too few tokens: one query cluster (every query would keep the key clusters of the mean query,
        which spreads its attention widest) or one key cluster, or a k-means (averaged over the run's
        sparse steps) that costs more than the plan could skip at best; or a target density near 1."""
        config = self.config
        if max(config.top_p, config.min_key_cluster_ratio) >= DENSE_ABOVE:
            return "density near 1"
        q_image, k_image = call.image_slice(queries), call.image_slice(keys)
        image_q, image_k = q_image.stop - q_image.start, k_image.stop - k_image.start
        q_clusters, k_clusters = self._clusters(call_state, image_q, image_k)
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
        layer = (call_state.ctx.slot, call.block_index, call.attention_index)
        if self._measured.get(layer):
            return self._measured[layer]
        groups, dim = query.shape[0] * query.shape[1], query.shape[-1]
        q_image, k_image = call.image_slice(query.shape[2]), call.image_slice(key.shape[2])
        clusters = self._clusters(call_state, q_image.stop - q_image.start, k_image.stop - k_image.start)
        warm = self.centroids.get(layer)
        if warm is not None and (warm[0].shape, warm[1].shape) != ((groups, clusters[0], dim), (groups, clusters[1], dim)):
            warm = None
        iterations = self.config.kmeans_iters_first if warm is None else self.config.kmeans_iters_next
        kernel = self._kernel(query.device)
        judge = layer not in self._measured and not self.config.plan_every_layer
        if judge and warm is None and iterations > PROBE_ITERATIONS:
            # a layer's first sparse call of the run: a few k-means iterations tell whether its plans can
            # save at all (one host read); if so, k-means goes on from there (the same result as from scratch)
            density, warm = probe(self.config, query, key, scale, q_image, k_image, clusters, PROBE_ITERATIONS)
            iterations -= PROBE_ITERATIONS
            call_state.record_overhead("svg2 k-means", 2.0 * groups * PROBE_ITERATIONS * dim * (
                (q_image.stop - q_image.start) * clusters[0] + (k_image.stop - k_image.start) * clusters[1]))
            if float(density) > kernel.speed * (1 - MIN_SAVING):
                self._measured[layer] = reason = f"{kernel.name} kernel: its plans save under {MIN_SAVING:.0%}"
                return reason
        plan, keys, values, self.centroids[layer] = plan_clusters(self.config, query, key, value, key_bias, scale,
                                                                  q_image, k_image, clusters, iterations, warm)
        call_state.record_overhead("svg2 k-means", 2.0 * groups * max(iterations, 1) * dim *
                                   (plan.q_perm.shape[1] * clusters[0] + plan.k_perm.shape[1] * clusters[1]),
                                   plan.q_perm.shape[1])
        if judge:  # and the kernel's own count of what the first whole plan costs it (one more read)
            self._measured[layer] = reason = None if float(kernel.run.work(plan)) <= kernel.speed * (1 - MIN_SAVING) \
                else f"{kernel.name} kernel: its plans save under {MIN_SAVING:.0%}"
            if reason:
                return reason
        if self._cluster_map is None and self.session.details:
            self._record_cluster_map(call_state, call, plan.q_labels[0])
        out = kernel.run(plan.order_queries(query), keys, values, plan)
        return plan.restore(out), plan.pairs().mean()


def probe(config: SVG2Config, query: torch.Tensor, key: torch.Tensor, scale: float | None, q_image: slice,
          k_image: slice, clusters: tuple[int, int], iterations: int
          ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(the fraction of the dense pairs a plan attends (a device scalar), the (query, key) centroids)
    after `iterations` k-means iterations from scratch: kept pairs, stand-ins and text counted."""
    batch, heads, q_len, dim = query.shape
    k_len, groups = key.shape[2], batch * heads
    _, q_centroids, q_sizes = kmeans.kmeans(query[:, :, q_image].reshape(groups, -1, dim), clusters[0], iterations)
    _, k_centroids, k_sizes = kmeans.kmeans(key[:, :, k_image].reshape(groups, -1, dim), clusters[1], iterations)
    keep = kept_cluster_pairs(q_centroids, k_centroids, k_sizes, scale or dim ** -0.5, config.top_p,
                              math.ceil(config.min_key_cluster_ratio * clusters[1]))
    kept = (keep.float() * k_sizes.float().unsqueeze(1)).sum(-1)  # (G, QC) image keys kept
    if config.stand_ins:
        kept = kept + (~keep & (k_sizes > 0).unsqueeze(1)).float().sum(-1)
    image_q = q_image.stop - q_image.start
    text_k = k_len - (k_image.stop - k_image.start)
    pairs = (q_sizes.float() * (kept + text_k)).sum() + groups * (q_len - image_q) * k_len
    return pairs / (groups * q_len * k_len), (q_centroids, k_centroids)


def plan_clusters(config: SVG2Config, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  key_bias: torch.Tensor | None, scale: float | None, q_image: slice, k_image: slice,
                  clusters: tuple[int, int], iterations: int,
                  warm: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[ClusterPlan, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """(plan, permuted keys and values (G, K, D), the (query, key) centroids to warm-start the next call)
    of one attention of (B, H, S, D) q/k/v: k-means of each side's image tokens (from `warm` centroids
    if given), the kept pairs, the permutations, text as one more cluster on each side (kept by and
    keeping every cluster), the stand-ins and the permuted key bias. No host sync."""
    batch, heads, q_len, dim = query.shape
    k_len, groups = key.shape[2], batch * heads
    image_q = query[:, :, q_image].reshape(groups, -1, dim)
    image_k = key[:, :, k_image].reshape(groups, -1, dim)
    q_labels, q_centroids, q_sizes = kmeans.kmeans(image_q, clusters[0], iterations, None if warm is None else warm[0])
    k_labels, k_centroids, k_sizes = kmeans.kmeans(image_k, clusters[1], iterations, None if warm is None else warm[1])
    keep = kept_cluster_pairs(q_centroids, k_centroids, k_sizes, scale or dim ** -0.5, config.top_p,
                              math.ceil(config.min_key_cluster_ratio * clusters[1]))
    q_perm, q_offsets = kmeans.cluster_permutation(q_labels, q_sizes)
    k_perm, k_offsets = kmeans.cluster_permutation(k_labels, k_sizes)
    image_offsets = k_offsets
    q_text, k_text = q_len - image_q.shape[1], k_len - image_k.shape[1]
    if k_text:
        k_offsets = torch.cat([k_offsets, k_offsets[:, -1:] + k_text], -1)
        keep = torch.cat([keep, keep.new_ones(groups, keep.shape[1], 1)], -1)
    if q_text:
        q_offsets = torch.cat([q_offsets, q_offsets[:, -1:] + q_text], -1)
        keep = torch.cat([keep, keep.new_ones(groups, 1, keep.shape[-1])], 1)
    plan = ClusterPlan(batch, heads, q_len, k_len, q_image, k_image, q_perm, k_perm, q_offsets, k_offsets, keep,
                       scale=scale, q_labels=q_labels)
    keys, values = plan.order_keys(key), plan.order_keys(value)
    if key_bias is not None:
        plan.key_bias = plan.order_key_bias(key_bias)
    if config.stand_ins:
        image_keys = image_k.shape[1]
        plan.stand_ins = pooling.segment_pool(keys[:, :image_keys], values[:, :image_keys], image_offsets,
                                              None if plan.key_bias is None else plan.key_bias[:, :image_keys])
    return plan, keys, values, (q_centroids, k_centroids)
