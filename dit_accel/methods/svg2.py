"""SVG2 semantic-permutation sparse attention (configuration; the technique is its own issue)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AccelerationConfig, check_range


@dataclass
class SVG2Config(AccelerationConfig):
    """k-means on Q and K per head, cluster pairs kept by top-p of centroid attention.

    Args:
        top_p: attention mass of key clusters kept per query cluster; 1.0 keeps every pair.
        query_clusters / key_clusters: k-means cluster counts per head.
        kmeans_iters_first / kmeans_iters_next: k-means iterations at a layer's first sparse call,
            and warm-started iterations at later calls.
        min_key_cluster_ratio: key clusters always kept per query cluster.
        dense_first_blocks: fraction of blocks (from the first) kept dense.
        dense_warmup: fraction of steps (from the first) kept dense.
    """

    top_p: float = 0.9
    query_clusters: int = 100
    key_clusters: int = 500
    kmeans_iters_first: int = 50
    kmeans_iters_next: int = 2
    min_key_cluster_ratio: float = 0.1
    dense_first_blocks: float = 0.0
    dense_warmup: float = 0.2

    resources = frozenset({"attention"})
    name = "svg2"

    def validate(self) -> None:
        check_range(self, "top_p", 0.0, 1.0, low_open=True)
        check_range(self, "query_clusters", 1, 1 << 20)
        check_range(self, "key_clusters", 1, 1 << 20)
        check_range(self, "kmeans_iters_first", 1, 10_000)
        check_range(self, "kmeans_iters_next", 0, 10_000)
        check_range(self, "min_key_cluster_ratio", 0.0, 1.0)
        check_range(self, "dense_first_blocks", 0.0, 1.0)
        check_range(self, "dense_warmup", 0.0, 1.0)

    @classmethod
    def keep_all(cls) -> "SVG2Config":
        return cls(top_p=1.0, min_key_cluster_ratio=1.0)
