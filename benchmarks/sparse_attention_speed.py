"""Sparse attention (SVG2, proxy) on this machine, in one run.

(a) Kernels: dense SDPA against SVG2's block-sparse kernel and proxy attention at 4k, 8k and 16k
    tokens. "real" inputs are the q/k/v of a middle block of the trained reference video model
    (7 x 16 x 16 tokens, 3 heads of 32), tiled over frames up to the length; "random" inputs are
    Gaussian with random cluster labels and random kept pairs at a set density. Each row gives the
    density computed, the time, the speedup over dense and its fraction of the ideal 1/density.
    (a') The same cluster-pair masks through compiled FlexAttention with a BlockMask.
(b) End to end on a medium random-weight Wan 2.1 (2 blocks, 6 heads of 64, 8,192 video tokens,
    5 steps, no CFG): dense / SVG2 / proxy / RAS / RAS + SVG2 / RAS + proxy.
(c) End to end on the trained reference video model (4 captions, CFG 4, 20 steps): the same plans,
    presets, and stacks with diffusers' MagCache, with PSNR/SSIM vs dense and the judge's caption
    and motion accuracy.

Times are medians of repetitions run in turn (dense, plan, dense, plan, ...).

    python -m benchmarks.sparse_attention_speed --threads 2 --json benchmarks/figures/sparse_attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.hooks import MagCacheConfig

import dit_accel
from dit_accel.attention import kmeans, proxy_kernel
from dit_accel.attention.kernels import clusters
from dit_accel.attention.kernels.dense import fused_cpu
from dit_accel.attention.kernels.windows import TorchWindows, WindowPlan
from dit_accel.bench.common import in_turn, markdown_table, medians, start, timed
from dit_accel.techniques.svg2 import kept_cluster_pairs
from dit_accel.metrics import judge as judges
from dit_accel.metrics import procedural
from dit_accel.metrics.quality import channels_first, psnr, ssim
from dit_accel.testing import medium_pipeline
from dit_accel.testing.reference import reference_call_kwargs, reference_pipeline

REFERENCE_GRID = (7, 16, 16)
#: proxy attention's kernel on CPU
PROXY = TorchWindows(fused_cpu)


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_qkv(block: int = 2, step: int = 10) -> tuple[torch.Tensor, ...]:
    """q, k, v (2, 3, 1792, 32) that one self-attention of the reference video model hands to SDPA
    (conditional and unconditional call of one step)."""
    pipe = reference_pipeline("video")
    pipe.set_progress_bar_config(disable=True)
    seen: list[tuple[torch.Tensor, ...]] = []
    sdpa = F.scaled_dot_product_attention

    def spy(query, key, value, *args, **kwargs):
        if query.shape[2] == key.shape[2] == 1792:
            seen.append((query.clone(), key.clone(), value.clone()))
        return sdpa(query, key, value, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        pipe(**reference_call_kwargs("video", output_type="latent"), generator=torch.Generator().manual_seed(0))
    finally:
        F.scaled_dot_product_attention = sdpa
    blocks = len(pipe.transformer.blocks)
    calls = [seen[(2 * step + branch) * blocks + block] for branch in (0, 1)]
    return tuple(torch.cat(parts) for parts in zip(*calls))


def _tile(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B, H, F*R*C, D) tokens of the reference grid repeated over frames up to `frames`."""
    f, r, c = REFERENCE_GRID
    grid = x.view(x.shape[0], x.shape[1], f, r * c, x.shape[-1])
    return grid[:, :, torch.arange(frames) % f].reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _cluster_plan(query, labels_q, labels_k, keep) -> clusters.ClusterPlan:
    batch, heads, length, _ = query.shape
    q_perm, q_offsets = kmeans.cluster_permutation(labels_q, kmeans.sizes_of(labels_q, keep.shape[1]))
    k_perm, k_offsets = kmeans.cluster_permutation(labels_k, kmeans.sizes_of(labels_k, keep.shape[2]))
    whole = slice(0, length)
    return clusters.ClusterPlan(batch, heads, length, length, whole, whole, q_perm, k_perm, q_offsets, k_offsets, keep)


def _svg2_kernel_rows(label, query, key, value, labels_q, labels_k, keep, dense_seconds, repeats) -> dict:
    """SVG2's CPU kernel (`torch`, without stand-ins) on one plan."""
    length = query.shape[2]
    plan = _cluster_plan(query, labels_q, labels_k, keep)
    q, k, v = plan.order_queries(query), plan.order_keys(key), plan.order_keys(value)
    density = float(clusters.TorchClusters.work(plan))
    kernel = clusters.TorchClusters(fused_cpu)
    seconds = _median_time(lambda: kernel(q, k, v, plan), repeats)
    return {"kernel": "svg2 block-sparse (torch)", "inputs": label, "tokens": length, "density": density,
            "dense_s": dense_seconds, "seconds": seconds, "speedup": dense_seconds / seconds,
            "of_ideal": dense_seconds / seconds * density}


