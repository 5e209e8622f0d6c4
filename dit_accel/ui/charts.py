"""The page's charts and heat maps, drawn with matplotlib into PNG images (what a browser shows as is
and a test can read back): FLOPs and the share computed per step, frame-wise PSNR of a video, the
difference of two outputs, and speedup against PSNR of every run since the page opened.

Figures are built with matplotlib's object API (no pyplot state), so concurrent sessions draw safely.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from ..runtime.registry import declared_stats
from ..runtime.stats import StatKind

#: inches at DPI: charts come out about 560 x 320 pixels, maps about 480 x 420
CHART_SIZE, MAP_SIZE, DPI = (5.6, 3.2), (4.8, 4.2), 100
#: where a PSNR of inf (identical outputs) is drawn: this far above the best finite one
IDENTICAL_MARGIN_DB = 5.0


def figure(size: tuple[float, float] = CHART_SIZE) -> Figure:
    figure = Figure(figsize=size, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def image_of(fig: Figure) -> Image.Image:
    """The figure as an RGB picture."""
    fig.canvas.draw()
    return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def flops_per_step(report: dict[str, Any]) -> Image.Image:
    """GFLOPs of every step, dense (the analytic model) against what the plan's ledger recorded."""
    steps = [s["step"] for s in report["steps"]]
    fig = figure()
    axes = fig.add_subplot()
    axes.plot(steps, [s["dense_flops"] / 1e9 for s in report["steps"]], "o-", color="0.4", label="dense")
    axes.plot(steps, [s["flops"] / 1e9 for s in report["steps"]], "o-", color="tab:red", label="plan")
    axes.set(xlabel="step", ylabel="GFLOPs (all calls of the step)", title="FLOPs per step", ylim=(0, None))
    axes.legend()
    return image_of(fig)


def shares_per_step(report: dict[str, Any]) -> dict[str, list[float]]:
    """Per step (its first call), every declared per-call number that is a share of dense: a count with a
    `total_<key>` beside it (tokens computed of the image's tokens) or a value within [0, 1] at every
    step (densities, widths kept); with the FLOPs ratio. A step's missing value counts as dense."""
    calls = [step["calls"][0] for step in report["steps"]]
    shares = {"FLOPs": [step["flops_ratio"] for step in report["steps"]]}
    for stat in declared_stats():
        if stat.kind is not StatKind.VALUE or stat.key.startswith("total_") or not any(stat.key in c for c in calls):
            continue
        total = f"total_{stat.key}"
        values = [c[stat.key] / c[total] if total in c and c[total] else c.get(stat.key, 1.0) for c in calls]
        shares_of_dense = total in calls[0] or any(isinstance(v, float) for v in values)  # not a count
        if shares_of_dense and all(isinstance(v, (int, float)) and 0.0 <= v <= 1.0 for v in values):
            shares[stat.label or stat.key.replace("_", " ")] = [float(v) for v in values]
    return shares


def share_per_step(report: dict[str, Any]) -> Image.Image:
    """What each step computed as a share of dense: FLOPs, tokens, densities and widths (1 = dense)."""
    steps = [s["step"] for s in report["steps"]]
    fig = figure()
    axes = fig.add_subplot()
    for name, values in shares_per_step(report).items():
        axes.plot(steps, values, "o-", label=name, markersize=3)
    axes.set(xlabel="step", ylabel="share of dense (1 = all)", title="tokens and work computed per step",
             ylim=(0, 1.05))
    axes.legend(fontsize="small")
    return image_of(fig)


def frame_psnr(values: list[float]) -> Image.Image:
    """PSNR of every video frame against the baseline's (identical frames at the top, said so)."""
    finite = [v for v in values if math.isfinite(v)]
    top = (max(finite) if finite else 0.0) + IDENTICAL_MARGIN_DB
    fig = figure((CHART_SIZE[0], 2.4))
    axes = fig.add_subplot()
    axes.plot(range(len(values)), [v if math.isfinite(v) else top for v in values], "o-", color="tab:blue")
    axes.set(xlabel="frame", ylabel="PSNR (dB)", title="frame-wise PSNR vs baseline"
             + (f" (identical at {top:.0f})" if len(finite) < len(values) else ""))
    return image_of(fig)


def difference(output: torch.Tensor, baseline: torch.Tensor) -> tuple[Image.Image, float]:
    """|accelerated - baseline| of the first sample, averaged over RGB (and a video's frames), as a heat
    map with its scale; and its largest value."""
    first, reference = output[0].float(), baseline[0].float()
    diff = (first - reference).abs().mean(dim=-3)  # over RGB
    if diff.ndim == 3:
        diff = diff.mean(0)  # over frames
    diff = diff.numpy()
    fig = figure(MAP_SIZE)
    axes = fig.add_subplot()
    shown = axes.imshow(diff, cmap="inferno", vmin=0.0, vmax=max(float(diff.max()), 1e-6), interpolation="nearest")
    axes.set(title="|plan - baseline|" + (", mean over frames" if first.ndim == 4 else ""),
             xticks=[], yticks=[])
    fig.colorbar(shown, ax=axes, label="mean abs. difference over RGB (pixels in [0, 1])")
    return image_of(fig), float(diff.max())


def best_tradeoffs(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speedup, quality) points no other point beats on both, fastest first."""
    front, best = [], -math.inf
    for x, y in sorted(points, key=lambda p: (-p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def pareto(history: list[dict[str, Any]]) -> Image.Image:
    """Speedup against PSNR of every plan run since the page opened, the best trade-offs joined."""
    fig = figure()
    axes = fig.add_subplot()
    finite = [h["psnr"] for h in history if math.isfinite(h["psnr"])]
    top = (max(finite) if finite else 0.0) + IDENTICAL_MARGIN_DB
    points = [(h["speedup"], h["psnr"] if math.isfinite(h["psnr"]) else top, h["label"]) for h in history]
    axes.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue", zorder=2)
    for x, y, label in points:
        axes.annotate(label if len(label) <= 28 else label[:27] + "...", (x, y), fontsize=7,
                      xytext=(3, 3), textcoords="offset points")
    front = best_tradeoffs([(x, y) for x, y, _ in points])
    if len(front) > 1:
        axes.plot([p[0] for p in front], [p[1] for p in front], "--", color="tab:red", zorder=1,
                  label="best trade-offs")
        axes.legend(fontsize="small")
    axes.axvline(1.0, color="0.7", lw=1)
    axes.set(xlabel="speedup vs baseline (x)", ylabel="PSNR vs baseline (dB)",
             title=f"every run since this page opened ({len(points)})"
             + (f"; identical drawn at {top:.0f} dB" if len(finite) < len(points) else ""))
    return image_of(fig)
