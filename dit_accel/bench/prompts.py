"""What a benchmark generates: `--prompts`, the reference models' caption suites at their standard
setting, a class-conditional model's class names, or the built-in prompt sets (`prompts/`: 64 image
and 30 video prompts, also what `dit-accel tune` offers); split into the pipeline calls of each batch."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from pathlib import Path
from typing import Any

from ..cli_options import TUNING_SEED
from ..loading import UsageError, default_model, read_prompts
from ..metrics.suites import SUITES


PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
#: the caption suites' standard setting: the reference models' own call, 8 captions a call (the steps are
#: each suite's `steps`)
SUITE_SETTING = {"batch": 8, "guidance": 4.0}
#: captions per suite
SUITE_COUNT = {name: suite.count for name, suite in SUITES.items()}
#: procedural scenes of the suites: the captions `dit-accel tune` tunes on; SUITE_SEED + 1 draws the real
#: images the reference FID compares with
SUITE_SEED = TUNING_SEED
#: built-in prompts used unless --count asks for more (benchmarks/prompts/ holds 64 image and 30 video ones)
BUILT_IN_COUNT = {"image": 8, "video": 4}
#: prompts a call when they come from a file or the built-in sets
DEFAULT_BATCH = 4


@dataclasses.dataclass
class Prompts:
    """What the rows generate; `scenes` (suites only) are what the judge checks the samples against."""

    texts: list[str]
    source: str
    suite: str | None = None
    scenes: list | None = None


def suite_of(args: argparse.Namespace) -> str | None:
    """The caption suite: `--suite`, or the reference model's own when no prompts are given (its text
    encoder knows only the procedural vocabulary, and its samples can then be judged)."""
    if args.suite or args.prompt_file is not None:
        return args.suite
    kind, _, name = (args.model or default_model()).partition(":")
    return name if kind == "reference" and name in SUITE_COUNT else None


def prompt_set(args: argparse.Namespace, suite: str | None, given: list[str] | None, pipe: Any,
               video: bool) -> Prompts:
    """The prompts `given` (`--prompts`), the suite's captions, the class names of a class-conditional
    pipeline (DiT), or the built-in prompts for images or videos; the first `--count` (of the built-in
    sets, `BUILT_IN_COUNT` unless a count is given)."""
    if suite is not None:
        _, scenes = SUITES[suite].draw(args.count or SUITE_COUNT[suite], SUITE_SEED)
        return Prompts([s.caption for s in scenes], f"suite {suite}", suite, scenes)
    if given is not None:
        texts, source = given, str(args.prompt_file)
    elif "prompt" not in call_parameters(pipe) and hasattr(pipe, "labels"):
        names = {}
        for name, index in pipe.labels.items():
            names.setdefault(index, name)
        texts, source = [names[i] for i in sorted(names)][:8], "the model's first class names"
    else:
        path = PROMPTS_DIR / ("video.txt" if video else "image.txt")
        texts, source = read_prompts(path), f"built-in {path.stem} prompts"
        texts = texts[:args.count or BUILT_IN_COUNT["video" if video else "image"]]
    return Prompts(texts[:args.count] if args.count else texts, source)


def call_parameters(pipe: Any) -> dict:
    return inspect.signature(pipe.__call__).parameters


def batch_calls(pipe: Any, call: dict[str, Any], prompts: Prompts, size: int) -> list[tuple[dict, list | None]]:
    """The pipeline call for each batch of prompts (class labels for DiT) and its scenes, all made before
    anything runs, so a prompt the model cannot take stops the benchmark at once."""
    batches = []
    for start in range(0, len(prompts.texts), size):
        texts = prompts.texts[start:start + size]
        if "prompt" in call_parameters(pipe):
            what = {"prompt": texts}
        else:
            try:
                what = {"class_labels": pipe.get_label_ids(texts)}
            except (AttributeError, ValueError) as error:
                raise UsageError(f"{type(pipe).__name__} takes class names as prompts: {error}") from error
        scenes = prompts.scenes[start:start + size] if prompts.scenes is not None else None
        batches.append(({**call, **what}, scenes))
    return batches
