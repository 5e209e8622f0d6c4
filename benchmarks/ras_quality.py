"""RAS on the trained reference models: speed and quality vs dense, next to cache-dit's DBCache.

Every plan generates the same prompts with the same seeds in one process, after one untimed
warm-up, so the speedups are side by side. Quality is measured against the dense samples
(PSNR, SSIM) and against the captions (the offline judge's caption accuracy). DBCache rows
appear when `cache-dit` is installed (`pip install -e ".[bench]"`).

    python -m dit_accel.benchmarks.ras_quality --kind image --kind video
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch

import dit_accel
from dit_accel.benchmarks.common import start
from dit_accel.metrics import judge as judges
from dit_accel.metrics.quality import psnr, ssim
from dit_accel.metrics import procedural
from dit_accel.testing.reference import generate, reference_call_kwargs, reference_pipeline


@contextlib.contextmanager
def ras_plan(pipe, ratio: float, steps: int, report: dict):
    handle = dit_accel.apply(pipe, dit_accel.RASConfig.for_steps(steps, sample_ratio=ratio))
    try:
        yield
        report["flops_ratio"] = handle.report()["flops_ratio"]
    finally:
        handle.remove()


@contextlib.contextmanager
def dbcache_plan(pipe, threshold: float, warmup: int, report: dict):
    import cache_dit

    cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=warmup, residual_diff_threshold=threshold))
    try:
        yield
    finally:
        cache_dit.disable_cache(pipe)


@contextlib.contextmanager
def dense_plan(pipe, report: dict):
    handle = dit_accel.apply(pipe)
    try:
        yield
        report["flops_ratio"] = handle.report()["flops_ratio"]
    finally:
        handle.remove()


def plans(pipe, steps: int, ratios: list[float], thresholds: list[float]):
    """(label, context factory) for dense, each RAS ratio and each DBCache threshold."""
    yield "dense", lambda r: dense_plan(pipe, r)
    for ratio in ratios:
        yield f"RAS {ratio:.2f}", lambda r, ratio=ratio: ras_plan(pipe, ratio, steps, r)
    try:
        import cache_dit  # noqa: F401
    except ImportError:
        return
    warmup = dit_accel.RASConfig.for_steps(steps).warmup_steps
    for threshold in thresholds:
        yield f"DBCache F1B0 r={threshold:g}", lambda r, t=threshold: dbcache_plan(pipe, t, warmup, r)


def accuracy(judge, kind: str, samples: torch.Tensor, scenes) -> float:
    if kind == "image":
        return judges.caption_accuracy(judge, samples, scenes)["all"]
    return judges.video_caption_accuracy(judge, samples, scenes)["all"]


def bench(kind: str, count: int, seed: int, ratios: list[float], thresholds: list[float]) -> list[dict]:
    pipe = reference_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    steps = reference_call_kwargs(kind)["num_inference_steps"]
    _, scenes = (procedural.image_batch if kind == "image" else procedural.video_batch)(count, seed)
    prompts = [scene.caption for scene in scenes]
    judge = judges.load_judge()
    generate(pipe, kind, prompts[:1], seed=seed, num_inference_steps=2)  # warm-up
    rows, dense = [], None
    for label, plan in plans(pipe, steps, ratios, thresholds):
        row = {"plan": label, "flops_ratio": None}
        with plan(row):
            start = time.perf_counter()
            samples = generate(pipe, kind, prompts, seed=seed)
            row["seconds"] = time.perf_counter() - start
        dense = samples if dense is None else dense
        row.update(psnr=psnr(samples, dense) if samples is not dense else float("inf"), ssim=ssim(samples, dense),
                   caption_accuracy=accuracy(judge, kind, samples, scenes))
        row["speedup"] = rows[0]["seconds"] / row["seconds"] if rows else 1.0
        rows.append(row)
    return rows


def markdown(kind: str, rows: list[dict]) -> str:
    lines = [f"| {kind} plan | time (s) | speedup | FLOPs ratio | PSNR vs dense (dB) | SSIM | caption accuracy |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        flops = "-" if r["flops_ratio"] is None else f"{r['flops_ratio']:.3f}"
        lines.append(f"| {r['plan']} | {r['seconds']:.1f} | {r['speedup']:.2f}x | {flops} | {r['psnr']:.1f} | "
                     f"{r['ssim']:.3f} | {r['caption_accuracy']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", action="append", choices=["image", "video"])
    parser.add_argument("--count", type=int, default=16, help="prompts per kind")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.08, 0.16, 0.32])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    print(start(args.threads) + "\n")
    results = {}
    for kind in args.kind or ["image", "video"]:
        results[kind] = bench(kind, args.count, args.seed, args.ratios, args.thresholds)
        print(markdown(kind, results[kind]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
