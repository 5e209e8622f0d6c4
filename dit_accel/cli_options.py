"""The command-line options and model loading that `dit-accel generate|calibrate|tune`, `dit-accel bench`
and `dit-accel ui` share, so each parses a model, a call and a plan the same way."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ConfigError
from .loading import UsageError, call_arguments, default_model, load_model
from .plan_files import is_plan_file
from .plan_spec import parse_plan

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


def plan_spec_arg(text: str) -> str:
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


def at_least(low: float, kind: type) -> Callable[[str], Any]:
    """argparse type: an int or float no smaller than `low`."""

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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --device, --dtype, --quiet."""
    parser.add_argument("--model", help="hub id or local folder (DiffusionPipeline.from_pretrained), tiny:<family>, "
                        "medium:sd3|wan|pixart or reference:image|detail|video (default: reference:image if its weights are "
                        "installed, else tiny:sd3)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                        help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")


def add_call_options(parser: argparse.ArgumentParser) -> None:
    """--seed and the pipeline call's --steps, --height, --width, --frames, --guidance."""
    parser.add_argument("--seed", type=int, default=0, help="one seed for every run (default: 0)")
    parser.add_argument("--steps", type=at_least(1, int), help="inference steps (default: the model's own)")
    parser.add_argument("--height", type=at_least(1, int), help="pixels (default: the model's own)")
    parser.add_argument("--width", type=at_least(1, int), help="pixels (default: the model's own)")
    parser.add_argument("--frames", type=at_least(1, int), help="video frames")
    parser.add_argument("--guidance", type=at_least(0, float), help="guidance scale")


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


def status_printer(args: argparse.Namespace) -> Callable[[str], None]:
    """Status lines to stderr, or nowhere under --quiet."""
    return (lambda message: None) if args.quiet else (lambda message: print(message, file=sys.stderr))


def load_pipeline(args: argparse.Namespace, status: Callable[[str], None]) -> tuple[Any, dict[str, Any], str, torch.dtype]:
    """The pipeline --model names on --device in --dtype: (pipeline, its call defaults, the model spec, dtype)."""
    dtype = DTYPES[args.dtype] if args.dtype != "auto" else (
        torch.bfloat16 if torch.device(args.device).type == "cuda" else torch.float32)
    model = args.model or default_model()
    status(f"loading {model}")
    pipe, defaults = load_model(model, args.device, dtype)
    pipe.set_progress_bar_config(disable=args.quiet)
    return pipe, defaults, model, dtype


def end_processes() -> None:
    """Under `accelerate launch`: every process leaves the process group together before it exits (a process
    that exits with gloo's threads still running aborts: "terminate called without an active exception")."""
    import torch.distributed as distributed

    if distributed.is_available() and distributed.is_initialized():
        distributed.barrier()
        distributed.destroy_process_group()
