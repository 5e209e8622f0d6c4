"""SVG2 semantic-permutation sparse attention (configuration; the technique is its own issue)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import AccelerationConfig, Stage, param
from ..runtime.registry import register_config


@dataclass(frozen=True)
class SVG2Config(AccelerationConfig):
    """k-means on Q and K per head, cluster pairs kept by top-p of centroid attention."""

    top_p: float = param(0.9, "attention mass of key clusters kept per query cluster; 1.0 keeps every pair",
                         low=0.0, high=1.0, low_open=True)
    query_clusters: int = param(100, "k-means clusters of the queries, per head", low=1, high=1 << 20)
    key_clusters: int = param(500, "k-means clusters of the keys, per head", low=1, high=1 << 20)
    kmeans_iters_first: int = param(50, "k-means iterations at a layer's first sparse call", low=1, high=10_000)
    kmeans_iters_next: int = param(2, "warm-started k-means iterations at later calls", low=0, high=10_000)
    min_key_cluster_ratio: float = param(0.1, "fraction of key clusters always kept per query cluster",
                                         low=0.0, high=1.0)
    dense_first_blocks: float = param(0.0, "fraction of blocks (from the first) kept dense", low=0.0, high=1.0)
    dense_warmup: float = param(0.2, "fraction of steps (from the first) kept dense", low=0.0, high=1.0)

    name = "svg2"

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.ATTENTION_KERNEL})

    @classmethod
    def keep_all(cls) -> "SVG2Config":
        return cls(top_p=1.0, min_key_cluster_ratio=1.0)


# no technique yet: plans name it, and applying it says so
register_config(SVG2Config, name=SVG2Config.name, stages=SVG2Config.stages, summary="SVG2 sparse attention: k-means permutation, top-p cluster pairs")
