"""RAS's K/V cache in its three forms on this machine, side by side: "device" (the dense call's own K/V),
"fp8" (e4m3, a scale per sample and head) and "host" (host memory, prefetched block by block).

medium:wan (4 blocks, 6 heads of 64, 4 x 32 x 32 = 4,096 video tokens, 64 text tokens, no CFG, fp32) at
`RASConfig.for_steps(steps)`, ratio 0.5. Rounds run the forms in turn, so a drift of the machine's speed
hits all alike. Per form: the median transformer seconds, the median of the per-round ratios to
"device", the K/V cache's bytes at their peak (RAS's held bytes less its previous output), and the PSNR
of the output latents against "device"'s (peak: their range); for scale, the PSNR of "device" against
a dense run (what RAS itself changes). On a CPU "host" saves no memory and costs
two copies per attention and RAS step; it is there for GPUs.

    python -m benchmarks.ras_kv_storage --threads 2 [--steps 6] [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import dit_accel
from dit_accel.bench.common import markdown_table, start
from dit_accel.metrics.quality import psnr
from dit_accel.testing import medium_call_kwargs, medium_pipeline

FORMS = ("device", "fp8", "host")


def latents(pipe, call: dict, seed: int) -> torch.Tensor:
    return pipe(**{**call, "generator": torch.Generator().manual_seed(seed)}).frames


def generate(pipe, call: dict, kv_cache: str, seed: int) -> tuple[torch.Tensor, dict]:
    """One generation under RAS with its K/V cache in `kv_cache` form: the latents and the report."""
    config = dit_accel.RASConfig.for_steps(call["num_inference_steps"], kv_cache=kv_cache)
    with dit_accel.apply(pipe, config) as handle:
        return latents(pipe, call, seed), handle.report()


def forms_in_turn(steps: int, rounds: int, seed: int) -> tuple[list[dict], float]:
    """The rows, and the PSNR of "device" against dense."""
    pipe = medium_pipeline("wan")
    pipe.set_progress_bar_config(disable=True)
    call = medium_call_kwargs("wan", num_inference_steps=steps, output_type="latent")
    generate(pipe, {**call, "num_inference_steps": 2}, "device", seed)  # warm-up
    seconds: dict[str, list[float]] = {form: [] for form in FORMS}
    outputs, kv_bytes = {}, {}
    for _ in range(rounds):
        for form in FORMS:
            output, report = generate(pipe, call, form, seed)
            seconds[form].append(report["transformer_seconds"])
            outputs.setdefault(form, output)
            previous_output = output.numel() * pipe.transformer.dtype.itemsize  # one branch: no CFG
            kv_bytes[form] = report["state_bytes"]["RASConfig"] - previous_output
    device = outputs["device"]
    peak = float(device.max() - device.min())
    rows = [{"form": form, "transformer_s": statistics.median(seconds[form]), "rounds_s": seconds[form],
             "vs_device": statistics.median(s / d for s, d in zip(seconds[form], seconds["device"])),
             "kv_mib": kv_bytes[form] / 2 ** 20,
             "psnr_db": None if form == "device" else psnr(outputs[form], device, data_range=peak)}
            for form in FORMS]
    return rows, psnr(device, latents(pipe, call, seed), data_range=peak)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    where = start(args.threads)
    print(where + "\n", flush=True)
    rows, ras_psnr = forms_in_turn(args.steps, args.rounds, args.seed)
    print(f"## RAS K/V cache forms, medium:wan, {args.steps} steps, medians of {args.rounds} rounds\n\n"
          + markdown_table(rows, [("form", "kv_cache", ""), ("transformer_s", "transformer (s)", ".2f"),
                                  ("vs_device", "time vs device", ".2f"), ("kv_mib", "K/V (MiB)", ".1f"),
                                  ("psnr_db", "PSNR vs device (dB)", ".1f")])
          + f"\n\nfor scale, RAS itself (\"device\") against dense: {ras_psnr:.1f} dB")
    if args.json:
        args.json.write_text(json.dumps({"machine": where, "rows": rows, "ras_vs_dense_psnr_db": ras_psnr}, indent=1)
                             + "\n")


if __name__ == "__main__":
    main()
