"""What a plan skipped, as the page shows it: a per-step table and maps with legends, from `report()`.

Techniques declare the keys of their per-call stats and how each is shown (`Technique.stats`,
`runtime/stats.py`); this module iterates the registered techniques' declarations
(`registry.declared_stats`) and draws by kind, so it names no technique: numbers and per-block
numbers are listed per step; token sets (RAS) as in how many of the steps each region was computed,
over the output; token labels (SVG2) as the last step's map of one head's query clusters, with the
block's kept attention density; per-block fractions (DyDiT's width, FlexDiT's token density, attention
density) as a step x block grid, consecutive steps alike in one row (DyDiT's step buckets). Each map has
its colour scale and units.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from matplotlib.colors import ListedColormap
from PIL import Image

from ..runtime.registry import declared_stats
from ..runtime.stats import Stat, StatKind
from .charts import MAP_SIZE, figure, image_of

#: how strongly a map covers the output under it
OVERLAY_ALPHA = 0.6


def skipped(report: dict | None) -> list[dict[str, Any]]:
    """Per step what the plan computed, from the step's first call: the FLOPs ratio and every declared
    stat listed in the table (image tokens, attention density, token density, widths kept, ...);
    token lists and cluster maps are drawn, not listed."""
    if report is None:
        return []
    listed = [stat.key for stat in declared_stats() if stat.in_table]
    rows = []
    for step in report["steps"]:
        call = step["calls"][0]
        row = {"step": step["step"], "flops_ratio": round(step["flops_ratio"], 4)}
        for key in listed:
            if key in call:
                value = call[key]
                row[key] = {str(k): v for k, v in value.items()} if isinstance(value, dict) else value
        rows.append(row)
    return rows


def _first_frame(output: torch.Tensor) -> np.ndarray:
    sample = output[0] if output[0].ndim == 3 else output[0][0]
    return sample.permute(1, 2, 0).numpy().clip(0, 1)


def _first_calls(report: dict, key: str) -> list[dict]:
    """Per step, its first call that carries `key` (two-call CFG runs a step twice)."""
    firsts = []
    for step in report["steps"]:
        call = next((c for c in step["calls"] if key in c), None)
        if call is not None:
            firsts.append({**call, "step": step["step"]})
    return firsts


def _overlay(image: np.ndarray, layer: np.ndarray, title: str, colour_label: str, **show: Any):
    """`layer` (rows, cols) stretched over the output, with a colour bar labelled with its units."""
    fig = figure(MAP_SIZE)
    axes = fig.add_subplot()
    height, width = image.shape[:2]
    axes.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
    shown = axes.imshow(layer, extent=(0, width, height, 0), interpolation="nearest", alpha=OVERLAY_ALPHA, **show)
    axes.set(title=title, xticks=[], yticks=[])
    fig.colorbar(shown, ax=axes, label=colour_label)
    return fig, shown


def _token_frequency(stat: Stat, report: dict, image: np.ndarray) -> tuple[Image.Image, str] | None:
    """In how many of the steps each token of the first frame was computed; None when every step
    computed every token."""
    calls = _first_calls(report, stat.key)
    if not calls or all(call[stat.key] is None for call in calls):
        return None
    frames, rows, cols = calls[0][stat.grid]
    counts = np.zeros(frames * rows * cols)
    for call in calls:
        counts[call[stat.key] if call[stat.key] is not None else slice(None)] += 1
    steps = len(calls)
    fig, _ = _overlay(image, counts.reshape(frames, rows, cols)[0], stat.label, f"steps computed (of {steps})",
                      cmap="viridis", vmin=0, vmax=steps)
    return image_of(fig), f"{stat.label}, in how many of the {steps} steps ({rows}x{cols} tokens)"


def _label_map(stat: Stat, report: dict, image: np.ndarray) -> tuple[Image.Image, str] | None:
    """The last step's labels over the first frame, one colour each, with the kept density of that block
    where a per-block fraction of the same call says it."""
    calls = _first_calls(report, stat.key)
    if not calls:
        return None
    call = calls[-1]
    value = call[stat.key]
    labels = np.array(value["labels"])[0]
    count = int(labels.max()) + 1
    palette = ListedColormap(np.random.default_rng(0).uniform(0.15, 1.0, (max(count, 1), 3)))
    block = value["block"]
    kept = [(s.label, c) for s in declared_stats() if s.kind is StatKind.BLOCK_FRACTION
            for c in [call.get(s.key, {})] if isinstance(c, dict) and (block in c or str(block) in c)]
    density = "".join(f"; {label}: {by_block.get(block, by_block.get(str(block))):.2f} kept"
                      for label, by_block in kept)
    masked = np.ma.masked_less(labels, 0)
    fig, shown = _overlay(image, masked, f"{stat.label}, block {block}", f"label (of {count})", cmap=palette,
                          vmin=-0.5, vmax=count - 0.5)
    shown.colorbar.set_ticks(range(0, count, max(1, count // 8)))
    return image_of(fig), f"{stat.label}: {count} of them in block {block}, step {call['step']}{density}"


def step_spans(rows: list[list[float]], steps: list[int]) -> tuple[list[list[float]], list[str]]:
    """Consecutive steps with the same row merged into one, labelled with their span ("0-4"): a plan that
    works in step buckets (DyDiT's widths) shows one row a bucket."""
    merged: list[list[float]] = []
    spans: list[list[int]] = []
    for row, step in zip(rows, steps):
        if merged and row == merged[-1]:
            spans[-1][1] = step
        else:
            merged.append(row)
            spans.append([step, step])
    return merged, [f"{a}" if a == b else f"{a}-{b}" for a, b in spans]


def _block_grid(stat: Stat, report: dict, image: np.ndarray) -> tuple[Image.Image, str] | None:
    """Per step (rows; steps alike in a row of their own) and block (columns) the fraction computed (a
    block left out counts as dense)."""
    calls = _first_calls(report, stat.key)
    if not calls:
        return None
    values = [call[stat.key] for call in calls]
    blocks = max(int(b) for by_block in values for b in by_block) + 1 if any(values) else 1
    rows = [[by_block.get(str(b), by_block.get(b, 1.0)) for b in range(blocks)] for by_block in values]
    rows, spans = step_spans(rows, [call["step"] for call in calls])
    fig = figure(MAP_SIZE)
    axes = fig.add_subplot()
    shown = axes.imshow(np.array(rows), cmap="magma", vmin=0, vmax=1, aspect="auto", interpolation="nearest")
    axes.set(xlabel="block", ylabel="steps", title=stat.label)
    every = max(1, len(spans) // 10)
    axes.set_yticks(range(len(spans))[::every], spans[::every])
    axes.set_xticks(range(blocks)[:: max(1, blocks // 12)])
    fig.colorbar(shown, ax=axes, label="share computed (1 = dense)")
    return image_of(fig), f"{stat.label} per step (rows, alike steps merged) and block (columns); 1 = dense"


#: how each drawn kind is drawn, in the order the pictures come
_DRAW = {StatKind.TOKEN_SET: _token_frequency, StatKind.TOKEN_LABELS: _label_map,
         StatKind.BLOCK_FRACTION: _block_grid}


def pictures(report: dict | None, baseline: torch.Tensor) -> list[tuple[Image.Image, str]]:
    """What the plan skipped, drawn over the baseline's first sample and frame or as grids: token sets
    (RAS's recomputed regions), token labels (SVG2's query clusters), then per-block fractions
    (attention density, token density, the width and MLP tokens kept) per step and block."""
    if report is None:
        return []
    image, drawn = _first_frame(baseline), []
    stats = declared_stats()
    for kind, draw in _DRAW.items():
        for stat in stats:
            if stat.kind is kind:
                picture = draw(stat, report, image)
                if picture is not None:
                    drawn.append(picture)
    return drawn
