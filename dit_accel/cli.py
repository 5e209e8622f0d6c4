"""The `dit-accel` command: `generate` (the dense pipeline and each plan on one seed, side by side),
`calibrate` (DyDiT's head scores), `tune` (the fastest plan for a quality target), `finetune` (a plan's
LoRA adapters or routers by self-distillation, `finetune/command.py`), `plans` (every plan
member and its fields), `gpu-check` (every technique on this device at real shapes, `gpu_check.py`);
`bench` and `ui` parse their own options (`dit_accel.bench`, `dit_accel.ui`).

    dit-accel generate --model tiny:sd3 --steps 20 --plan ras:sample_ratio=0.5 --plan ras+fbcache:threshold=0.1

`generate` writes `grid.png` (images) or `grid.gif` (videos) with every run labelled, one file per run,
and `summary.json` / `summary.md` (time, speedup, FLOPs ratio, PSNR and SSIM vs dense); prints the
table. Speedups are measured side by side in one process after an untimed warm-up of every run, so
they compare like with like; absolute times only mean something on the machine they were taken on.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .calibration import calibrate
from .comparison import PlanRun, compare
from .cli_options import (DEFAULT_PLANS, TUNING_SEED, add_call_options, add_model_options, at_least, call_kwargs,
                          load_pipeline, plan_spec_arg, status_printer)
from .config import ConfigError
from .finetune.command import add_finetune_options, finetune_command
from .gpu_check import PARTS, run_check, write
from .api import estimate
from .loading import UsageError, call_arguments, default_model, meta_transformer, read_prompts
from .metrics.suites import SUITES
from .models import UnsupportedModelError
from .outputs import markdown, summarize, write_outputs
from .plan_spec import describe, parse_plan
from .techniques.dydit import DyDiTConfig
from .techniques.model_check import ModelCheckConfig
from .tuning import Budget, CandidateStatus, Target, TuneResult, tune

# -- command line ----------------------------------------------------------------------------------

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


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [part for part in parts if part not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(PARTS)}, got {text!r}")
    return parts


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dit-accel", description="Accelerate diffusers diffusion-transformer pipelines and compare with dense.")
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser(
        "generate", help="run the dense pipeline and each plan on one seed; write a grid and a summary",
        description="Run the dense pipeline and each acceleration plan on the same seed and compare them.")
    add_model_options(gen)
    gen.add_argument("--prompt", help="text prompt (DiT: a class name); default: the model's own")
    add_call_options(gen)
    gen.add_argument("--plan", "--accel", dest="plans", action="append", type=plan_spec_arg, metavar="SPEC|FILE",
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
    add_model_options(cal)
    cal.add_argument("--prompt", dest="prompts", action="append", metavar="PROMPT",
                     help="a calibration prompt (DiT: a class name), repeatable; default: the model's own")
    cal.add_argument("--prompts", dest="prompt_file", type=Path, metavar="FILE",
                     help="a file of calibration prompts, one per line")
    add_call_options(cal)
    cal.add_argument("--buckets", type=at_least(1, int), default=4,
                     help="equal parts of the steps, each scored on its own (default: %(default)s)")
    cal.add_argument("--output", type=Path, required=True, help="the safetensors file to write")
    tune = commands.add_parser(
        "tune", help="search for the fastest plan that keeps a quality target on your prompts (or the best quality at "
        "a speed); write it as a plan file",
        description="Search plans (fewer steps, every technique's presets, diffusers' caches at several settings, "
                    "stacks across stages) for the fastest one whose quality vs dense on the tuning prompts meets "
                    "--target (or, with --speedup, the best quality at that speed), within --budget; re-measure it "
                    "on held-out prompts; write a plan file for --plan FILE, load_plan and acceleration=FILE "
                    "(refused for another model).")
    add_model_options(tune)
    tune.add_argument("--prompts", dest="prompt_file", type=Path, metavar="FILE",
                      help="tuning prompts, one a line or a JSON list (default on reference:* models: --count of its "
                      "procedural captions)")
    tune.add_argument("--held-out", dest="held_out_file", type=Path, metavar="FILE",
                      help="prompts to re-measure the tuned plan on (default on reference:* models: --count other "
                      "captions; else none)")
    tune.add_argument("--count", type=at_least(1, int), default=16,
                      help="captions of a reference model, for tuning and held out each (default: %(default)s)")
    add_call_options(tune)
    tune.add_argument("--target", type=_target, metavar="METRIC=VALUE[,...]",
                      help="quality vs dense to keep, every one at once: psnr=DB (mean per image or frame), "
                      "ssim=VALUE, perceptual=DISTANCE (at most: LPIPS where its weights exist, else the judge-feature "
                      "distance, said so), judge=SHARE (the judge's readings that equal dense's; reference:* models "
                      "and their captions only); the first is the one reported (default: psnr=30; with --speedup: "
                      "psnr)")
    tune.add_argument("--speedup", type=at_least(1.0, float), metavar="X",
                      help="best quality at a speed instead: the plan with the highest first --target metric among "
                      "those measured side by side at >= X times dense's speed; values in --target are floors then")
    tune.add_argument("--member", dest="members", action="append", type=plan_spec_arg, metavar="SPEC|FILE",
                      help="a config to try besides every technique's presets, alone and stacked, repeatable: a "
                      "fine-tuned one (its plan.json from dit-accel finetune) or any plan member")
    tune.add_argument("--budget", type=_budget, default=Budget(), metavar="TIME|Ngen",
                      help="when the search stops, with the best plan so far: 45m, 90s, 1h, or 120gen "
                      "(pipeline calls) (default: 45m)")
    tune.add_argument("--batch", type=at_least(1, int), default=8, help="prompts a call (default: %(default)s)")
    tune.add_argument("--threads", type=at_least(1, int), help="torch CPU threads (default: torch's)")
    tune.add_argument("--out", type=Path, default=Path("outputs/tuned_plan.json"),
                      help="the plan file to write (.json or .yaml; the search's candidates beside it in "
                      "<name>.search.json) (default: %(default)s)")
    tuned = commands.add_parser(
        "finetune", help="fine-tune a plan by self-distillation from the dense model (FlexDiT's LoRA adapters, DyDiT's "
        "routers); write the trained file and a plan file",
        description="Run the dense pipeline on the prompts, then train what the plan can learn (FlexDiT: LoRA "
                    "adapters on its pooled blocks; DyDiT: timestep-wise width routers and token routers) to give the "
                    "dense outputs at the same inputs; --out gets the trained file with the model's identity, "
                    "plan.json for --plan, and a checkpoint a run started again resumes from. Several processes: "
                    "accelerate launch -m dit_accel.finetune (same options).")
    add_finetune_options(tuned)
    commands.add_parser("bench", add_help=False,
                        help="benchmark plans and peers against dense over batches of prompts: time, FLOPs, memory, "
                        "quality; JSON, CSV, markdown and a speedup-PSNR plot (dit-accel bench --help)")
    commands.add_parser("ui", help="serve the Gradio page: baseline and accelerated side by side (dit-accel ui "
                        "--help)")
    plans = commands.add_parser("plans", help="list the plan members (techniques and diffusers' caches) with their "
                                "fields; with --estimate, the memory a plan will hold on a model",
                                description="Every name a plan may use, its stages, and each field's type, range and "
                                "doc. With --estimate MODEL: the bytes each --plan will hold at a call's sizes, from "
                                "the model's config alone (no weights load), against an 80 GB GPU.")
    plans.add_argument("--estimate", metavar="MODEL",
                       help="a release (wan2.1-14b, wan2.1-1.3b, hunyuanvideo, flux.1-dev, sd3.5-medium), a hub id or a "
                       "local pipeline folder")
    plans.add_argument("--plan", dest="plans", action="append", type=plan_spec_arg, metavar="SPEC|FILE",
                       help="a plan to estimate (repeatable; default: the plan with no member)")
    plans.add_argument("--height", type=int, default=480)
    plans.add_argument("--width", type=int, default=832)
    plans.add_argument("--frames", type=int, default=1, help="video frames (default: %(default)s)")
    plans.add_argument("--batch", type=int, default=1, help="prompts per call (default: %(default)s)")
    plans.add_argument("--guidance", action=argparse.BooleanOptionalAction, default=None,
                       help="whether the transformer also runs an unconditional branch (default: as the family's "
                       "pipelines do)")
    gpu = commands.add_parser(
        "gpu-check", help="check every technique on this GPU: keep-all equals dense under each SDPA backend, one "
        "attention layer and whole runs at Wan 2.1 and SD3.5 shapes; JSON and markdown",
        description="Offline, random weights, at most 8 minutes on one H100: (families) every tiny pipeline in bf16 "
                    "under each SDPA backend, every technique's keep_all() against dense and every preset; (layer) one "
                    "attention layer at Wan 2.1 1.3B and 14B 480p shapes, dense SDPA against SVG2, proxy and FlexDiT's "
                    "pooled K/V for each kernel, time and peak memory; (models) SD3.5-medium at 1024x1024 and Wan 2.1 "
                    "1.3B at 480p x 81 frames with random weights, dense against RAS, SVG2, proxy and RAS + "
                    "FirstBlockCache. Exits 1 when a keep-all differs from dense or a row crashed.")
    gpu.add_argument("--small", action="store_true",
                     help="reduced shapes in fp32, for a CPU: seconds instead of minutes (what the test suite runs)")
    gpu.add_argument("--device", help="torch device (default: cuda when available, else cpu; full shapes need cuda)")
    gpu.add_argument("--parts", type=_parts, default=PARTS, metavar="PART,...",
                     help=f"which parts to run, of {','.join(PARTS)} (default: all)")
    gpu.add_argument("--time-limit", type=at_least(1, float), default=450.0, metavar="SECONDS",
                     help="rows that would start later are skipped, said so in the report (default: %(default)s)")
    gpu.add_argument("--out", type=Path, default=Path("outputs/gpu_check"),
                     help="output folder: gpu_check.json and gpu_check.md (default: %(default)s)")
    gpu.add_argument("--quiet", action="store_true", help="no status lines")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ui"]:  # the UI parses its own options
        from .ui import main as ui_main

        return ui_main(argv[1:])
    if argv[:1] == ["bench"]:  # the benchmark parses its own options too, and is imported only for it
        from .bench import main as bench_main

        return bench_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "plans" and args.estimate is None:
        print(describe(), end="")
        return 0
    try:
        if args.command == "plans":
            print(estimate_command(args), end="")
            return 0
        if args.command == "gpu-check":
            return gpu_check_command(args)
        {"calibrate": calibrate_command, "tune": tune_command, "generate": generate_command,
         "finetune": finetune_command}[args.command](args)
    except (ConfigError, NotImplementedError, UnsupportedModelError, UsageError) as error:
        parser.exit(2, f"dit-accel: error: {error}\n")
    return 0


# -- commands ------------------------------------------------------------------------------------

#: what a plan and the weights may hold on an 80 GB GPU, leaving room for activations and VAE decoding
FITS_80GB = 70 * 2**30


def estimate_command(args: argparse.Namespace) -> str:
    """`dit-accel plans --estimate MODEL`: per plan, the GiB it will hold by kind, against an 80 GB GPU."""
    transformer = meta_transformer(args.estimate)
    lines = [f"{args.estimate} at {args.width}x{args.height}" + (f" x {args.frames} frames" if args.frames > 1 else "")
             + f", batch {args.batch}:", ""]
    for spec in args.plans or [""]:
        configs = parse_plan(spec) if spec else []
        held = estimate(transformer, *configs, height=args.height, width=args.width, num_frames=args.frames,
                        batch=args.batch, guidance=args.guidance)
        total = held["weights_bytes"] + held["device_bytes"]
        kinds = ", ".join(f"{kind} {b / 2**30:.1f}" for kind, b in held["by_kind"].items() if b) or "nothing"
        lines.append(f"{spec or 'dense'}: {held['device_bytes'] / 2**30:.1f} GiB on the device ({kinds}); with the "
                     f"weights {total / 2**30:.1f} GiB: {'fits' if total <= FITS_80GB else 'does NOT fit'} an 80 GB "
                     f"GPU (at most {FITS_80GB / 2**30:.0f} GiB, the rest for activations)")
        if total > FITS_80GB:
            lines += [f"  smaller: {option}" for option in held["smaller_forms"]]
    lines.append(f"(tokens {held['shapes']['tokens']}, samples a step {held['shapes']['samples']}, "
                 f"weights {held['weights_bytes'] / 2**30:.1f} GiB)")
    return "\n".join(lines) + "\n"


def _calibration_prompts(args: argparse.Namespace) -> list[str] | None:
    prompts = list(args.prompts or [])
    if args.prompt_file is not None:
        if not args.prompt_file.is_file():
            raise UsageError(f"--prompts {args.prompt_file}: no such file")
        prompts += [line.strip() for line in args.prompt_file.read_text().splitlines() if line.strip()]
    return prompts or None


def calibrate_command(args: argparse.Namespace) -> Path:
    """`dit-accel calibrate`: DyDiT's head and group scores over the prompts, in one batch, to --output."""
    status = status_printer(args)
    prompts = _calibration_prompts(args)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    pipe, defaults, model, _ = load_pipeline(args, status)
    kwargs = call_kwargs(pipe, defaults, argparse.Namespace(**{**vars(args), "prompt": None}))
    if prompts is not None:
        kwargs.update(call_arguments(pipe, {}, {"prompt": prompts}))
    kwargs["generator"] = torch.Generator("cpu").manual_seed(args.seed)
    status(f"calibrating DyDiT on {len(prompts) if prompts else 1} prompt(s), {kwargs['num_inference_steps']} steps")
    calibrate(pipe, DyDiTConfig(buckets=args.buckets), path=str(args.output), **kwargs)
    print(f"wrote {args.output} (DyDiT calibration of {model}); use it with --plan dydit:calibration={args.output}")
    return args.output


