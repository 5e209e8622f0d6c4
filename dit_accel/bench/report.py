"""The benchmark's results: per-row summary (speedup, FLOPs, memory, quality, judge, FID, CLIP score), the
equal-quality table (`--equal`), the markdown tables with their notes, CSV, JSON, and the speedup-PSNR plot
with its Pareto front."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..metrics.judge import VIDEO_ATTRIBUTES, frechet_distance
from ..metrics.quality import PerceptualDistance, mean_db
from ..outputs import json_fields
from ..plan_spec import steps_run
from ..runtime.registry import registration
from ..tuning.target import Target
from .common import markdown_table
from .content import ContentScoring
from .judging import Judging, reference_fid
from .rows import Row


MIB = 2**20


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (higher speedup and higher PSNR are
    better; a tie on both keeps both), ordered by speedup."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(ox >= x and oy >= y and (ox > x or oy > y) for ox, oy in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


def summarize(rows: list[Row], steps: int, judged: Judging | None,
              content: ContentScoring | None = None) -> list[dict[str, Any]]:
    """Per row: per-sample times, speedup (total dense wall over total row wall), FLOPs against dense's,
    peak memory, PSNR/SSIM/perceptual vs dense, the judge's scores, FID and CLIP score; failed rows keep
    only their error."""
    dense = rows[0]
    fid_reference = None
    if content is not None:
        fid_reference = content.reference if content.reference is not None else \
            torch.cat(dense.fid_features) if dense.fid_features else None
    out = []
    for row in rows:
        entry = {"label": row.label, "kind": row.kind, "family": row.family, "spec": row.spec,
                 "steps": row.steps or steps_run(row.configs, steps),
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
                "judge_agreement": row.agreeing_readings / row.judge_readings if row.judge_readings else None,
                "reference_fid": reference_fid(torch.cat(row.features), judged.real_features)
                if row.features and judged is not None else None,
                "fid": frechet_distance(torch.cat(row.fid_features), fid_reference)
                if row.fid_features and fid_reference is not None and row.samples > 1 else None,
                "clip_score": row.clip_sum / row.clip_frames if row.clip_frames else None,
            })
        out.append(entry)
    return out


#: what the equal-quality table shows of each row picked
EQUAL_COLUMNS = ("steps", "speedup", "flops_ratio", "psnr_db", "identical_to_dense", "ssim", "perceptual",
                 "judge_agreement", "caption_accuracy", "fid", "clip_score")
#: the summary's key of each target metric (`tuning.target.METRICS`)
METRIC_KEYS = {"psnr": "psnr_db", "ssim": "ssim", "perceptual": "perceptual", "judge": "judge_agreement"}


def row_quality(row: dict[str, Any], metric: str) -> float | None:
    """A summary row's value of a target metric (PSNR of a row identical to dense: inf)."""
    if metric == "psnr" and row.get("identical_to_dense"):
        return math.inf
    return row.get(METRIC_KEYS[metric])


def equal_quality(rows: list[dict[str, Any]], target: Target) -> list[dict[str, Any]]:
    """The equal-quality table: per family (each plan, each peer family), in the table's order, its fastest
    row that meets every bound of `target` and skips some work (a FLOPs ratio of 1 is dense, whatever its
    timing says); a family none of whose rows does keeps its best row by the primary metric, marked so.
    Marks every plan and peer row of `rows` too (`meets_target`, and `fastest_in_family` on the rows
    picked)."""
    families: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row["kind"] in ("plan", "peer") and row["status"] == "ok":
            row["meets_target"] = target.met(lambda metric, row=row: row_quality(row, metric))
            row["fastest_in_family"] = False
            families.setdefault(row["family"], []).append(row)
    primary = target.primary
    table = []
    for family, members in families.items():
        meeting = [row for row in members if row["meets_target"] and (row["flops_ratio"] or 0.0) < 1.0]
        if meeting:
            pick = max(meeting, key=lambda row: row["speedup"])
            pick["fastest_in_family"] = True
        else:
            pick = max(members, key=lambda row: -math.inf if row_quality(row, primary.metric) is None
                       else primary.score(row_quality(row, primary.metric)))
        missed = None if meeting else f"none of {len(members)} " + (
            "skips work at it" if any(row["meets_target"] for row in members) else "meets it")
        table.append({"family": family, "label": pick["label"], "meets_target": bool(meeting), "missed": missed,
                      "settings": len(members), "settings_meeting": len(meeting),
                      **{key: pick.get(key) for key in EQUAL_COLUMNS}})
    return table


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
                      "agreement": _text(row["judge_agreement"], ".3f"),
                      "reference_fid": _text(row["reference_fid"], ".1f"), "fid": _text(row["fid"], ".2f"),
                      "clip": _text(row["clip_score"], ".2f"),
                      "meets": "-" if "meets_target" not in row else "yes, fastest of its family"
                      if row["fastest_in_family"] else "yes" if row["meets_target"] else "no"})
    return cells


