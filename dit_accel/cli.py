"""`dit-accel generate`: the dense pipeline and each acceleration plan on one seed, side by side.

    dit-accel generate --model tiny:sd3 --steps 20 --plan ras:sample_ratio=0.5 --plan ras+fbcache:threshold=0.1

Writes `grid.png` (images) or `grid.gif` (videos) with every run labelled, one file per run, and
`summary.json` / `summary.md` (time, speedup, FLOPs ratio, PSNR and SSIM vs dense); prints the table.
Speedups are measured side by side in one process after an untimed warm-up of every run, so they
compare like with like; absolute times only mean something on the machine they were taken on.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .api import PlanRun, compare
from .api import calibrate as dit_calibrate
from .config import ConfigError
from .loading import UsageError, call_arguments, default_model, load_model, read_prompts
from .methods.dydit import DyDiTConfig
from .models import UnsupportedModelError
from .plan_files import is_plan_file
from .plans import describe, parse_plan
from .runtime.registry import registration
from .tuning import Budget, Target, TuneResult
from .tuning import tune as tune_plan

#: the plans shown when none is given: RAS alone, and RAS stacked with diffusers' FirstBlockCache
DEFAULT_PLANS = ("ras:sample_ratio=0.5", "ras:sample_ratio=0.5+fbcache:threshold=0.12")
#: Used only when the model has no prompt of its own (hub models and local folders).
FALLBACK_PROMPT = "a red fox sitting in fresh snow, photograph"
#: CLI option -> pipeline call argument.
CALL_OPTIONS = {"prompt": "prompt", "steps": "num_inference_steps", "height": "height", "width": "width",
                "frames": "num_frames", "guidance": "guidance_scale"}
#: the reference models' procedural captions for tuning come from this seed (the benchmark suites' too:
#: `dit-accel bench --suite image` runs on the tuning captions), the held-out ones follow them
TUNING_SEED = 7
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
MIN_TILE = 256  # pixels: small outputs are enlarged to at least this for the grid
GIF_FRAME_MS = 120  # GIF stores centiseconds: about 8 frames a second


# -- command line ----------------------------------------------------------------------------------

def _plan_spec(text: str) -> str:
    """argparse type: a plan spec, a plan file from `dit-accel tune` (.json/.yaml, kept as its path), or a
    file holding a spec (one member per line, `#` comments), checked (fields, combinations) before any
    model is loaded."""
    path = Path(text)
    spec = text
    if path.is_file() and not is_plan_file(text):
        members = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
        spec = "+".join(member for member in members if member)
    try:
        parse_plan(spec)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error
    return spec


def _target(text: str) -> Target:
    try:
        return Target.parse(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _budget(text: str) -> Budget:
    try:
        return Budget.parse(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _at_least(low: float, kind: type):
    def check(text: str):
        try:
            value = kind(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from error
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value
    return check


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dit-accel", description="Accelerate diffusers diffusion-transformer pipelines and compare with dense.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate", help="run the dense pipeline and each plan on one seed; write a grid and a summary",
        description="Run the dense pipeline and each acceleration plan on the same seed and compare them.")
    _model_options(gen)
    gen.add_argument("--prompt", help="text prompt (DiT: a class name); default: the model's own")
    _call_options(gen)
    gen.add_argument("--plan", "--accel", dest="plans", action="append", type=_plan_spec, metavar="SPEC|FILE",
                     help="an acceleration plan, repeatable: technique:field=value,...[+technique:...], e.g. "
                     "ras:sample_ratio=0.5,warmup_steps=2 or ras+fbcache:threshold=0.1 (diffusers' caches: "
                     "fbcache, taylorseer, magcache, pab, fastercache, ...), proxy:preset=balanced, or a file "
                     "holding one; step schedules left out are scaled to --steps, MagCache is calibrated first "
                     f"(default: {' and '.join(DEFAULT_PLANS)})")
    gen.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs/)")
    cal = commands.add_parser(
        "calibrate", help="score DyDiT's attention heads and MLP channel groups per bucket of steps on prompts",
        description="Run the dense pipeline on calibration prompts, score every attention head and MLP channel "
                    "group by its contribution to its block's output per bucket of steps, and write them as "
                    "safetensors with the model's identity, for DyDiTConfig(calibration=FILE) "
                    "(plans: dydit:calibration=FILE).")
    _model_options(cal)
    cal.add_argument("--prompt", dest="prompts", action="append", metavar="PROMPT",
                     help="a calibration prompt (DiT: a class name), repeatable; default: the model's own")
    cal.add_argument("--prompts", dest="prompt_file", type=Path, metavar="FILE",
                     help="a file of calibration prompts, one per line")
    _call_options(cal)
    cal.add_argument("--buckets", type=_at_least(1, int), default=4,
                     help="equal parts of the steps, each scored on its own (default: %(default)s)")
    cal.add_argument("--output", type=Path, required=True, help="the safetensors file to write")
    tune = commands.add_parser(
        "tune", help="search for the fastest plan that keeps a quality target on your prompts; write it as a plan file",
        description="Search plans (every technique's presets, diffusers' caches at several settings, stacks across "
                    "stages) for the fastest one whose quality vs dense on the tuning prompts meets --target, within "
                    "--budget; re-measure it on held-out prompts; write a plan file for --plan FILE, load_plan and "
                    "acceleration=FILE (refused for another model).")
    _model_options(tune)
    tune.add_argument("--prompts", dest="prompt_file", type=Path, metavar="FILE",
                      help="tuning prompts, one a line or a JSON list (default on reference:* models: --count of its "
                      "procedural captions)")
    tune.add_argument("--held-out", dest="held_out_file", type=Path, metavar="FILE",
                      help="prompts to re-measure the tuned plan on (default on reference:* models: --count other "
                      "captions; else none)")
    tune.add_argument("--count", type=_at_least(1, int), default=16,
                      help="captions of a reference model, for tuning and held out each (default: %(default)s)")
    _call_options(tune)
    tune.add_argument("--target", type=_target, default=Target(), metavar="METRIC=VALUE",
                      help="quality vs dense to keep: psnr=DB (mean per image or frame) or ssim=VALUE "
                      "(default: psnr=30)")
    tune.add_argument("--budget", type=_budget, default=Budget(), metavar="TIME|Ngen",
                      help="when the search stops, with the best plan so far: 45m, 90s, 1h, or 120gen "
                      "(pipeline calls) (default: 45m)")
    tune.add_argument("--batch", type=_at_least(1, int), default=8, help="prompts a call (default: %(default)s)")
    tune.add_argument("--threads", type=_at_least(1, int), help="torch CPU threads (default: torch's)")
    tune.add_argument("--out", type=Path, default=Path("outputs/tuned_plan.json"),
                      help="the plan file to write (.json or .yaml; the search's candidates beside it in "
                      "<name>.search.json) (default: %(default)s)")
    commands.add_parser("bench", add_help=False,
                        help="benchmark plans and peers against dense over batches of prompts: time, FLOPs, memory, "
                        "quality; JSON, CSV, markdown and a speedup-PSNR plot (dit-accel bench --help)")
    commands.add_parser("ui", help="serve the Gradio page: baseline and accelerated side by side (dit-accel ui "
                        "--help)")
    commands.add_parser("plans", help="list the plan members (techniques and diffusers' caches) with their fields",
                        description="Every name a plan may use, its stages, and each field's type, range and doc.")
    return parser


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id or local folder (DiffusionPipeline.from_pretrained), tiny:<family>, "
                        "medium:sd3|wan|pixart or reference:image|video (default: reference:image if its weights are installed, "
                        "else tiny:sd3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


def _call_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seed", type=int, default=0, help="one seed for every run (default: 0)")
    parser.add_argument("--steps", type=_at_least(1, int), help="inference steps (default: the model's own)")
    parser.add_argument("--height", type=_at_least(1, int), help="pixels (default: the model's own)")
    parser.add_argument("--width", type=_at_least(1, int), help="pixels (default: the model's own)")
    parser.add_argument("--frames", type=_at_least(1, int), help="video frames")
    parser.add_argument("--guidance", type=_at_least(0, float), help="guidance scale")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ui"]:  # the UI parses its own options
        from .ui import main as ui_main

        return ui_main(argv[1:])
    if argv[:1] == ["bench"]:  # the benchmark parses its own options too, and is imported only for it
        from .benchmarks.bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plans":
        print(describe(), end="")
        return 0
    try:
        {"calibrate": calibrate, "tune": tune, "generate": generate}[args.command](args)
    except (ConfigError, NotImplementedError, UnsupportedModelError, UsageError) as error:
        parser.exit(2, f"dit-accel: error: {error}\n")
    return 0


# -- model and call arguments ----------------------------------------------------------------------

def call_kwargs(pipe, defaults: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The model's defaults, overridden by the options given; an option the pipeline lacks is an error."""
    accepted = inspect.signature(pipe.__call__).parameters
    for option, parameter in CALL_OPTIONS.items():
        takes_class_name = option == "prompt" and hasattr(pipe, "get_label_ids")
        if getattr(args, option) is not None and parameter not in accepted and not takes_class_name:
            raise UsageError(f"--{option} does not apply to {type(pipe).__name__}")
    kwargs = call_arguments(pipe, defaults, {p: getattr(args, o) for o, p in CALL_OPTIONS.items()})
    if "prompt" in accepted and "prompt" not in kwargs:
        kwargs["prompt"] = FALLBACK_PROMPT
    kwargs.setdefault("num_inference_steps", accepted["num_inference_steps"].default)
    kwargs["output_type"] = "pt"
    return kwargs


