"""What `dit-accel generate` writes: the summary of a comparison (JSON and markdown) and its pictures (a
labelled grid, one file per run; videos as animated GIFs, which the UI writes the same way)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .comparison import PlanRun
from .runtime.registry import registration

MIN_TILE = 256  # pixels: small outputs are enlarged to at least this for the grid
GIF_FRAME_MS = 120  # GIF stores centiseconds: about 8 frames a second


# -- summary ---------------------------------------------------------------------------------------

def json_fields(config) -> dict[str, Any]:
    """A config's fields that JSON can hold (diffusers' configs carry callables and tensors)."""
    fields = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if value is None or isinstance(value, (str, int, float, bool, list, tuple)):
            fields[field.name] = value
    return fields


def summarize(runs: list[PlanRun], kwargs: dict[str, Any], **info: Any) -> dict[str, Any]:
    """`info` and the call, then per run: time, speedup and FLOPs ratio vs dense, and PSNR/SSIM vs
    dense (null for dense itself, and PSNR null when identical)."""
    rows = []
    for run in runs:
        report = run.report or {}
        rows.append({"label": run.label,
                     "configs": [{"technique": registration(c).name, **json_fields(c)} for c in run.configs],
                     "seconds": run.seconds, "speedup": run.speedup, "flops_ratio": run.flops_ratio,
                     "dense_flops": report.get("dense_flops"), "flops": report.get("flops"),
                     "psnr_db": run.psnr if run.psnr is not None and math.isfinite(run.psnr) else None,
                     "ssim": run.ssim})
    call = {k: v for k, v in kwargs.items() if isinstance(v, (str, int, float, bool, list)) and k != "output_type"}
    return {**info, "call": call, "shape": list(runs[0].output.shape[1:]), "runs": rows}


def markdown(summary: dict[str, Any]) -> str:
    """The summary as a markdown table under one line of context."""
    call = summary["call"]
    what = call.get("prompt", call.get("class_labels"))
    if isinstance(what, list) and len(what) > 1:
        what = f"{len(what)} prompts in one batch, the first {what[0]!r}"
    else:
        what = repr(what[0] if isinstance(what, list) else what)
    lines = [f"# dit-accel generate: {summary['model']} ({summary['pipeline']})", "",
             f"{what}, seed {summary['seed']}, {call['num_inference_steps']} steps, output "
             f"{'x'.join(map(str, summary['shape']))}, {summary['device']} {summary['dtype']}", "",
             "| plan | time (s) | speedup | FLOPs ratio | PSNR vs dense (dB) | SSIM vs dense |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in summary["runs"]:
        psnr_text = "-" if not row["configs"] else "inf" if row["psnr_db"] is None else f"{row['psnr_db']:.2f}"
        ssim_text = "-" if row["ssim"] is None else f"{row['ssim']:.4f}"
        lines.append(f"| {row['label']} | {row['seconds']:.2f} | {row['speedup']:.2f}x | "
                     f"{row['flops_ratio']:.3f} | {psnr_text} | {ssim_text} |")
    return "\n".join(lines) + "\n"


# -- pictures --------------------------------------------------------------------------------------

def _pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> an RGB image, enlarged by a whole factor so small outputs stay legible."""
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    scale = max(1, math.ceil(MIN_TILE / max(picture.size)))
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Break a plan spec after its commas and pluses so it fits `width` pixels."""
    pieces = text.replace(",", ", ").replace("+", " +").split(" ")
    lines = [""]
    for piece in pieces:
        candidate = f"{lines[-1]} {piece}".strip()
        if lines[-1] and draw.textlength(candidate, font=font) > width:
            lines.append(piece)
        else:
            lines[-1] = candidate
    return lines


def _captions(rows: list[dict[str, Any]]) -> list[list[str]]:
    captions = []
    for row in rows:
        quality = "" if not row["configs"] else (
            "  PSNR inf" if row["psnr_db"] is None else f"  PSNR {row['psnr_db']:.1f} dB")
        captions.append([row["label"], f"{row['seconds']:.2f} s  {row['speedup']:.2f}x  "
                                       f"FLOPs {row['flops_ratio']:.2f}{quality}"])
    return captions


def labelled_row(tiles: list[Image.Image], captions: list[list[str]]) -> Image.Image:
    """Tiles side by side, each with its caption lines underneath."""
    font = ImageFont.load_default(size=14)
    gap, line_height = 8, 18
    width = max(tile.width for tile in tiles)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    wrapped = [[line for text in caption for line in _wrap(measure, text, font, width)] for caption in captions]
    text_height = line_height * max(len(lines) for lines in wrapped) + gap
    height = max(tile.height for tile in tiles) + text_height
    canvas = Image.new("RGB", (len(tiles) * (width + gap) + gap, height + 2 * gap), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, lines) in enumerate(zip(tiles, wrapped)):
        x = gap + i * (width + gap)
        canvas.paste(tile, (x, gap))
        for j, line in enumerate(lines):
            draw.text((x, gap + tile.height + gap // 2 + j * line_height), line, fill="black", font=font)
    return canvas


def write_outputs(runs: list[PlanRun], rows: list[dict[str, Any]], out: Path) -> dict[str, Any]:
    """`grid.png` or `grid.gif` plus one file per run (first sample of the batch); returns the names."""
    captions = _captions(rows)
    names = ["dense"] + [f"plan{i}" for i in range(1, len(runs))]
    first = [run.output[0] for run in runs]
    if first[0].ndim == 3:
        for name, image in zip(names, first):
            _pil(image).save(out / f"{name}.png")
        labelled_row([_pil(image) for image in first], captions).save(out / "grid.png")
        return {"grid": "grid.png", "runs": [f"{name}.png" for name in names]}
    for name, video in zip(names, first):
        save_gif([_pil(frame) for frame in video], out / f"{name}.gif")
    frames = [labelled_row([_pil(video[t]) for video in first], captions) for t in range(first[0].shape[0])]
    save_gif(frames, out / "grid.gif")
    return {"grid": "grid.gif", "runs": [f"{name}.gif" for name in names]}


def save_gif(frames: list[Image.Image], path: Path) -> None:
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
