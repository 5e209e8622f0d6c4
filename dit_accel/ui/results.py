"""A comparison's runs as the page shows them: outputs enlarged to at least `MIN_SHOWN` pixels (nearest
neighbour, so a 64-pixel model stays its own pixels) and labelled with their real size, one table, and
for one plan against the baseline the slider pair, the difference map, its numbers, what was skipped
and the per-step charts (`plan_views`)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..comparison import PlanRun
from ..metrics.quality import channels_first, psnr_frames
from ..outputs import save_gif
from . import charts
from .report_view import pictures, skipped

#: pixels: every output is shown at least this wide
MIN_SHOWN = 384


@dataclass
class Shown:
    """One run of a comparison, saved for the page."""

    label: str
    #: (B, 3, H, W) or (B, T, 3, H, W) in [0, 1]
    output: torch.Tensor
    report: dict | None
    #: the enlarged first sample (PNG, or an animated GIF for a video) and its first frame (PNG)
    picture: str
    still: str
    #: "64x64 px, shown 6x (nearest)"
    size: str
    seconds: float
    speedup: float
    flops_ratio: float
    psnr: float | None = None
    ssim: float | None = None
    perceptual: float | None = None


def _pixels(frame: torch.Tensor, scale: int) -> Image.Image:
    picture = Image.fromarray((frame.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture


def save(output: torch.Tensor, folder: Path, name: str) -> tuple[str, str, str]:
    """The first sample enlarged by a whole factor to at least `MIN_SHOWN` wide: (picture path, first frame's
    path, size text)."""
    sample = output[0]
    frames = [sample] if sample.ndim == 3 else list(sample)
    height, width = frames[0].shape[-2:]
    scale = max(1, math.ceil(MIN_SHOWN / width))
    enlarged = [_pixels(frame, scale) for frame in frames]
    still = folder / f"{name}.png"
    enlarged[0].save(still)
    picture = still
    if len(enlarged) > 1:
        picture = folder / f"{name}.gif"
        save_gif(enlarged, picture)
    kind = f", {len(frames)} frames" if len(frames) > 1 else ""
    shown = f", shown {scale}x (nearest)" if scale > 1 else ""
    return str(picture), str(still), f"{width}x{height} px{kind}{shown}"


def shown_runs(runs: list[PlanRun], folder: Path, perceptual: Any | None) -> list[Shown]:
    """Dense first, then each plan, saved; `perceptual` (a `PerceptualDistance`, or None) scores the plans."""
    dense = runs[0]
    shown = []
    for index, run in enumerate(runs):
        picture, still, size = save(run.output, folder, f"{index}")
        distance = None
        if perceptual is not None and index:
            distance = perceptual(channels_first(run.output), channels_first(dense.output))
        shown.append(Shown(run.label, run.output, run.report, picture, still, size, run.seconds, run.speedup,
                           run.flops_ratio, run.psnr, run.ssim, distance))
    return shown


def _db(value: float | None) -> str:
    return "-" if value is None else "identical" if math.isinf(value) else f"{value:.2f}"


def table(shown: list[Shown], perceptual_name: str | None) -> str:
    """Every run of the comparison in one table."""
    lines = ["| run | time (s) | speedup | FLOPs ratio | PSNR vs baseline (dB) | SSIM | perceptual |",
             "|---|---|---|---|---|---|---|"]
    for run in shown:
        quality = [_db(run.psnr), "-" if run.ssim is None else f"{run.ssim:.4f}",
                   "-" if run.perceptual is None else f"{run.perceptual:.4f}"]
        lines.append(f"| {run.label} | {run.seconds:.2f} | {run.speedup:.2f}x | {run.flops_ratio:.3f} | "
                     + " | ".join(quality) + " |")
    lines.append("\nperceptual: " + (perceptual_name or "not measured here")
                 + "; the baseline is dense on the same seed.")
    return "\n".join(lines)


def plan_views(baseline: Shown, plan: Shown, folder: Path, index: int) -> dict[str, Any]:
    """One plan against the baseline: the slider pair, the difference map and its numbers, the maps of
    what was skipped, FLOPs and shares per step, frame-wise PSNR (videos) and the per-step JSON, also
    as a file to download."""
    diff, largest = charts.difference(plan.output, baseline.output)
    unit = " dB" if plan.psnr is not None and math.isfinite(plan.psnr) else ""
    numbers = (f"**{plan.label}** vs baseline: PSNR {_db(plan.psnr)}{unit}, SSIM "
               f"{'-' if plan.ssim is None else f'{plan.ssim:.4f}'}, perceptual "
               f"{'-' if plan.perceptual is None else f'{plan.perceptual:.4f}'}; largest difference {largest:.3f} "
               f"(pixels in [0, 1]); {plan.speedup:.2f}x, FLOPs ratio {plan.flops_ratio:.3f}")
    video = plan.output.ndim == 5
    per_step = skipped(plan.report)
    path = folder / f"report-{index}.json"
    path.write_text(json.dumps({"plan": plan.label, "per_step": per_step, "report": plan.report}, indent=1,
                               default=str))
    return {"slider": (baseline.still, plan.still), "difference": diff, "numbers": numbers,
            "maps": pictures(plan.report, baseline.output),
            "flops": charts.flops_per_step(plan.report) if plan.report else None,
            "shares": charts.share_per_step(plan.report) if plan.report else None,
            "frames": charts.frame_psnr(psnr_frames(plan.output[:1], baseline.output[:1])) if video else None,
            "per_step": per_step, "file": str(path)}