def _tuning_prompts(args: argparse.Namespace) -> tuple[list[str] | None, list[str] | None]:
    """--prompts and --held-out, read before any model loads; on a reference model (whose text encoder
    knows only the procedural captions) its captions when not given: --count for tuning, --count others."""
    prompts = read_prompts(args.prompt_file) if args.prompt_file is not None else None
    held_out = read_prompts(args.held_out_file, "--held-out") if args.held_out_file is not None else None
    kind, _, name = (args.model or default_model()).partition(":")
    if kind == "reference" and name in SUITES:
        captions = SUITES[name].captions(2 * args.count, TUNING_SEED)
        prompts = prompts or captions[:args.count]
        held_out = held_out or captions[args.count:]
    if prompts is None:
        raise UsageError("dit-accel tune: give the tuning prompts with --prompts FILE")
    return prompts, held_out


def tune_command(args: argparse.Namespace) -> TuneResult:
    """`dit-accel tune`: the search, the plan file, its candidates beside it, and a table of the best."""
    if args.out.suffix.lower() not in (".json", ".yaml", ".yml"):
        raise UsageError(f"--out {args.out}: a plan file ends in .json, .yaml or .yml")
    prompts, held_out = _tuning_prompts(args)
    members = [config for spec in args.members or [] for config in parse_plan(spec)
               if not isinstance(config, ModelCheckConfig)]
    args.target = Target.for_search(args.target, args.speedup)  # refused before a hub model loads for nothing
    spec = args.model or default_model()
    args.target.check_judge(spec, prompts + (held_out or []), spec == "reference:video")
    if args.threads:
        torch.set_num_threads(args.threads)
    status = status_printer(args)
    pipe, defaults, model, _ = load_pipeline(args, status)
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_kwargs(pipe, defaults, argparse.Namespace(**{**vars(args), "prompt": None}))
    for key in ("prompt", "class_labels", "output_type"):
        kwargs.pop(key, None)
    result = tune(pipe, prompts, target=args.target, speedup=args.speedup, budget=args.budget, batch=args.batch,
                  seed=args.seed, held_out=held_out, path=args.out, progress=status, members=members, **kwargs)
    search = args.out.with_name(args.out.stem + ".search.json")
    search.write_text(json.dumps({"model": model, **result.summary()}, indent=2) + "\n")
    print(tune_table(result))
    print(f"wrote {args.out} and {search}; use it with --plan {args.out}")
    return result


