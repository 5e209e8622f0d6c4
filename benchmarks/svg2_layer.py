"""One SVG2 attention layer on this machine: dense SDPA against SVG2's cluster kernels.

Inputs are synthetic with the structure SVG2 exploits: every token belongs to one of `--topics`
topics, and queries attend mostly to the keys of their own topic (q, k = a * topic center + noise), so
that top-p keeps a fraction of the pairs that the `--top-p` values move. SVG2 plans as it does in a
layer's warm call (`svg2.plan_clusters`: k-means from the previous call's centroids, 2 iterations;
kept pairs, permutations, stand-ins), then each kernel runs the plan:

- `torch` (the CPU's kernel), and `flex` compiled (its first call, the compile, timed apart), each on
  the plan SVG2 makes for it (flex: key clusters of its tile's 128 tokens, so its density differs);
- "planning": the warm call's k-means and plan building for `torch`, what SVG2 adds to its kernel.

Times are medians of `--repeats` rounds that run dense and each kernel in turn, on the wall clock or
(`--clock cpu`, with one thread) this process's CPU time, which other processes sharing the cores move
far less. "density" is the pairs
a plan attends (kept pairs and stand-ins) over the dense ones; "of ideal" is speedup x density (1.0:
time falls as the pairs do); flex computes whole 128 x 128 tiles ("flex tiles": their pairs over the
dense ones).

    python -m benchmarks.svg2_layer --threads 2 --tokens 16384 --heads 2 --head-dim 64 --json /tmp/svg2_layer.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dit_accel
from dit_accel.attention.kernels import clusters
from dit_accel.bench.common import markdown_table, median_seconds_in_turn, seconds
from dit_accel.machine import machine
from dit_accel.techniques.svg2 import plan_clusters


def inputs(tokens: int, heads: int, dim: int, topics: int, strength: float, seed: int = 0):
    """(query, key, value) (1, heads, tokens, dim): tokens of random topics, q and k near their topic's
    center (`strength` scales the centers: the logit margin of a query's own topic is about
    strength^2 * sqrt(dim))."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.randn(heads, topics, dim, generator=generator)
    topic = torch.randint(0, topics, (heads, tokens), generator=generator)
    at = centers.gather(1, topic.unsqueeze(-1).expand(-1, -1, dim))
    noise = lambda: torch.randn(heads, tokens, dim, generator=generator)  # noqa: E731
    return (strength * at + noise()).unsqueeze(0), (strength * at + noise()).unsqueeze(0), noise().unsqueeze(0)


#: how times are read: the wall clock, or this process's CPU time (steadier on a shared machine, where
#: other processes take turns on the cores; meaningful with one thread)
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def _plans(config, query, key, value, key_tokens):
    """(clusters, warm-call planning, its plan, permuted q/k/v) for a kernel asking `key_tokens` per key cluster."""
    whole = slice(0, query.shape[2])
    counts = config.clusters_for(query.shape[2], key.shape[2], key_tokens)
    # a layer's cold call, then what its warm calls do (2 iterations from the kept centroids)
    _, _, _, warm = plan_clusters(config, query, key, value, None, None, whole, whole, counts, 20)

    def planning():
        return plan_clusters(config, query, key, value, None, None, whole, whole, counts, 2, warm)

    plan, keys, values, _ = planning()
    return counts, planning, plan, (plan.order_queries(query), keys, values)


def measure(args, top_p: float) -> dict:
    query, key, value = inputs(args.tokens, args.heads, args.head_dim, args.topics, args.strength)
    config = dit_accel.SVG2Config(top_p=top_p)
    torch_kernel = clusters.cluster_kernel("torch", query.device)
    flex_kernel = clusters.cluster_kernel("flex", query.device)
    counts, planning, plan, ordered = _plans(config, query, key, value, torch_kernel.key_cluster_tokens)
    flex_counts, _, flex_plan, flex_ordered = _plans(config, query, key, value, flex_kernel.key_cluster_tokens)
    clock = CLOCK[args.clock]
    compile_s = seconds(lambda: flex_kernel.run(*flex_ordered, flex_plan), clock)
    runs = {"dense": lambda: F.scaled_dot_product_attention(query, key, value),
            "planning": planning,
            "torch": lambda: torch_kernel.run(*ordered, plan),
            "flex": lambda: flex_kernel.run(*flex_ordered, flex_plan)}
    median = median_seconds_in_turn(runs, args.repeats, clock)
    density, flex_density = float(torch_kernel.run.work(plan)), float(clusters.TorchClusters.work(flex_plan))
    row = {"tokens": args.tokens, "heads": args.heads, "head_dim": args.head_dim, "top_p": top_p,
           "query_clusters": counts[0], "key_clusters": counts[1], "density": density,
           "flex_key_clusters": flex_counts[1], "flex_density": flex_density,
           "flex_tiles": float(flex_kernel.run.work(flex_plan)),
           "dense_s": median["dense"], "planning_s": median["planning"], "flex_compile_s": compile_s}
    for name, kept in (("torch", density), ("flex", flex_density)):
        row[f"{name}_s"] = median[name]
        row[f"{name}_speedup"] = median["dense"] / median[name]
        row[f"{name}_of_ideal"] = median["dense"] / median[name] * kept
    row["torch_with_planning_speedup"] = median["dense"] / (median["torch"] + median["planning"])
    reference = clusters.reference(*ordered, plan)
    assert float((torch_kernel.run(*ordered, plan) - reference).abs().max()) < 1e-3
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--topics", type=int, default=64)
    parser.add_argument("--strength", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, nargs="+", default=[0.5, 0.9])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCK), default="wall")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(args, top_p) for top_p in args.top_p]
    print(f"{machine('cpu')['name']}, {args.threads} threads, {args.clock} clock\n")
    print(markdown_table(rows, [
        ("tokens", "tokens", "d"), ("top_p", "top-p", ".1f"), ("density", "density", ".3f"),
        ("dense_s", "dense (s)", ".3f"), ("torch_s", "torch (s)", ".3f"), ("torch_speedup", "speedup", ".2f"),
        ("torch_of_ideal", "of ideal", ".2f"), ("planning_s", "planning (s)", ".3f"),
        ("torch_with_planning_speedup", "with planning", ".2f"), ("flex_density", "flex density", ".3f"),
        ("flex_tiles", "flex tiles", ".3f"), ("flex_s", "flex compiled (s)", ".3f"),
        ("flex_speedup", "flex speedup", ".2f"), ("flex_of_ideal", "flex of ideal", ".2f"),
        ("flex_compile_s", "flex first call (s)", ".1f")]))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine("cpu"), "threads": args.threads, "clock": args.clock,
                                         "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
