"""Batched Euclidean k-means for attention heads: one clustering per (sample, head), in torch.

SVG2 clusters the queries and the keys of every head at every sparse call. Points come as
(G, N, D) (G = batch * heads), centroids as (G, K, D). A first call starts from K evenly spaced
points of each group; later calls warm-start from the centroids a layer kept, so two iterations suffice. An empty
cluster keeps its previous centroid.
"""

from __future__ import annotations

import torch


def assign(points: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(G, N) index of each point's nearest centroid."""
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 does not change the argmin
    distances = centroids.pow(2).sum(-1).unsqueeze(1) - 2 * points @ centroids.transpose(1, 2)
    return distances.argmin(-1)


def _flat(labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """Labels numbered across groups: group g's cluster c is g * clusters + c."""
    return (labels + torch.arange(labels.shape[0], device=labels.device).unsqueeze(1) * clusters).reshape(-1)


def sizes_of(labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """(G, K) points per cluster."""
    return torch.bincount(_flat(labels, clusters), minlength=labels.shape[0] * clusters).view(-1, clusters)


def update(points: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The mean of each cluster's points; an empty cluster keeps its centroid."""
    groups, clusters, dim = centroids.shape
    sums = torch.zeros(groups * clusters, dim, dtype=points.dtype, device=points.device)
    sums.index_add_(0, _flat(labels, clusters), points.reshape(-1, dim))
    sizes = sizes_of(labels, clusters)
    means = sums.view(groups, clusters, dim) / sizes.clamp(min=1).unsqueeze(-1).to(points.dtype)
    return torch.where(sizes.unsqueeze(-1) > 0, means, centroids)


def kmeans(points: torch.Tensor, clusters: int, iterations: int, centroids: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels (G, N), centroids (G, K, D), sizes (G, K)) after `iterations` Lloyd steps.

    Without `centroids`, each group starts from `clusters` of its own points at evenly spaced
    positions (`clusters` <= N): for image tokens a spread over the grid, and the same whatever else
    is in the batch, so a prompt clusters alike alone and batched."""
    groups, count, _ = points.shape
    if clusters > count:
        raise ValueError(f"{clusters} clusters for {count} points")
    points = points.float()
    if centroids is None:
        start = torch.linspace(0, count - 1, clusters, device=points.device).round().long()
        centroids = points[:, start]
    centroids = centroids.float()
    labels = assign(points, centroids)
    for _ in range(iterations):
        centroids = update(points, labels, centroids)
        labels = assign(points, centroids)
    return labels, centroids, sizes_of(labels, clusters)


def cluster_permutation(labels: torch.Tensor, clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(permutation (G, N) that makes every cluster contiguous, cluster offsets (G, K + 1))."""
    permutation = labels.argsort(dim=-1, stable=True)
    sizes = sizes_of(labels, clusters)
    offsets = torch.cat([sizes.new_zeros(sizes.shape[0], 1), sizes.cumsum(-1)], -1)
    return permutation, offsets
