"""Batched Euclidean k-means for attention heads: one clustering per (sample, head), in torch.

SVG2 clusters the queries and the keys of every head at every sparse call. Points come as
(G, N, D) (G = batch * heads), centroids as (G, K, D). A first call starts from K evenly spaced
points of each group; later calls warm-start from the centroids a layer kept, so two iterations
suffice. An empty cluster keeps its previous centroid.

Sized for 33k-119k tokens on a GPU: the (G, N, K) distances exist a chunk of points at a time
(`ASSIGN_ELEMENTS`), their GEMM runs in the points' own dtype (bf16 where the model runs in bf16,
TF32 where the user enabled it), centroids and their sums stay fp32, and cluster sizes come from
`scatter_add_` (a `bincount` drains a CUDA stream twice and breaks a compiled graph). No host sync.
"""

from __future__ import annotations

import torch

#: elements of one chunk's (G, points, K) distances in `assign`: 64 MiB of fp32
ASSIGN_ELEMENTS = 1 << 24


def assign(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(G, N) index of each point's nearest centroid; `centroids` fp32, the GEMM in the points' dtype."""
    groups, count, _ = points.shape
    clusters = centroids.shape[1]
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin
    norms = centroids.pow(2).sum(-1).unsqueeze(1)  # (G, 1, K) fp32
    weights = centroids.to(points.dtype).transpose(1, 2)
    rows = max(1, ASSIGN_ELEMENTS // max(1, groups * clusters))
    labels = torch.empty(groups, count, dtype=torch.long, device=points.device)
    for start in range(0, count, rows):  # chunks of points, not clusters: a bounded count per shape
        chunk = points[:, start:start + rows]
        if points.dtype == torch.float32:
            distances = torch.baddbmm(norms, chunk, weights, alpha=-2)
        else:  # the GEMM in bf16/fp16, its products combined in fp32
            distances = norms - 2 * torch.bmm(chunk, weights).float()
        labels[:, start:start + rows] = distances.argmin(-1)
    return labels


def _flat(labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """Labels numbered across groups: group g's cluster c is g * clusters + c."""
    return (labels + torch.arange(labels.shape[0], device=labels.device).unsqueeze(1) * clusters).reshape(-1)


def sizes_of(labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """(G, K) points per cluster (int64), by `scatter_add_`: no host sync."""
    groups = labels.shape[0]
    sizes = torch.zeros(groups, clusters, dtype=torch.long, device=labels.device)
    return sizes.scatter_add_(1, labels, torch.ones_like(labels))


def update(points: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor,
           sizes: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 mean of each cluster's points; an empty cluster keeps its centroid."""
    groups, clusters, dim = centroids.shape
    sizes = sizes_of(labels, clusters) if sizes is None else sizes
    sums = torch.zeros(groups * clusters, dim, dtype=torch.float32, device=points.device)
    flat = _flat(labels, clusters).view(groups, -1)
    rows = max(1, ASSIGN_ELEMENTS // max(1, groups * dim))  # fp32 copies of the points, a chunk at a time
    for start in range(0, points.shape[1], rows):
        sums.index_add_(0, flat[:, start:start + rows].reshape(-1),
                        points[:, start:start + rows].reshape(-1, dim).float())
    means = sums.view(groups, clusters, dim) / sizes.clamp(min=1).unsqueeze(-1)
    return torch.where(sizes.unsqueeze(-1) > 0, means, centroids)


def kmeans(points: torch.Tensor, clusters: int, iterations: int, centroids: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels (G, N), centroids (G, K, D) fp32, sizes (G, K)) after `iterations` Lloyd steps.

    Without `centroids`, each group starts from `clusters` of its own points at evenly spaced
    positions (`clusters` <= N): for image tokens a spread over the grid, and the same whatever else
    is in the batch, so a prompt clusters alike alone and batched."""
    groups, count, _ = points.shape
    if clusters > count:
        raise ValueError(f"{clusters} clusters for {count} points")
    if centroids is None:
        start = torch.linspace(0, count - 1, clusters, device=points.device).round().long()
        centroids = points[:, start]
    centroids = centroids.float()
    labels = assign(points, centroids)
    sizes = sizes_of(labels, clusters)
    for _ in range(iterations):
        centroids = update(points, labels, centroids, sizes)
        labels = assign(points, centroids)
        sizes = sizes_of(labels, clusters)
    return labels, centroids, sizes


def cluster_permutation(labels: torch.Tensor, sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(permutation (G, N) that makes every cluster contiguous, cluster offsets (G, K + 1)) from the
    labels and their (G, K) sizes (`kmeans`'s third result)."""
    permutation = labels.argsort(dim=-1, stable=True)
    offsets = torch.cat([sizes.new_zeros(sizes.shape[0], 1), sizes.cumsum(-1)], -1)
    return permutation, offsets
