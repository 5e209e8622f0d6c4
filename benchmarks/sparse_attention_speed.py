"""SVG2 and proxy attention end to end on the trained reference video model, in one run: dense, the
techniques' defaults and presets, and stacks with RAS and diffusers' MagCache (4 captions, CFG 4, 20
steps), with PSNR/SSIM vs dense and the judge's caption and motion accuracy. Times are medians of
repetitions run in turn (dense, plan, dense, plan, ...).

One attention layer: `benchmarks/svg2_layer.py` and `benchmarks/proxy_layer_speed.py`; a medium
random-weight Wan: `dit-accel bench --model medium:wan`.

    python -m benchmarks.sparse_attention_speed --threads 2 --json benchmarks/figures/sparse_attention.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from diffusers.hooks import MagCacheConfig

import dit_accel
from dit_accel.bench.common import in_turn, markdown_table, medians, start, timed
from dit_accel.metrics import judge as judges
from dit_accel.metrics import procedural
from dit_accel.metrics.quality import channels_first, psnr, ssim
from dit_accel.testing.reference import reference_call_kwargs, reference_pipeline

def _density(run) -> float:
    calls = [c for s in run.report["steps"] for c in s["calls"] if "attention_density" in c] if run.report else []
    return statistics.mean(c["attention_density"] for c in calls) if calls else 1.0


def _compare(pipe, call: dict, members: dict[str, list], repeats: int, seed: int) -> tuple[list[dict], dict]:
    runs = in_turn(pipe, call, members, repeats, seed)
    rows = medians(runs)
    for row in rows:
        row["density"] = _density(runs[row["plan"]][-1])
    return rows, {label: channels_first(rounds[-1].output) for label, rounds in runs.items()}


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
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args(argv)
    print(f"{start(args.threads)}, medians of {args.repeats}\n", flush=True)
    results: dict[str, object] = {}
    results["reference_video"] = rows = reference_video(args.repeats, args.videos, args.seed)
    print(f"## reference video model, {args.videos} captions, CFG 4, 20 steps\n\n" + markdown_table(rows, [
        ("plan", "plan", ""), ("seconds", "time (s)", ".2f"), ("speedup", "speedup", ".2f"),
        ("flops_ratio", "FLOPs ratio", ".3f"), ("density", "attention density", ".2f"),
        ("psnr", "PSNR (dB)", ".1f"), ("ssim", "SSIM", ".3f"), ("caption_accuracy", "caption acc.", ".2f"),
        ("motion_accuracy", "motion acc.", ".2f")]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
