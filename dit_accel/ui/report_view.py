"""What a plan skipped, as the page shows it: a per-step table and pictures, drawn from `report()`.

Techniques declare the keys of their per-call stats and how each is shown (`Technique.stats`,
`runtime/stats.py`); this module iterates the registered techniques' declarations
(`registry.declared_stats`) and draws by kind, so it names no technique: numbers and per-block
numbers are listed per step, per-block fractions drawn as a call x block grid, token sets as how
often each region was in them, token labels as a map over the first frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from ..runtime.registry import declared_stats
from ..runtime.stats import Stat, StatKind


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
    return (sample.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def _over(image: np.ndarray, colours: np.ndarray) -> Image.Image:
    """A (rows, cols, 3) map enlarged onto the image and blended half and half."""
    size = (image.shape[1], image.shape[0])
    layer = Image.fromarray(colours.astype(np.uint8)).resize(size, Image.NEAREST)
    blended = Image.blend(Image.fromarray(image), layer, 0.5)
    return blended.resize((max(256, size[0]), max(256, size[0]) * size[1] // size[0]), Image.NEAREST)


def _token_frequency(stat: Stat, calls: list[dict], image: np.ndarray) -> tuple[Image.Image, str] | None:
    """How often each token of the first frame was in the set, over every call (red: every call, blue:
    rarely); None when every call held every token."""
    having = [call for call in calls if stat.key in call]
    if not having or all(call[stat.key] is None for call in having):
        return None
    frames, rows, cols = having[0][stat.grid]
    counts = np.zeros(frames * rows * cols)
    for call in having:
        counts[call[stat.key] if call[stat.key] is not None else slice(None)] += 1
    share = (counts / len(having)).reshape(frames, rows, cols)[0]
    colours = np.stack([255 * share, 64 * np.ones_like(share), 255 * (1 - share)], -1)
    return _over(image, colours), f"{stat.label} (red: every call, blue: rarely)"


def _label_map(stat: Stat, calls: list[dict], image: np.ndarray) -> tuple[Image.Image, str] | None:
    """The last call's labels over the first frame, one colour each."""
    values = [call[stat.key] for call in calls if stat.key in call]
    if not values:
        return None
    labels = np.array(values[-1]["labels"])[0]
    palette = np.random.default_rng(0).integers(0, 256, (int(labels.max()) + 2, 3))
    return _over(image, palette[labels + 1]), f"{stat.label} in block {values[-1]['block']}, last step"


def _block_grid(stat: Stat, calls: list[dict], image: np.ndarray) -> tuple[Image.Image, str] | None:
    """Per call (rows, in order) and block (columns), the fraction computed: white = dense."""
    values = [call[stat.key] for call in calls if stat.key in call]
    if not values:
        return None
    blocks = max(len(by_block) for by_block in values)
    cells = np.array([[by_block.get(str(b), by_block.get(b, 1.0)) for b in range(blocks)] for by_block in values])
    cells = (cells * 255).astype(np.uint8)
    grid = Image.fromarray(cells).resize((cells.shape[1] * 24, cells.shape[0] * 8), Image.NEAREST)
    return grid, f"{stat.label} per call (rows, in order) and block (columns): white = dense"


#: how each drawn kind is drawn, in the order the pictures come
_DRAW = {StatKind.TOKEN_SET: _token_frequency, StatKind.TOKEN_LABELS: _label_map,
         StatKind.BLOCK_FRACTION: _block_grid}


def pictures(report: dict | None, baseline: torch.Tensor) -> list[tuple[Image.Image, str]]:
    """What the plan skipped, drawn over the baseline's first sample and frame or as grids: token sets
    (RAS's recomputed regions), token labels (SVG2's query clusters), then per-block fractions
    (attention density, token density, the width and MLP tokens kept) per call and block."""
    if report is None:
        return []
    calls = [call for step in report["steps"] for call in step["calls"]]
    image, drawn = _first_frame(baseline), []
    stats = declared_stats()
    for kind, draw in _DRAW.items():
        for stat in stats:
            if stat.kind is kind:
                picture = draw(stat, calls, image)
                if picture is not None:
                    drawn.append(picture)
    return drawn
