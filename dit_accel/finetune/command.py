"""`dit-accel finetune` and `python -m dit_accel.finetune` (what `accelerate launch -m dit_accel.finetune`
runs in each process): one set of options, one command.

    dit-accel finetune --model reference:image --plan flexdit:sparse_blocks=(1,4),schedule=None \\
        --minutes 40 --out runs/flexdit
    accelerate launch --num_processes 2 --cpu -m dit_accel.finetune --model ... --plan ... --train-steps 500 --out ...

On a reference model the prompts default to its procedural captions, none of them one of the
captions `tune` and `bench --suite` measure on (those stay held out).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..cli_options import (TUNING_SEED, add_call_options, add_model_options, at_least, call_kwargs, end_processes,
                           load_pipeline, plan_spec_arg, status_printer)
from ..config import ConfigError
from ..loading import UsageError, default_model, read_prompts
from ..metrics.suites import SUITES
from ..plan_spec import parse_plan

#: the reference models' training captions come from this seed, less those tune and bench measure on
FINETUNE_SEED = 11
#: captions tune and the benchmarks take from TUNING_SEED (tuning and held out), kept out of training
_MEASURED_CAPTIONS = 2 * 64


def add_finetune_options(parser: argparse.ArgumentParser) -> None:
    add_model_options(parser)
    parser.add_argument("--plan", required=True, type=plan_spec_arg, metavar="SPEC|FILE",
                        help="the plan to fine-tune (FlexDiT: LoRA adapters on its pooled blocks; DyDiT: its routers), "
                        "e.g. flexdit:sparse_blocks=(1,4),schedule=None")
    parser.add_argument("--prompts", dest="prompt_file", type=Path, metavar="FILE",
                        help="training prompts, one a line or a JSON list (default on reference:* models: --count of "
                        "its procedural captions, none of those tune and bench measure on)")
    parser.add_argument("--count", type=at_least(1, int), default=256,
                        help="captions of a reference model to train on (default: %(default)s)")
    add_call_options(parser)
    parser.add_argument("--minutes", type=at_least(0.01, float), help="training time (the dense targets not counted)")
    parser.add_argument("--train-steps", type=at_least(1, int), help="optimiser steps (with --minutes: whichever "
                        "ends first)")
    parser.add_argument("--batch", type=at_least(1, int), default=8,
                        help="prompts per dense run and samples per training step (default: %(default)s)")
    parser.add_argument("--lr", type=at_least(0.0, float), default=1e-3, help="AdamW learning rate (default: "
                        "%(default)s)")
    parser.add_argument("--rank", type=at_least(1, int), default=8, help="LoRA rank (default: %(default)s)")
    parser.add_argument("--flops-weight", type=at_least(0.0, float), default=1.0,
                        help="weight of DyDiT's FLOPs-ratio constraint in the loss (default: %(default)s)")
    parser.add_argument("--threads", type=at_least(1, int), help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, required=True,
                        help="folder for the trained file, plan.json, the targets and the checkpoint (a fine-tune "
                        "started again into it resumes)")


def training_prompts(args: argparse.Namespace) -> list[str]:
    """--prompts, or on a reference model --count of its captions that tune and bench never measure on."""
    if args.prompt_file is not None:
        return read_prompts(args.prompt_file)
    kind, _, name = (args.model or default_model()).partition(":")
    if kind != "reference" or name not in SUITES:
        raise UsageError("dit-accel finetune: give the training prompts with --prompts FILE")
    measured = set(SUITES[name].captions(_MEASURED_CAPTIONS, TUNING_SEED))
    pool = SUITES[name].captions(4 * args.count + _MEASURED_CAPTIONS, FINETUNE_SEED)
    prompts = [c for c in dict.fromkeys(pool) if c not in measured][:args.count]
    if len(prompts) < args.count:
        raise UsageError(f"the {name} reference model has {len(prompts)} training captions apart from the measured "
                         f"ones; ask for fewer with --count")
    return prompts


def finetune_command(args: argparse.Namespace) -> list:
    """Check the plan and the options, load the model, fine-tune; print where the result is."""
    from . import finetune, trainable_members

    if args.minutes is None and args.train_steps is None:
        raise UsageError("dit-accel finetune: say how long with --minutes N or --train-steps N")
    configs = parse_plan(args.plan)
    trainable_members(configs)  # refused before the model loads
    prompts = training_prompts(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    status = status_printer(args)
    pipe, defaults, model, _ = load_pipeline(args, status)
    pipe.set_progress_bar_config(disable=True)
    kwargs = call_kwargs(pipe, defaults, argparse.Namespace(**{**vars(args), "prompt": None}))
    for key in ("prompt", "class_labels", "output_type", "generator"):
        kwargs.pop(key, None)
    status(f"fine-tuning {args.plan} on {model}: {len(prompts)} prompts, {kwargs.get('num_inference_steps')} steps")
    result = finetune(pipe, configs, prompts=prompts, out=args.out, minutes=args.minutes, steps=args.train_steps,
                      batch_size=args.batch, learning_rate=args.lr, lora_rank=args.rank,
                      flops_weight=args.flops_weight, seed=args.seed, progress=not args.quiet, **kwargs)
    print(f"wrote {args.out}/; use it with --plan {args.out / 'plan.json'}")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dit_accel.finetune",
                                     description="Fine-tune a plan by self-distillation from the dense model.")
    add_finetune_options(parser)
    args = parser.parse_args(argv)
    try:
        finetune_command(args)
    except (ConfigError, UsageError) as error:
        parser.exit(2, f"dit-accel finetune: error: {error}\n")
    end_processes()
    return 0
