"""FlexDiT (token density) and DyDiT (width, MLP tokens) on this machine, in one run.

(a) The trained reference image model (SD3-class, 256 tokens, CFG 4, 20 steps): dense, FlexDiT and
    DyDiT at two budgets each (their presets), FlexDiT + DyDiT, DyDiT stacked with diffusers'
    FirstBlockCache and MagCache (MagCache calibrated on the first batch), and DyDiT's width at one setting
    with heads and channel groups chosen by a calibration file (16 captions other than the test
    ones), by the data-free weight-norm default, and at random. Over `--captions` test captions in
    batches of 8, every plan runs each batch in turn after dense, so drift hits all alike: speedup
    is total dense time over total plan time; PSNR/SSIM vs dense, the offline judge's caption
    accuracy and the reference FID (judge features) against real procedural images.
(b) A medium random-weight PixArt-shaped transformer (4 blocks, 6 heads of 64, 4,096 image tokens,
    5 steps, CFG): wall clock against the ledger's FLOPs, and how much of the FLOPs speedup the
    wall clock reaches.

    python -m benchmarks.token_density --threads 2 --json benchmarks/figures/token_density.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from diffusers.hooks import MagCacheConfig

import dit_accel
from dit_accel.bench.common import in_turn, markdown_table, medians, start, timed
from dit_accel.techniques.dydit import save_calibration
from dit_accel.metrics import judge as judges
from dit_accel.metrics import procedural
from dit_accel.metrics.quality import psnr, ssim
from dit_accel.plan_spec import parse_plan
from dit_accel.testing import medium_pipeline
from dit_accel.testing.reference import reference_call_kwargs, reference_pipeline

BATCH = 8
#: the width at which calibrated, weight-norm and random choices of heads and groups are compared
EQUAL_WIDTH = 0.5
#: random choices of heads and groups at that width
RANDOM_DRAWS = 3


def _plans(calibration: str, random_calibrations: list[str], magcache) -> dict[str, list]:
    flex, dydit = dit_accel.FlexDiTConfig, dit_accel.DyDiTConfig
    width = dict(width_ratio=EQUAL_WIDTH, max_width_ratio=1.0, token_ratio=1.0)
    balanced = dydit.preset("balanced", calibration=calibration)
    return {
        **{f"FlexDiT {name}": [flex.preset(name)] for name in ("quality", "fast")},
        **{f"DyDiT {name}": [dydit.preset(name, calibration=calibration)] for name in ("quality", "fast")},
        "FlexDiT quality + DyDiT balanced": [flex.preset("quality"), balanced],
        "DyDiT balanced + FirstBlockCache 0.12": [balanced, *parse_plan("fbcache:threshold=0.12")],
        "DyDiT balanced + MagCache 0.06": [balanced, magcache],
        "FirstBlockCache 0.12 (for scale)": parse_plan("fbcache:threshold=0.12"),
        f"DyDiT width {EQUAL_WIDTH} calibrated": [dydit(**width, calibration=calibration)],
        f"DyDiT width {EQUAL_WIDTH} weight norms": [dydit(**width)],
        **{f"DyDiT width {EQUAL_WIDTH} random {i}": [dydit(**width, calibration=random)]
           for i, random in enumerate(random_calibrations)},
    }


def _calibrations(pipe, folder: Path, seed: int) -> tuple[str, list[str]]:
    """A calibration on 16 captions that are not test captions, and `RANDOM_DRAWS` files of the same
    shape whose diagonal Gram matrices rank heads and groups at random."""
    _, scenes = procedural.image_batch(16, seed + 1000)
    call = reference_call_kwargs("image", prompt=[s.caption for s in scenes],
                                 generator=torch.Generator().manual_seed(seed + 1000))
    calibration = folder / "reference_image_dydit.safetensors"
    dit_accel.calibrate(pipe, dit_accel.DyDiTConfig(), path=str(calibration), **call)
    from safetensors.torch import load_file

    generator = torch.Generator().manual_seed(seed)
    grams = load_file(str(calibration))
    randoms = []
    for draw in range(RANDOM_DRAWS):
        path = folder / f"random{draw}.safetensors"
        save_calibration(path, {k: torch.diag_embed(torch.rand(v.shape[:2], generator=generator))
                                for k, v in grams.items()}, pipe.transformer, {"random": True})
        randoms.append(str(path))
    return str(calibration), randoms


def reference_image(captions: int, seed: int, folder: Path) -> list[dict]:
    pipe = reference_pipeline("image")
    pipe.set_progress_bar_config(disable=True)
    real, scenes = procedural.image_batch(captions, seed)
    reference_real, _ = procedural.image_batch(captions, seed + 1)
    call = reference_call_kwargs("image", output_type="pt")
    first = {**call, "prompt": [s.caption for s in scenes[:BATCH]], "generator": torch.Generator().manual_seed(seed)}
    magcache = dit_accel.calibrate(pipe, MagCacheConfig(threshold=0.06, max_skip_steps=2, calibrate=True), **first)
    members = _plans(*_calibrations(pipe, folder, seed), magcache)
    timed(pipe, {**call, "prompt": [scenes[0].caption] * BATCH, "num_inference_steps": 2}, [], seed)  # warm-up
    seconds = {label: 0.0 for label in ["dense", *members]}
    outputs: dict[str, list[torch.Tensor]] = {label: [] for label in seconds}
    flops = {}
    for offset in range(0, captions, BATCH):
        batch = {**call, "prompt": [s.caption for s in scenes[offset:offset + BATCH]]}
        for label, rounds in in_turn(pipe, batch, members, 1, seed + offset).items():
            seconds[label] += rounds[0].seconds
            outputs[label].append(rounds[0].output)
            flops[label] = rounds[0].flops_ratio
    judge = judges.load_judge()
    dense = torch.cat(outputs["dense"])
    rows = []
    for label, parts in outputs.items():
        samples = torch.cat(parts)
        rows.append({"plan": label, "seconds": seconds[label], "speedup": seconds["dense"] / seconds[label],
                     "flops_ratio": flops[label], "psnr": None if label == "dense" else psnr(samples, dense),
                     "ssim": ssim(samples, dense), "caption_accuracy": judges.caption_accuracy(judge, samples, scenes)["all"],
                     "reference_fid": judges.reference_fid(judge, samples, reference_real)})
    rows.append({"plan": "real images (for scale)", "caption_accuracy": judges.caption_accuracy(judge, real, scenes)["all"],
                 "reference_fid": judges.reference_fid(judge, real, reference_real)})
    return rows


def medium_pixart(repeats: int) -> list[dict]:
    pipe = medium_pipeline("pixart")
    steps = 5
    call = dict(prompt="a red ball", height=512, width=512, num_inference_steps=steps, guidance_scale=4.5,
                max_sequence_length=32, clean_caption=False, use_resolution_binning=False,
                output_type="latent")  # 64 x 64 tokens
    flex, dydit = dit_accel.FlexDiTConfig, dit_accel.DyDiTConfig
    members = {
        **{f"FlexDiT {name}": [flex.preset(name)] for name in ("quality", "fast")},
        **{f"DyDiT {name}": [dydit.preset(name)] for name in ("quality", "fast")},
        "FlexDiT balanced + DyDiT balanced": [flex.preset("balanced"), dydit.preset("balanced")],
    }
    rows = medians(in_turn(pipe, call, members, repeats, 0))
    for row in rows:
        row["of_flops_speedup"] = row["speedup"] * row["flops_ratio"]
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the medium model")
    parser.add_argument("--captions", type=int, default=64, help="test captions on the reference image model")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip", choices=["reference", "medium"], action="append", default=[])
    parser.add_argument("--json", type=Path, help="also write every row here")
    args = parser.parse_args(argv)
    print(start(args.threads) + "\n", flush=True)
    results: dict[str, object] = {}
    with tempfile.TemporaryDirectory() as folder:
        if "reference" not in args.skip:
            results["reference_image"] = rows = reference_image(args.captions, args.seed, Path(folder))
            print(f"## (a) reference image model, {args.captions} captions in batches of {BATCH}, CFG 4, 20 steps\n\n"
                  + markdown_table(rows, [
                      ("plan", "plan", ""), ("seconds", "time (s)", ".1f"), ("speedup", "speedup", ".2f"),
                      ("flops_ratio", "FLOPs ratio", ".3f"), ("psnr", "PSNR (dB)", ".1f"), ("ssim", "SSIM", ".3f"),
                      ("caption_accuracy", "caption acc.", ".3f"), ("reference_fid", "reference FID", ".2f")]) + "\n",
                  flush=True)
        if "medium" not in args.skip:
            results["medium_pixart"] = rows = medium_pixart(args.repeats)
            print(f"## (b) medium random-weight PixArt, 4,096 tokens, 5 steps, CFG, medians of {args.repeats}\n\n"
                  + markdown_table(rows, [
                      ("plan", "plan", ""), ("seconds", "time (s)", ".2f"), ("speedup", "speedup", ".2f"),
                      ("flops_ratio", "FLOPs ratio", ".3f"), ("of_flops_speedup", "wall / FLOPs speedup", ".2f")]) + "\n",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