# -- running ---------------------------------------------------------------------------------------

def _status(args: argparse.Namespace):
    return (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))


def _load(args: argparse.Namespace, status) -> tuple[Any, dict[str, Any], str, torch.dtype]:
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32)
    model = args.model or default_model()
    status(f"loading {model}")
    pipe, defaults = load_model(model, args.device, dtype)
    pipe.set_progress_bar_config(disable=args.quiet)
    return pipe, defaults, model, dtype


def _calibration_prompts(args: argparse.Namespace) -> list[str] | None:
    prompts = list(args.prompts or [])
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise UsageError(f"--prompts {args.prompt_file}: no such file")
        prompts += [line.strip() for line in args.prompt_file.read_text().splitlines() if line.strip()]
    return prompts or None


def calibrate(args: argparse.Namespace) -> Path:
    """`dit-accel calibrate`: DyDiT's head and group scores over the prompts, in one batch, to --output."""
    status = _status(args)
    prompts = _calibration_prompts(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pipe, defaults, model, _ = _load(args, status)
    kwargs = call_kwargs(pipe, defaults, argparse.Namespace(**{**vars(args), "prompt": None}))
    if prompts is not None:
        kwargs.update(call_arguments(pipe, {}, {"prompt": prompts}))
    kwargs["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    status(f"calibrating DyDiT on {len(prompts) if prompts else 1} prompt(s), {kwargs['num_inference_steps']} steps")
    dit_calibrate(pipe, DyDiTConfig(buckets=args.buckets), path=str(args.output), **kwargs)
    print(f"wrote {args.output} (DyDiT calibration of {model}); use it with --plan dydit:calibration={args.output}")
    return args.output


def _tuning_prompts(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    """--prompts and --held-out, read before any model loads; on a reference model (whose text encoder
    knows only the procedural captions) its captions when not given: --count for tuning, --count others."""
    prompts = read_prompts(args.prompt_file) if args.prompt_file is not None else None
    held_out = read_prompts(args.held_out_file, "--held-out") if args.held_out_file is not None else None
    kind, _, name = (args.model or default_model()).partition(":")
    if kind == "reference" and name in ("image", "video"):
        from .metrics import procedural

        batch = procedural.image_batch if name == "image" else procedural.video_batch
        captions = [scene.caption for scene in batch(2 * args.count, TUNING_SEED)[1]]
        prompts = prompts or captions[:args.count]
        held_out = held_out or captions[args.count:]
    if prompts is None:
        raise UsageError("dit-accel tune: give the tuning prompts with --prompts FILE")
    return prompts, held_out


def tune(args: argparse.Namespace) -> TuneResult:
    """`dit-accel tune`: the search, the plan file, its candidates beside it, and a table of the best."""
    if args.out.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise UsageError(f"--out {args.out}: a plan file ends in .json, .yaml or .yml")
    prompts, held_out = _tuning_prompts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    status = _status(args)
    pipe, defaults, model, _ = _load(args, status)
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_kwargs(pipe, defaults, argparse.Namespace(**{**vars(args), "prompt": None}))
    for key in ("prompt", "class_labels", "output_type"):
        kwargs.pop(key, None)
    result = tune_plan(pipe, prompts, target=args.target, budget=args.budget, batch=args.batch, seed=args.seed,
                       held_out=held_out, path=args.out, progress=status, **kwargs)
    search = args.out.with_name(args.out.stem + ".search.json")
    search.write_text(json.dumps({"model": model, **result.summary()}, indent=2) + "\n")
    print(tune_table(result))
    print(f"wrote {args.out} and {search}; use it with --plan {args.out}")
    return result


def tune_table(result: TuneResult) -> str:
    """The message and the candidates that met the target, fastest first, as markdown."""
    metric = result.target.metric
    met = sorted((c for c in result.candidates if c.status == "meets the target"),
                 key=lambda c: -(c.final_speedup or c.speedup))
    lines = [result.message, "", f"| candidate | speedup | side by side | FLOPs ratio | {metric} |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {c.label} | {c.speedup:.2f}x | {'-' if c.final_speedup is None else f'{c.final_speedup:.2f}x'} | "
              f"{c.flops_ratio or 1:.3f} | {c.quality(metric):.3f} |" for c in met[:10]]
    tried = len([c for c in result.candidates if c.batches])
    lines += ["", f"{tried} candidates tried, {result.generations} generations, {result.seconds:.0f} s"]
    return "\n".join(lines)


def generate(args: argparse.Namespace) -> list[PlanRun]:
    status = _status(args)
    device = args.device
    pipe, defaults, model, dtype = _load(args, status)
    kwargs = call_kwargs(pipe, defaults, args)
    runs = compare(pipe, list(args.plans or DEFAULT_PLANS), seed=args.seed, progress=status, **kwargs)

    args.out.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs, kwargs, model=model, pipeline=type(pipe).__name__, seed=args.seed,
                        device=device, dtype=str(dtype).removeprefix("torch."))
    summary["files"] = write_outputs(runs, summary["runs"], args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    table = markdown(summary)
    (args.out / "summary.md").write_text(table)
    print(table, end="")
    status(f"wrote {args.out}/")
    return runs


# -- summary ---------------------------------------------------------------------------------------

def _plain_fields(config) -> dict[str, Any]:
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
                     "configs": [{"technique": registration(c).name, **_plain_fields(c)} for c in run.configs],
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
        _save_gif([_pil(frame) for frame in video], out / f"{name}.gif")
    frames = [labelled_row([_pil(video[t]) for video in first], captions) for t in range(first[0].shape[0])]
    _save_gif(frames, out / "grid.gif")
    return {"grid": "grid.gif", "runs": [f"{name}.gif" for name in names]}


def _save_gif(frames: list[Image.Image], path: Path) -> None:
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