def tune_table(result: TuneResult) -> str:
    """The message and the candidates that met the target, fastest first (the speed mode: best first), with
    every metric of the target, as markdown."""
    metrics = result.target.metrics
    met = [c for c in result.candidates if c.status is CandidateStatus.MEETS_TARGET]
    if result.wanted_speedup is None:
        met.sort(key=lambda c: -(c.final_speedup or c.speedup))
    else:
        primary = result.target.primary
        met.sort(key=lambda c: -primary.score(c.quality(primary.metric)))
    lines = [result.message, "", "| candidate | speedup | side by side | FLOPs ratio | " + " | ".join(metrics) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(metrics)]
    lines += [f"| {c.label} | {c.speedup:.2f}x | {'-' if c.final_speedup is None else f'{c.final_speedup:.2f}x'} | "
              f"{c.flops_ratio or 1:.3f} | " + " | ".join(f"{c.quality(m):.3f}" for m in metrics) + " |"
              for c in met[:10]]
    tried = len([c for c in result.candidates if c.batches])
    lines += ["", f"{tried} candidates tried, {result.generations} generations, {result.seconds:.0f} s"]
    if result.perceptual is not None:
        lines.append(f"perceptual: {result.perceptual}")
    return "\n".join(lines)


def generate_command(args: argparse.Namespace) -> list[PlanRun]:
    status = status_printer(args)
    device = args.device
    pipe, defaults, model, dtype = load_pipeline(args, status)
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


def gpu_check_command(args: argparse.Namespace) -> int:
    """`dit-accel gpu-check`: the check, its JSON and markdown in --out, the markdown printed; 1 if a row failed."""
    report = run_check(small=args.small, device=args.device, parts=args.parts, time_limit=args.time_limit,
                       say=status_printer(args))
    paths = write(report, args.out)
    print(paths[1].read_text(), end="")
    status_printer(args)(f"wrote {paths[0]} and {paths[1]}")
    return 1 if report["failures"] else 0