def _equal_cells(table: list[dict[str, Any]]) -> list[dict[str, str]]:
    """The equal-quality table's rows as cells: a family none of whose settings met the target says so."""
    cells = []
    for row in table:
        psnr_text = "inf" if row["identical_to_dense"] else _text(row["psnr_db"], ".2f")
        setting = row["label"] if row["meets_target"] else f"{row['missed']} (closest: {row['label']})"
        cells.append({"family": row["family"], "setting": setting, "steps": str(row["steps"]),
                      "speedup": f"{row['speedup']:.2f}x", "flops": _text(row["flops_ratio"], ".3f"),
                      "psnr": psnr_text, "ssim": _text(row["ssim"], ".4f"), "perceptual": _text(row["perceptual"], ".4f"),
                      "agreement": _text(row["judge_agreement"], ".3f"), "accuracy": _text(row["caption_accuracy"], ".3f"),
                      "fid": _text(row["fid"], ".2f"), "clip": _text(row["clip_score"], ".2f")})
    return cells


def markdown(results: dict[str, Any]) -> str:
    """The table under a line naming the machine and one giving the setting, and the notes below it."""
    call, rows = results["call"], results["rows"]
    columns = [("label", "row", ""), ("steps", "steps", ""), ("wall", "wall / sample (s)", ""),
               ("transformer", "transformer / sample (s)", ""), ("speedup", "speedup", ""),
               ("flops", "FLOPs ratio", ""), ("memory", "peak memory (MiB)", ""), ("psnr", "PSNR vs dense (dB)", ""),
               ("ssim", "SSIM vs dense", ""), ("perceptual", "perceptual distance", "")]
    scores = []
    if results["judged"]:
        scores += [("agreement", "judge agreement", ""), ("accuracy", "caption acc.", "")]
    if results["fid"] is not None:
        scores += [("fid", "FID vs " + ("dense" if results["fid"] == "dense" else "real"), "")]
        scores += [("clip", "CLIP score", "")] if any(row.get("clip_score") is not None for row in rows) else []
    columns += scores + ([("reference_fid", "reference FID (judge)", "")] if results["judged"] else [])
    equal = results.get("equal_quality")
    if equal is not None:
        columns.append(("meets", f"meets {equal['target']}", ""))
    size = "x".join(str(call[k]) for k in ("num_frames", "height", "width") if call.get(k) is not None)
    lines = [f"# dit-accel bench on {results['machine']['name']}: {results['model']} ({results['pipeline']})", "",
             f"{results['prompts']['count']} prompts ({results['prompts']['source']}) in {call['batches']} "
             f"batch{'es' if call['batches'] > 1 else ''} of up to {call['batch']}, "
             f"{call['num_inference_steps']} steps, guidance {call.get('guidance_scale', '-')}"
             f"{', ' + size if size else ''}, seeds from {results['seed']} (one per batch); {results['device']} "
             f"{results['dtype']}, {results['threads']} threads, torch {results['torch']}, diffusers "
             f"{results['diffusers']}", "", markdown_table(_table_rows(rows), columns), ""]
    if equal is not None:
        quality = [("psnr", "PSNR vs dense (dB)", ""), ("ssim", "SSIM vs dense", ""),
                   ("perceptual", "perceptual distance", "")]
        lines += [f"## At equal quality: {equal['target']}", "",
                  f"Each plan's and each peer family's fastest setting that meets {equal['target']} on these prompts "
                  "(the rows above, from one run):", "",
                  markdown_table(_equal_cells(equal["rows"]), [
                      ("family", "family", ""), ("setting", "setting", ""), ("steps", "steps", ""),
                      ("speedup", "speedup", ""), ("flops", "FLOPs ratio", "")] + quality + scores), ""]
    lines += [f"- {note}" for note in results["notes"]]
    return "\n".join(lines) + "\n"


CSV_COLUMNS = ("label", "kind", "family", "status", "steps", "samples", "seconds_per_sample",
               "transformer_seconds_per_sample", "speedup", "flops_ratio", "peak_memory_mib", "psnr_db",
               "identical_to_dense", "ssim", "perceptual", "judge_agreement", "caption_accuracy", "reference_fid", "fid",
               "clip_score", "meets_target", "fastest_in_family", "spec", "error")


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
          peer_notes: list[str], processes: int = 1, content: ContentScoring | None = None) -> list[str]:
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
        read = ", ".join(VIDEO_ATTRIBUTES if judged.video else judged.judge.attributes).replace("_", " ")
        said.append(f"judge agreement: the share of the offline judge's attribute readings ({read}) of a row's "
                    "samples that equal its readings of dense's samples of the same seeds")
        said.append(f"caption accuracy: the offline judge's whole-caption accuracy; reference FID: judge features "
                    f"against {len(judged.real_features)} real procedural {kind}, the offline stand-in for Inception "
                    f"FID (few samples: compare rows, not absolute values); the real {kind} of the captions score "
                    f"{judged.real['caption_accuracy']:.3f} and {judged.real['reference_fid']:.1f}")
    if content is not None:
        said += content.notes(rows[0].samples)
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
