"""The benchmark's results: per-row summary (speedup, FLOPs, memory, quality, judge), the markdown table
with its notes, CSV, JSON, and the speedup-PSNR plot with its Pareto front."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..metrics.quality import PerceptualDistance, mean_db
from ..outputs import json_fields
from ..runtime.registry import registration
from .common import markdown_table
from .judging import Judging, reference_fid
from .rows import Row


MIB = 2**20


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher speedup and higher PSNR are
    better; a tie on both keeps both), ordered by speedup."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def summarize(rows: list[Row], steps: int, judged: Judging | None) -> list[dict[str, Any]]:
    """Per row: per-sample times, speedup (total dense wall over total row wall), FLOPs against dense's,
    peak memory, PSNR/SSIM vs dense, and the judge's scores; failed rows keep only their error."""
    dense = rows[0]
    out = []
    for row in rows:
        entry = {"label": row.label, "kind": row.kind, "spec": row.spec, "steps": row.steps or steps,
                 "configs": [{"technique": registration(c).name, **json_fields(c)} for c in row.configs],
                 "status": "failed" if row.error else "ok", "error": row.error}
        if row.error is None and row.samples:
            db = mean_db(row.psnr_frames)
            entry.update({
                "samples": row.samples, "seconds": row.seconds, "seconds_per_sample": row.seconds / row.samples,
                "transformer_seconds_per_sample": None if row.transformer_seconds is None
                else row.transformer_seconds / row.samples,
                "speedup": dense.seconds / row.seconds,
                # against dense's work, so that fewer steps count too (for a plan, the ledger's own ratio)
                "flops_ratio": None if row.flops is None or not dense.dense_flops else row.flops / dense.dense_flops,
                "flops": row.flops, "dense_flops": row.dense_flops,
                "peak_memory_mib": None if row.peak_bytes is None else row.peak_bytes / MIB,
                "psnr_db": db if db is not None and math.isfinite(db) else None,
                "identical_to_dense": row is dense or db == math.inf,
                "ssim": 1.0 if row is dense else row.ssim_sum / len(row.psnr_frames) if row.psnr_frames else None,
                "perceptual": 0.0 if row is dense else row.perceptual_sum / len(row.psnr_frames)
                if row.psnr_frames else None,
                "caption_accuracy": row.accuracy_sum / row.samples if row.features else None,
                "reference_fid": reference_fid(torch.cat(row.features), judged.real_features)
                if row.features and judged is not None else None,
            })
        out.append(entry)
    return out