def kernels(repeats: int) -> list[dict]:
    real = reference_qkv()
    rows = []
    for frames in (16, 32, 64):  # 4,096 / 8,192 / 16,384 tokens
        inputs = {"real": tuple(_tile(x, frames) for x in real)}
        generator = torch.Generator().manual_seed(frames)
        inputs["random"] = tuple(torch.randn(inputs["real"][0].shape, generator=generator) for _ in range(3))
        for label, (query, key, value) in inputs.items():
            batch, heads, length, dim = query.shape
            dense_seconds = _median_time(lambda: F.scaled_dot_product_attention(query, key, value), repeats)
            groups = batch * heads
            q_clusters, k_clusters = dit_accel.SVG2Config().clusters_for(length, length)
            if label == "real":
                start = time.perf_counter()
                labels_q, centroids_q, _ = kmeans.kmeans(query.reshape(groups, length, dim), q_clusters, 20)
                labels_k, centroids_k, sizes_k = kmeans.kmeans(key.reshape(groups, length, dim), k_clusters, 20)
                kmeans_seconds = (time.perf_counter() - start) / 20 * 2  # per warm-started call (2 iterations)
                for top_p in (0.5, 0.7, 0.9):
                    keep = kept_cluster_pairs(centroids_q, centroids_k, sizes_k, dim ** -0.5, top_p, 1)
                    row = _svg2_kernel_rows(label, query, key, value, labels_q, labels_k, keep, dense_seconds,
                                            repeats)
                    rows.append({**row, "setting": f"top_p {top_p}", "kmeans_s": kmeans_seconds})
            else:
                labels_q = torch.randint(0, q_clusters, (groups, length), generator=generator)
                labels_k = torch.randint(0, k_clusters, (groups, length), generator=generator)
                for density in (0.1, 0.25, 0.5):
                    keep = torch.rand(groups, q_clusters, k_clusters, generator=generator) < density
                    keep[:, :, 0] = True
                    row = _svg2_kernel_rows(label, query, key, value, labels_q, labels_k, keep, dense_seconds,
                                            repeats)
                    rows.append({**row, "setting": f"kept {density}"})
            f, r, c = frames, REFERENCE_GRID[1], REFERENCE_GRID[2]
            coordinates = torch.stack(torch.meshgrid(torch.arange(f), torch.arange(r), torch.arange(c), indexing="ij"),
                                      -1).reshape(1, -1, 3)
            for local, size in (((1, 8, 8), (1, 2, 2)), ((1, 16, 16), (1, 4, 4)), ((2, 16, 16), (1, 2, 2))):
                plan = WindowPlan.of(proxy_kernel.place(coordinates, coordinates, (f, r, c), local, size))
                seconds = _median_time(lambda: PROXY(query, key, value, plan), repeats)
                density = plan.pairs(0) / (length * length)
                rows.append({"kernel": "proxy", "inputs": label, "tokens": length, "setting": f"{local}/{size}",
                             "density": density, "dense_s": dense_seconds, "seconds": seconds,
                             "speedup": dense_seconds / seconds, "of_ideal": dense_seconds / seconds * density})
            print(f"  kernels: {length} tokens, {label} done", flush=True)
    return rows


def flex_attention_check(repeats: int) -> list[dict]:
    """SVG2's cluster plans through compiled FlexAttention (`flex`: its BlockMask built from the plan,
    128-token tiles) against the `torch` kernel, 8,192 random tokens with random clusters."""
    batch, heads, length, dim, q_clusters, k_clusters = 2, 3, 8192, 32, 33, 108
    generator = torch.Generator().manual_seed(0)
    query, key, value = (torch.randn(batch, heads, length, dim, generator=generator) for _ in range(3))
    groups = batch * heads
    labels_q = torch.randint(0, q_clusters, (groups, length), generator=generator)
    labels_k = torch.randint(0, k_clusters, (groups, length), generator=generator)
    dense_seconds = _median_time(lambda: F.scaled_dot_product_attention(query, key, value), repeats)
    flex, torch_kernel = clusters.FlexClusters(), clusters.TorchClusters(fused_cpu)
    rows = []
    for density in (0.1, 0.25, 0.5):
        keep = torch.rand(groups, q_clusters, k_clusters, generator=generator) < density
        keep[:, :, 0] = True
        plan = _cluster_plan(query, labels_q, labels_k, keep)
        q, k, v = plan.order_queries(query), plan.order_keys(key), plan.order_keys(value)
        start = time.perf_counter()
        tiles = float(flex.work(plan))
        build = time.perf_counter() - start
        flex_s = _median_time(lambda: flex(q, k, v, plan), repeats)
        torch_s = _median_time(lambda: torch_kernel(q, k, v, plan), repeats)
        computed = float(clusters.TorchClusters.work(plan))
        rows.append({"density": computed, "blocks_computed": tiles, "dense_s": dense_seconds,
                     "block_mask_s": build, "flex_s": flex_s, "gathered_s": torch_s,
                     "flex_of_ideal": dense_seconds / flex_s * computed, "gathered_of_ideal": dense_seconds / torch_s * computed})
    return rows


