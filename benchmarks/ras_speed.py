"""RAS speed benchmark: dense vs RAS at several ratios, side by side in one run, random weights.

Runs the denoising loop of a medium SD3 (image) and Wan (video) transformer with a
FlowMatchEuler scheduler, without text encoders or VAE, so the numbers are the transformer's.
Prints wall time, speedup, analytic FLOPs ratio and the mean cost of a RAS step relative to a
dense step. Random weights: the PSNR column only says the loop is sane, not that quality holds.

    python -m dit_accel.benchmarks.ras_speed --family sd3 --family wan
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, WanTransformer3DModel

import dit_accel
from dit_accel.benchmarks.common import start

MEDIUM = {
    # 4096 image tokens (latent 128x128, patch 2), 4 layers of hidden 384: the official RAS CPU comparison
    "sd3": dict(layers=4, hidden=384, heads=6, latent=(16, 1, 128, 128), text=77),
    # 4 latent frames x 32 x 32 tokens = 4096 video tokens
    "wan": dict(layers=4, hidden=384, heads=6, latent=(16, 4, 64, 64), text=64),
}


def build(family: str, spec: dict, seed: int = 0):
    torch.manual_seed(seed)
    channels, frames, height, width = spec["latent"]
    if family == "sd3":
        model = SD3Transformer2DModel(
            sample_size=height, patch_size=2, in_channels=channels, out_channels=channels,
            num_layers=spec["layers"], attention_head_dim=spec["hidden"] // spec["heads"],
            num_attention_heads=spec["heads"], joint_attention_dim=256, caption_projection_dim=spec["hidden"],
            pooled_projection_dim=64, pos_embed_max_size=height // 2)
        inputs = dict(encoder_hidden_states=torch.randn(1, spec["text"], 256), pooled_projections=torch.randn(1, 64))
        latents = torch.randn(1, channels, height, width)
    else:
        model = WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=spec["heads"], attention_head_dim=spec["hidden"] // spec["heads"],
            in_channels=channels, out_channels=channels, text_dim=256, freq_dim=64, ffn_dim=4 * spec["hidden"],
            num_layers=spec["layers"], rope_max_seq_len=1024)
        inputs = dict(encoder_hidden_states=torch.randn(1, spec["text"], 256))
        latents = torch.randn(1, channels, frames, height, width)
    return model.eval(), latents, inputs


@torch.no_grad()
def denoise(model, latents, inputs, steps: int) -> tuple[torch.Tensor, float]:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    start = time.perf_counter()
    for t in scheduler.timesteps:
        velocity = model(hidden_states=latents, timestep=t.expand(latents.shape[0]), return_dict=False, **inputs)[0]
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents, time.perf_counter() - start


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    peak = reference.abs().max()
    return float(10 * torch.log10(peak**2 / (reference - other).pow(2).mean()))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", action="append", choices=sorted(MEDIUM))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    print(start(args.threads) + "\n")
    for family in args.family or ["sd3", "wan"]:
        spec = MEDIUM[family]
        model, latents, inputs = build(family, spec)
        tokens = latents.shape[-3] * latents.shape[-2] * latents.shape[-1] // 4 if family == "wan" else latents.shape[-1] * latents.shape[-2] // 4
        denoise(model, latents, inputs, 2)  # warm-up
        handle = dit_accel.apply(model)
        dense, dense_seconds = denoise(model, latents, inputs, args.steps)
        dense_report = handle.report()
        handle.remove()
        dense_step = dense_report["transformer_seconds"] / dense_report["num_calls"]
        print(f"## {family}: {spec['layers']} layers, hidden {spec['hidden']}, {tokens} tokens, {args.steps} steps")
        print("| plan | loop time (s) | speedup | FLOPs ratio | RAS step / dense step (time) | RAS step / dense step (FLOPs) | PSNR vs dense (dB) |")
        print("|---|---|---|---|---|---|---|")
        print(f"| dense | {dense_seconds:.2f} | 1.00x | 1.000 | - | - | inf |")
        for ratio in args.ratios:
            config = dit_accel.RASConfig.for_steps(args.steps, sample_ratio=ratio)
            handle = dit_accel.apply(model, config)
            out, seconds = denoise(model, latents, inputs, args.steps)
            report = handle.report()
            handle.remove()
            ras_steps = [s for s in report["steps"] if s["flops_ratio"] < 1]
            step_time = sum(s["seconds"] for s in ras_steps) / len(ras_steps) / dense_step
            step_flops = sum(s["flops_ratio"] for s in ras_steps) / len(ras_steps)
            print(f"| RAS {ratio:.2f} | {seconds:.2f} | {dense_seconds / seconds:.2f}x | {report['flops_ratio']:.3f} | "
                  f"{step_time:.2f} | {step_flops:.2f} | {psnr(dense, out):.1f} |")
        print()


if __name__ == "__main__":
    main()