def _text(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _table_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The rows as the table's cells ("-": not measured, inf: identical to dense)."""
    cells = []
    for row in rows:
        if row["status"] == "failed":
            cells.append({"label": row["label"], "speedup": "failed (see below)"})
            continue
        psnr_text = ("-" if row["kind"] == "dense" else "inf" if row["identical_to_dense"]
                     else _text(row["psnr_db"], ".2f"))
        cells.append({"label": row["label"], "steps": str(row["steps"]),
                      "wall": _text(row["seconds_per_sample"], ".3f"),
                      "transformer": _text(row["transformer_seconds_per_sample"], ".3f"),
                      "speedup": f"{row['speedup']:.2f}x", "flops": _text(row["flops_ratio"], ".3f"),
                      "memory": _text(row["peak_memory_mib"], ".0f"), "psnr": psnr_text,
                      "ssim": _text(row["ssim"], ".4f"), "perceptual": _text(row["perceptual"], ".4f"),
                      "accuracy": _text(row["caption_accuracy"], ".3f"),
                      "fid": _text(row["reference_fid"], ".1f")})
    return cells


def markdown(results: dict[str, Any]) -> str:
    """The table under a line naming the machine and one giving the setting, and the notes below it."""
    call, rows = results["call"], results["rows"]
    columns = [("label", "row", ""), ("steps", "steps", ""), ("wall", "wall / sample (s)", ""),
               ("transformer", "transformer / sample (s)", ""), ("speedup", "speedup", ""),
               ("flops", "FLOPs ratio", ""), ("memory", "peak memory (MiB)", ""), ("psnr", "PSNR vs dense (dB)", ""),
               ("ssim", "SSIM vs dense", ""), ("perceptual", "perceptual distance", "")]
    if results["judged"]:
        columns += [("accuracy", "caption acc.", ""), ("fid", "reference FID", "")]
    size = "x".join(str(call[k]) for k in ("num_frames", "height", "width") if call.get(k) is not None)
    lines = [f"# dit-accel bench on {results['machine']['name']}: {results['model']} ({results['pipeline']})", "",
             f"{results['prompts']['count']} prompts ({results['prompts']['source']}) in {call['batches']} "
             f"batch{'es' if call['batches'] > 1 else ''} of up to {call['batch']}, "
             f"{call['num_inference_steps']} steps, guidance {call.get('guidance_scale', '-')}"
             f"{', ' + size if size else ''}, seeds from {results['seed']} (one per batch); {results['device']} "
             f"{results['dtype']}, {results['threads']} threads, torch {results['torch']}, diffusers "
             f"{results['diffusers']}", "", markdown_table(_table_rows(rows), columns), ""]
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("label", "kind", "status", "steps", "samples", "seconds_per_sample", "transformer_seconds_per_sample",
               "speedup", "flops_ratio", "peak_memory_mib", "psnr_db", "identical_to_dense", "ssim", "perceptual",
               "caption_accuracy", "reference_fid", "spec", "error")


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """One line a row, the summary's plain columns (empty: not measured)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS} for row in rows)


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str) -> bool:
    """Speedup against PSNR vs dense, every row that ran a labelled point, the Pareto front ringed and
    joined; rows identical to dense sit on a line above the rest. False when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return False
    shown = [row for row in rows if row["status"] == "ok"]
    finite = [row["psnr_db"] for row in shown if row["psnr_db"] is not None]
    top = (max(finite) + max(3.0, 0.1 * (max(finite) - min(finite)))) if finite else 50.0
    points = [(row["speedup"], top if row["identical_to_dense"] or row["psnr_db"] is None else row["psnr_db"])
              for row in shown]
    front = pareto_front(points)
    figure = Figure(figsize=(8, 5.5), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.scatter([x for x, _ in points], [y for _, y in points], color="tab:blue", zorder=3)
    axes.plot([points[i][0] for i in front], [points[i][1] for i in front], color="tab:red", zorder=2,
              marker="o", markersize=11, markerfacecolor="none", label="Pareto front")
    for row, (x, y) in zip(shown, points):
        axes.annotate(row["label"], (x, y), textcoords="offset points", xytext=(6, 4), fontsize=7)
    axes.axhline(top, color="gray", linestyle=":", linewidth=1)
    ticks = axes.get_yticks()
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    ticks = [t for t in ticks if t < top - 0.5 * step and t >= axes.get_ylim()[0]]
    axes.set_yticks(ticks + [top], [f"{t:g}" for t in ticks] + ["inf\n(identical)"])
    axes.axvline(1.0, color="gray", linestyle=":", linewidth=1)
    axes.set_xlabel("speedup vs dense (total wall clock)")
    axes.set_ylabel("PSNR vs dense (dB, mean per frame)")
    axes.set_title(title, fontsize=9)
    axes.legend(loc="lower left", fontsize=8)
    axes.margins(x=0.12, y=0.08)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    return True


def notes(rows: list[Row], memory_kind: str, judged: Judging | None, perceptual: PerceptualDistance,
          peer_notes: list[str], processes: int = 1) -> list[str]:
    """The footer: what each column means where it is not obvious, what is missing and why."""
    said = [f"peak memory: {memory_kind}",
            "FLOPs ratio: the work ledger's FLOPs over dense's (rows without a handle have none)",
            "speedup: total dense wall clock over the row's; dense runs under the measure-only handle, "
            "'dense (no hooks)' under none, so its speedup is the handle's own cost",
            f"perceptual distance vs dense, per image or frame: {perceptual.name}"]
    if processes > 1:
        said.append(f"{processes} processes (accelerate launch), batch i on rank i % {processes}: wall clock and "
                    "transformer time are the processes' own wall clocks summed over their batches (they ran side "
                    "by side, sharing the machine), peak memory the largest of any process")
    said += peer_notes
    if judged is not None:
        kind = "frames" if judged.video else "images"
        said.append(f"caption accuracy: the offline judge's whole-caption accuracy; reference FID: judge features "
                    f"against {len(judged.real_features)} real procedural {kind} (few samples: compare rows, not "
                    f"absolute values); the real {kind} of the captions score {judged.real['caption_accuracy']:.3f} "
                    f"and {judged.real['reference_fid']:.1f}")
    said += [f"{row.label} failed: {row.error}" for row in rows if row.error]
    return said


def write_results(results: dict[str, Any], out: Path) -> list[str]:
    """results.json, results.csv, results.md and pareto_psnr.png; returns the names written."""
    out.mkdir(parents=True, exist_ok=True)
    title = f"{results['model']} on {results['machine']['name']}"
    plotted = plot_pareto(results["rows"], out / "pareto_psnr.png", title)
    if not plotted:
        results["notes"].append("matplotlib is not installed: no pareto_psnr.png (pip install matplotlib)")
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_csv(results["rows"], out / "results.csv")
    (out / "results.md").write_text(markdown(results))
    return ["results.json", "results.csv", "results.md"] + (["pareto_psnr.png"] if plotted else [])