def proxy_profile(repeats: int) -> dict:
    """Where proxy attention's time goes at 8,192 tokens, window (1, 16, 16), proxies (1, 4, 4): its two
    fused SDPA calls on their own against the whole kernel."""
    frames, (_, r, c) = 32, REFERENCE_GRID
    query, key, value = (torch.randn(2, 3, frames * r * c, 32) for _ in range(3))
    coordinates = torch.stack(torch.meshgrid(torch.arange(frames), torch.arange(r), torch.arange(c), indexing="ij"),
                              -1).reshape(1, -1, 3)
    plan = WindowPlan.of(proxy_kernel.place(coordinates, coordinates, (frames, r, c), (1, 16, 16), (1, 4, 4)))
    windows = plan.windows.locals
    local = [x.reshape(6, windows, -1, 32) for x in (query, key, value)]
    far_k, far_v = key[:, :, : plan.windows.proxies], value[:, :, : plan.windows.proxies]
    bias = torch.zeros(1, 1, 1, plan.windows.proxies).masked_fill(  # the proxies of each query's own window
        (plan.windows.q_local.unsqueeze(-1) == plan.windows.proxy_local).unsqueeze(1), -torch.inf)
    return {
        "total_s": _median_time(lambda: PROXY(query, key, value, plan), repeats),
        "local_sdpa_s": _median_time(lambda: F.scaled_dot_product_attention(*local), repeats),
        "proxy_sdpa_s": _median_time(lambda: F.scaled_dot_product_attention(query, far_k, far_v, attn_mask=bias),
                                     repeats),
        "dense_s": _median_time(lambda: F.scaled_dot_product_attention(query, key, value), repeats),
        "density": plan.pairs(0) / (frames * r * c) ** 2,
    }


def _density(run) -> float:
    calls = [c for s in run.report["steps"] for c in s["calls"] if "attention_density" in c] if run.report else []
    return statistics.mean(c["attention_density"] for c in calls) if calls else 1.0


def _compare(pipe, call: dict, members: dict[str, list], repeats: int, seed: int) -> tuple[list[dict], dict]:
    runs = in_turn(pipe, call, members, repeats, seed)
    rows = medians(runs)
    for row in rows:
        row["density"] = _density(runs[row["plan"]][-1])
    return rows, {label: channels_first(rounds[-1].output) for label, rounds in runs.items()}


def medium_wan(repeats: int) -> list[dict]:
    pipe = medium_pipeline("wan", num_layers=2, freq_dim=256)  # the medium Wan, 2 blocks
    steps = 5
    call = dict(prompt="a red ball", height=512, width=512, num_frames=29, num_inference_steps=steps,
                guidance_scale=1.0, max_sequence_length=32, output_type="latent")  # 8 x 32 x 32 tokens
    ras = dit_accel.RASConfig.for_steps(steps, sample_ratio=0.5)
    svg2, window = dit_accel.SVG2Config(), dit_accel.ProxyAttentionConfig(local_window=(1, 16, 16), proxy_window=(1, 4, 4))
    members = {"SVG2": [svg2], "proxy (1,16,16)/(1,4,4)": [window], "RAS 0.5": [ras], "RAS 0.5 + SVG2": [ras, svg2],
               "RAS 0.5 + proxy": [ras, window]}
    rows, _ = _compare(pipe, call, members, repeats, 0)
    return rows


