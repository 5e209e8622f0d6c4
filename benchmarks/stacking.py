"""Composable plans on the trained reference models: RAS, diffusers' step caches, and the two stacked.

Part 1, quality and speed: dense / RAS / FirstBlockCache / RAS + FirstBlockCache / RAS + TaylorSeer /
RAS + MagCache on the reference image model (a batch of 8 captions, CFG 4, 20 steps) and the
reference video model (4 captions), on the same seeds: time, speedup, the ledger's FLOPs ratio, PSNR
and SSIM vs dense (torchmetrics).

Part 2, overhead: wall-clock speedup over FLOPs speedup (1.0 means the plan's time falls exactly as
its counted work does) at 256 tokens (image model) and 4,096 tokens (video model at 7 frames of
128x128), batch 1 and 8; plus the cost of a measure-only handle.

Every number is a median over repetitions run in turn (dense, plan, dense, plan, ...), so a drift of
the machine's speed hits all plans alike; speedups are medians of per-repetition ratios.

    python -m benchmarks.stacking --threads 2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Callable

import torch
from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

import dit_accel
from dit_accel.bench.common import in_turn, markdown_table, medians, start, timed
from dit_accel.metrics import procedural
from dit_accel.metrics.quality import channels_first, psnr, ssim
from dit_accel.testing.reference import reference_call_kwargs, reference_pipeline

STEPS = 20


def plans(pipe, kind: str, call: dict, steps: int) -> dict[str, Callable[[], list]]:
    """Plan label -> configs (built lazily: MagCache is calibrated on the benchmark's own call)."""
    ras = dit_accel.RASConfig.for_steps(steps, sample_ratio=0.5)
    threshold = 0.12 if kind == "image" else 0.1
    warmup = ras.warmup_steps
    taylorseer = TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=warmup, max_order=1,
                                       taylor_factors_dtype=torch.float32)

    def magcache():
        return [ras, dit_accel.calibrate(pipe, MagCacheConfig(threshold=0.06, max_skip_steps=2, calibrate=True),
                                         **call)]

    return {
        "RAS 0.5": lambda: [ras],
        f"FirstBlockCache {threshold}": lambda: [FirstBlockCacheConfig(threshold=threshold)],
        f"RAS 0.5 + FirstBlockCache {threshold}": lambda: [ras, FirstBlockCacheConfig(threshold=threshold)],
        "RAS 0.5 + TaylorSeer (every 2nd step)": lambda: [ras, taylorseer],
        "RAS 0.5 + MagCache 0.06": magcache,
    }


def quality(kind: str, count: int, repeats: int, seed: int) -> list[dict]:
    pipe = reference_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    _, scenes = (procedural.image_batch if kind == "image" else procedural.video_batch)(count, seed)
    call = reference_call_kwargs(kind, prompt=[s.caption for s in scenes], output_type="pt")
    timed(pipe, {**call, "num_inference_steps": 2}, [], seed)  # warm-up
    members = {label: make() for label, make in plans(pipe, kind, call, STEPS).items()}
    runs = in_turn(pipe, call, members, repeats, seed)
    dense = channels_first(runs["dense"][-1].output)
    rows = medians(runs)
    for row in rows:
        output = channels_first(runs[row["plan"]][-1].output)
        row.update(psnr=psnr(output, dense) if row["plan"] != "dense" else None, ssim=ssim(output, dense))
    return rows


def overhead(kind: str, batch: int, repeats: int, steps: int) -> list[dict]:
    """Wall-clock speedup / FLOPs speedup of each plan at this model's size, batch `batch`."""
    pipe = reference_pipeline(kind)
    pipe.set_progress_bar_config(disable=True)
    size = {} if kind == "image" else {"height": 128, "width": 128, "num_frames": 7}  # 4 x 32 x 32 tokens
    call = reference_call_kwargs(kind, prompt=["a large red circle moving right, blue plain background"] * batch,
                                 num_inference_steps=steps, output_type="latent", **size)
    timed(pipe, {**call, "num_inference_steps": 2}, [], 0)
    members = {"measure-only handle": []}
    members.update({label: make() for label, make in plans(pipe, kind, call, steps).items() if "MagCache" not in label})
    runs = in_turn(pipe, call, members, repeats, 0)
    return [{"model": kind, "batch": batch, "plan": label, "flops_ratio": runs[label][-1].flops_ratio,
             "speedup": statistics.median(r.speedup for r in runs[label]),
             "overhead_ratio": statistics.median(r.speedup * r.flops_ratio for r in runs[label])}
            for label in members]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=8, help="captions per image batch")
    parser.add_argument("--videos", type=int, default=4, help="captions per video batch")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip", choices=["quality", "overhead"], action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args(argv)
    print(f"{start(args.threads)}, {args.repeats} repetitions in turn, medians\n")
    results: dict[str, list[dict]] = {}
    if "quality" not in args.skip:
        for kind, count in (("image", args.images), ("video", args.videos)):
            results[kind] = quality(kind, count, args.repeats, args.seed)
            print(f"## {kind}: {count} captions per batch, CFG 4, {STEPS} steps\n")
            print(markdown_table(results[kind], [("plan", "plan", ""), ("seconds", "time (s)", ".2f"),
                                         ("speedup", "speedup", ".2f"), ("flops_ratio", "FLOPs ratio", ".3f"),
                                         ("psnr", "PSNR vs dense (dB)", ".1f"), ("ssim", "SSIM", ".3f")]) + "\n",
                  flush=True)
    if "overhead" not in args.skip:
        rows = []
        for kind, batch, steps in (("image", 1, STEPS), ("image", 8, STEPS), ("video", 1, STEPS), ("video", 8, 8)):
            rows += overhead(kind, batch, args.repeats if batch == 1 or kind == "image" else 2, steps)
        results["overhead"] = rows
        print("## overhead: wall-clock speedup / FLOPs speedup (image model 256 tokens, video model 4,096)\n")
        print(markdown_table(rows, [("model", "model", ""), ("batch", "batch", "d"), ("plan", "plan", ""),
                            ("flops_ratio", "FLOPs ratio", ".3f"), ("speedup", "speedup", ".2f"),
                            ("overhead_ratio", "speedup / FLOPs speedup", ".2f")]), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
