"""`dit-accel bench`'s options: `generate`'s model and call options, plus plans, peers, prompts,
suites, batches, repeats and threads."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli_options import DEFAULT_PLANS, add_call_options, add_model_options, at_least, end_processes, plan_spec_arg
from ..config import ConfigError
from ..loading import UsageError
from ..models import UnsupportedModelError
from ..tuning.target import Target
from .content import DENSE
from .prompts import DEFAULT_BATCH, SUITE_COUNT, SUITE_SETTING
from .rows import PEER_KNOBS, PEERS
from .running import bench


def build_parser() -> argparse.ArgumentParser:
    """`generate`'s model and call options (the same types and checks), plus what a benchmark needs."""
    parser = argparse.ArgumentParser(
        prog="dit-accel bench", description=sys.modules[__package__].__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_options(parser)
    add_call_options(parser)
    seed = next(action for action in parser._actions if action.dest == "seed")
    seed.help = "the first batch's seed, every row runs on it; batch i runs on seed + i (default: 0)"
    parser.add_argument("--plan", "--accel", dest="plans", action="append", type=plan_spec_arg, metavar="SPEC|FILE",
                        help="an acceleration plan, repeatable, exactly as in `dit-accel generate` "
                        f"(default: {' and '.join(DEFAULT_PLANS)})")
    parser.add_argument("--peers", nargs="*", type=_peer, metavar="PEER[=V,...]",
                        help="add peer rows; alone: all of them, else the ones named: steps (dense with fewer "
                        "steps, at the fastest plan's time), fbcache, taylorseer, magcache (calibrated on the "
                        "first batch), pab, fastercache (diffusers' caches), dbcache (cache-dit's, when installed); "
                        "NAME=V,V,... makes one row per value of the peer's knob: "
                        + "; ".join(f"{name}: {knob[0]}" for name, knob in PEER_KNOBS.items()))
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--prompts", dest="prompt_file", type=Path, metavar="FILE",
                        help="prompts, one a line (blank and #-lines skipped), or a JSON list of strings")
    source.add_argument("--suite", choices=sorted(SUITE_COUNT),
                        help="the reference models' procedural captions, judged (agreement with dense, caption "
                        "accuracy, reference FID) at the standard setting: 8 captions a call, CFG 4, 20 steps (detail: 28; options "
                        "given override it); default for reference:* models, and its model is the default --model")
    parser.add_argument("--count", type=at_least(1, int), help="use this many prompts (suites: how many captions; "
                        f"default {SUITE_COUNT['image']} image or detail, {SUITE_COUNT['video']} video)")
    parser.add_argument("--batch", type=at_least(1, int), help=f"prompts per call (default: {SUITE_SETTING['batch']} with "
                        f"a suite, else {DEFAULT_BATCH})")
    parser.add_argument("--repeats", type=at_least(1, int), default=1,
                        help="rounds of dense and every row per batch; a row's time per batch is its median over "
                        "the rounds (default: %(default)s)")
    parser.add_argument("--equal", type=_target, metavar="METRIC=VALUE[,...]",
                        help="add the equal-quality table: each plan's and each peer family's fastest row that meets "
                        "this target (as in `dit-accel tune --target`: psnr, ssim, perceptual, judge; judge on the "
                        "suites only); peers named without values, or every peer when --peers is not given, sweep "
                        "their knob (steps: 3/4 to 1/4 of the steps; fbcache 0.05-0.4; taylorseer and pab 2-4; "
                        "magcache 0.06-0.25; dbcache 0.08-0.32)")
    parser.add_argument("--fid", type=_fid_source, metavar="DIR|dense",
                        help="FID of every row with torchmetrics' Inception (the [metrics] extra and its torch-fidelity "
                        "weights; refused before any generation where they cannot be loaded) against a folder of real "
                        "images, or against the dense outputs (dense); and the CLIP score of every sample against its "
                        "prompt where open_clip's ViT-B-32 weights load")
    parser.add_argument("--threads", type=at_least(1, int), help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="output folder (default: %(default)s)")
    return parser


def _target(text: str) -> Target:
    """An `--equal` target: every bound needs a value."""
    try:
        target = Target.parse(text)
        target.require_values("for --equal")
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return target


def _fid_source(text: str) -> str:
    """`dense`, or a folder that exists."""
    if text != DENSE and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: no such folder (give a folder of real images, or dense)")
    return text


def _peer(text: str) -> tuple[str, tuple | None]:
    """`NAME` or `NAME=V,V,...`: a peer and the values of its knob (None: its default)."""
    name, given, values = text.partition("=")
    if name not in PEERS:
        raise argparse.ArgumentTypeError(f"invalid choice: {name!r} (choose from {', '.join(PEERS)})")
    if not given:
        return name, None
    if name not in PEER_KNOBS:
        raise argparse.ArgumentTypeError(f"{name} has no setting to sweep")
    knob, kind = PEER_KNOBS[name]
    try:
        swept = tuple(kind(value) for value in values.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: {knob} values must be {kind.__name__}s, got {values!r}") from None
    if not swept or any(value <= 0 for value in swept):
        raise argparse.ArgumentTypeError(f"{name}: {knob} values must be > 0, got {values!r}")
    return name, swept


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        bench(args)
    except (ConfigError, NotImplementedError, UnsupportedModelError, UsageError) as error:
        parser.exit(2, f"dit-accel bench: error: {error}\n")
    end_processes()
    return 0