def reference_video(repeats: int, count: int, seed: int) -> list[dict]:
    pipe = reference_pipeline("video")
    pipe.set_progress_bar_config(disable=True)
    _, scenes = procedural.video_batch(count, seed)
    call = reference_call_kwargs("video", prompt=[s.caption for s in scenes], output_type="pt")
    timed(pipe, {**call, "num_inference_steps": 2}, [], seed)
    steps = call["num_inference_steps"]
    ras = dit_accel.RASConfig.for_steps(steps, sample_ratio=0.5)
    magcache = dit_accel.calibrate(pipe, MagCacheConfig(threshold=0.06, max_skip_steps=2, calibrate=True), **call)
    svg2, window = dit_accel.SVG2Config, dit_accel.ProxyAttentionConfig
    members = {
        "SVG2 (defaults)": [svg2()], "SVG2 paper (no stand-ins)": [svg2(stand_ins=False)],
        "SVG2 quality": [svg2.preset("quality")], "proxy (defaults)": [window()],
        **{f"proxy {name}": [window.preset(name)] for name in window.presets},
        "RAS 0.5": [ras], "RAS 0.5 + SVG2 quality": [ras, svg2.preset("quality")],
        "RAS 0.5 + proxy balanced": [ras, window.preset("balanced")],
        "RAS 0.5 + MagCache 0.06": [ras, magcache],
        "RAS 0.5 + MagCache 0.06 + proxy balanced": [ras, magcache, window.preset("balanced")],
    }
    rows, outputs = _compare(pipe, call, members, repeats, seed)
    judge = judges.load_judge()
    for row in rows:
        samples = outputs[row["plan"]]
        accuracy = judges.video_caption_accuracy(judge, samples, scenes)
        row.update(psnr=psnr(samples, outputs["dense"]) if row["plan"] != "dense" else None,
                   ssim=ssim(samples, outputs["dense"]), caption_accuracy=accuracy["all"],
                   motion_accuracy=accuracy["motion"])
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--videos", type=int, default=4, help="captions per reference video batch")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip", choices=["kernels", "flex", "medium", "reference"], action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args(argv)
    print(f"{start(args.threads)}, medians of {args.repeats}\n", flush=True)
    results: dict[str, object] = {}
    if "kernels" not in args.skip:
        results["kernels"] = rows = kernels(args.repeats)
        print("## (a) kernels\n\n" + markdown_table(rows, [
            ("kernel", "kernel", ""), ("inputs", "inputs", ""), ("tokens", "tokens", "d"), ("setting", "setting", ""),
            ("density", "density", ".3f"), ("dense_s", "dense (s)", ".3f"), ("seconds", "sparse (s)", ".3f"),
            ("speedup", "speedup", ".2f"), ("of_ideal", "of ideal", ".2f"),
            ("kmeans_s", "k-means per call (s)", ".3f")]) + "\n", flush=True)
        results["proxy_profile"] = profile = proxy_profile(args.repeats)
        print("proxy profile (8,192 tokens): " + ", ".join(f"{k} {v:.4f}" for k, v in profile.items()) + "\n", flush=True)
    if "flex" not in args.skip:
        results["flex_attention"] = rows = flex_attention_check(args.repeats)
        print("## (a') compiled FlexAttention vs the torch kernel, 8,192 tokens, random clusters\n\n" + markdown_table(rows, [
            ("density", "density", ".3f"), ("blocks_computed", "128-blocks computed", ".2f"),
            ("dense_s", "dense (s)", ".3f"), ("block_mask_s", "BlockMask build (s)", ".2f"),
            ("flex_s", "FlexAttention (s)", ".3f"), ("gathered_s", "torch kernel (s)", ".3f"),
            ("flex_of_ideal", "flex of ideal", ".2f"), ("gathered_of_ideal", "torch kernel of ideal", ".2f")]) + "\n",
            flush=True)
    if "medium" not in args.skip:
        results["medium_wan"] = rows = medium_wan(args.repeats)
        print("## (b) medium random-weight Wan, 8,192 tokens, 5 steps\n\n" + markdown_table(rows, [
            ("plan", "plan", ""), ("seconds", "time (s)", ".2f"), ("speedup", "speedup", ".2f"),
            ("flops_ratio", "FLOPs ratio", ".3f"), ("density", "attention density", ".2f")]) + "\n", flush=True)
    if "reference" not in args.skip:
        results["reference_video"] = rows = reference_video(args.repeats, args.videos, args.seed)
        print(f"## (c) reference video model, {args.videos} captions, CFG 4, 20 steps\n\n" + markdown_table(rows, [
            ("plan", "plan", ""), ("seconds", "time (s)", ".2f"), ("speedup", "speedup", ".2f"),
            ("flops_ratio", "FLOPs ratio", ".3f"), ("density", "attention density", ".2f"),
            ("psnr", "PSNR (dB)", ".1f"), ("ssim", "SSIM", ".3f"), ("caption_accuracy", "caption acc.", ".2f"),
            ("motion_accuracy", "motion acc.", ".2f")]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
