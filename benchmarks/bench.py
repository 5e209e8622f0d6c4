"""`dit-accel bench`: acceleration plans and their peers against dense, over batches of prompts.

    dit-accel bench --model reference:image --plan ras:sample_ratio=0.5 --plan "ras+fbcache:threshold=0.12" --peers
    python -m dit_accel.benchmarks.bench --model tiny:sd3 --steps 8 --plan ras --peers fbcache steps

For every batch of `--batch` prompts it runs dense, then every row in turn on the same seed (one
seed per batch), so a drift of the machine's speed hits all rows alike, after one untimed short
warm-up run of every row. Every timed row runs under a handle (dense under the measure-only
`dit_accel.measure`, plans under `dit_accel.apply`), so transformer time and FLOPs come from the
same work ledger for all of them; one more row, "dense (no hooks)", runs with no handle at all and
shows what the handle itself costs. Peers (`--peers`) are what a plan has to beat: dense with fewer
steps at the fastest plan's time, diffusers' own step caches and cache-dit's DBCache.

Writes `results.json` (machine, settings, processes, every row), `results.csv`, `results.md` (the
table, the machine in its first line) and `pareto_psnr.png` (speedup against PSNR vs dense, the Pareto
front marked) to `--out`. Speedups compare like with like only within one run on one machine.

Under `accelerate launch` the batches are split across the processes by rank, batch i on rank
i % processes and still on seed + i, and the main process merges every process's sums into the same
rows and writes the outputs; the others write nothing:

    accelerate launch --num_processes 2 -m dit_accel.benchmarks.bench --model ...               # GPUs
    accelerate launch --multi_gpu --num_processes 2 -m dit_accel.benchmarks.bench --device cpu ...  # CPUs

(on a machine without GPUs `--multi_gpu` is what starts several processes, torchrun's launcher; accelerate's
`--cpu` starts one.)
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import resource
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

import torch

import dit_accel
from dit_accel.api import PlanRun
from dit_accel.benchmarks.common import markdown_table, timed
from dit_accel.cli import (DEFAULT_PLANS, TUNING_SEED, _call_options, _load, _model_options, _plain_fields, _plan_spec,
                           _status, call_kwargs)
from dit_accel.config import ConfigError
from dit_accel.loading import UsageError, default_model, read_prompts
from dit_accel.machine import machine
from dit_accel.metrics import judge as judges
from dit_accel.metrics import procedural
from dit_accel.metrics.quality import (PSNR_CAP_DB, PerceptualDistance, channels_first, frames, mean_db,  # noqa: F401
                                       psnr_frames, ssim_frames)
from dit_accel.models import UnsupportedModelError
from dit_accel.plans import parse_plan
from dit_accel.runtime.registry import registration

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
#: the caption suites' standard setting: the reference models' own call, 8 captions a call
SUITE_SETTING = {"batch": 8, "guidance": 4.0, "steps": 20}
#: captions per suite (image: 2 batches; video: 1, a video sample costs ~3x an image one)
SUITE_COUNT = {"image": 16, "video": 8}
#: procedural scenes of the suites: the captions `dit-accel tune` tunes on; SUITE_SEED + 1 draws the real
#: images the reference FID compares with
SUITE_SEED = TUNING_SEED
#: built-in prompts used unless --count asks for more (benchmarks/prompts/ holds 64 image and 30 video ones)
BUILT_IN_COUNT = {"image": 8, "video": 4}
#: prompts a call when they come from a file or the built-in sets
DEFAULT_BATCH = 4
#: steps of each row's untimed warm-up run
WARMUP_STEPS = 2
#: threshold of the FirstBlockCache and DBCache peers (the stacking benchmark's image setting)
PEER_THRESHOLD = 0.12
PEERS = ("steps", "fbcache", "taylorseer", "magcache", "pab", "fastercache", "dbcache")
#: each peer's one knob, swept by `--peers NAME=V,V,...` (name, type); FasterCache has none
PEER_KNOBS = {"steps": ("step count", int), "fbcache": ("threshold", float),
              "taylorseer": ("cache interval", int), "magcache": ("threshold", float),
              "pab": ("spatial block skip range", int), "dbcache": ("residual diff threshold", float)}
#: each knob's default (the stacking benchmark's settings; the fewer-steps peer matches the fastest plan)
PEER_DEFAULTS = {"fbcache": PEER_THRESHOLD, "taylorseer": 2, "magcache": 0.06, "pab": 2, "dbcache": PEER_THRESHOLD}
MIB = 2**20


# -- command line ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """`generate`'s model and call options (the same types and checks), plus what a benchmark needs."""
    parser = argparse.ArgumentParser(
        prog="dit-accel bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_options(parser)
    _call_options(parser)
    seed = next(action for action in parser._actions if action.dest == "seed")
    seed.help = "the first batch's seed, every row runs on it; batch i runs on seed + i (default: 0)"
    parser.add_argument("--plan", "--accel", dest="plans", action="append", type=_plan_spec, metavar="SPEC|FILE",
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
                        help="the reference models' procedural captions, judged (caption accuracy, reference "
                        "FID) at the standard setting: 8 captions a call, CFG 4, 20 steps (options given override "
                        "it); default for reference:* models, and its model is the default --model")
    parser.add_argument("--count", type=_positive, help="use this many prompts (suites: how many captions; "
                        f"default {SUITE_COUNT['image']} image, {SUITE_COUNT['video']} video)")
    parser.add_argument("--batch", type=_positive, help=f"prompts per call (default: {SUITE_SETTING['batch']} with "
                        f"a suite, else {DEFAULT_BATCH})")
    parser.add_argument("--repeats", type=_positive, default=1,
                        help="rounds of dense and every row per batch; a row's time per batch is its median over "
                        "the rounds (default: %(default)s)")
    parser.add_argument("--threads", type=_positive, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench"), help="output folder (default: %(default)s)")
    return parser


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


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from error
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        bench(args)
    except (ConfigError, NotImplementedError, UnsupportedModelError, UsageError) as error:
        parser.exit(2, f"dit-accel bench: error: {error}\n")
    return 0


# -- prompts ---------------------------------------------------------------------------------------

@dataclasses.dataclass
class Prompts:
    """What the rows generate; `scenes` (suites only) are what the judge checks the samples against."""

    texts: list[str]
    source: str
    suite: str | None = None
    scenes: list | None = None


def _suite_of(args: argparse.Namespace) -> str | None:
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
        batch = procedural.image_batch if suite == "image" else procedural.video_batch
        _, scenes = batch(args.count or SUITE_COUNT[suite], SUITE_SEED)
        return Prompts([s.caption for s in scenes], f"suite {suite}", suite, scenes)
    if given is not None:
        texts, source = given, str(args.prompt_file)
    elif "prompt" not in _parameters(pipe) and hasattr(pipe, "labels"):
        names = {}
        for name, index in pipe.labels.items():
            names.setdefault(index, name)
        texts, source = [names[i] for i in sorted(names)][:8], "the model's first class names"
    else:
        path = PROMPTS_DIR / ("video.txt" if video else "image.txt")
        texts, source = read_prompts(path), f"built-in {path.stem} prompts"
        texts = texts[:args.count or BUILT_IN_COUNT["video" if video else "image"]]
    return Prompts(texts[:args.count] if args.count else texts, source)


def _parameters(pipe: Any) -> dict:
    return inspect.signature(pipe.__call__).parameters


def batch_calls(pipe: Any, call: dict[str, Any], prompts: Prompts, size: int) -> list[tuple[dict, list | None]]:
    """The pipeline call for each batch of prompts (class labels for DiT) and its scenes, all made before
    anything runs, so a prompt the model cannot take stops the benchmark at once."""
    batches = []
    for start in range(0, len(prompts.texts), size):
        texts = prompts.texts[start:start + size]
        if "prompt" in _parameters(pipe):
            what = {"prompt": texts}
        else:
            try:
                what = {"class_labels": pipe.get_label_ids(texts)}
            except (AttributeError, ValueError) as error:
                raise UsageError(f"{type(pipe).__name__} takes class names as prompts: {error}") from error
        scenes = prompts.scenes[start:start + size] if prompts.scenes is not None else None
        batches.append(({**call, **what}, scenes))
    return batches


# -- processes -------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Processes:
    """The processes running the benchmark: one in a plain run; under `accelerate launch`, the launched
    ones (torch.distributed through accelerate: gloo on CPUs). Batch i runs on rank i % world."""

    rank: int = 0
    world: int = 1
    #: the device accelerate gives this process (cuda:<local rank> under a multi-GPU launch)
    device: str | None = None

    @classmethod
    def current(cls, device: str = "cpu") -> Processes:
        """This process among the launched ones. For a CPU `device` accelerate is told so (else a process
        launched by torchrun on a machine without a GPU counts as a plain one): gloo between the processes."""
        from accelerate import PartialState

        state = PartialState(cpu=torch.device(device).type == "cpu")
        return cls(state.process_index, state.num_processes, str(state.device))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, count: int) -> list[int]:
        """The indices of this process's batches out of `count` (none when there are more processes)."""
        return list(range(self.rank, count, self.world))

    def device_for(self, device: str) -> str:
        """`--device` for this process: a bare "cuda" becomes the launched process's own GPU."""
        ours = torch.device(self.device or "cpu")
        asked = torch.device(device)
        return str(ours) if self.world > 1 and asked.type == ours.type != "cpu" and asked.index is None else device

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every process (every process must call it, at the same point)."""
        if self.world == 1:
            return value
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([value], from_process=0)[0]

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value`, by rank, on every process."""
        if self.world == 1:
            return [value]
        from accelerate.utils import gather_object

        return gather_object([value])


ONE_PROCESS = Processes()


# -- rows ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    """One line of the table: how it runs, and what its timed runs measured, summed over the batches."""

    label: str
    #: "dense", "no hooks", "plan" or "peer"
    kind: str
    configs: list = dataclasses.field(default_factory=list)
    #: a step count other than the call's (the fewer-steps peer; None there until the first batch sets it)
    steps: int | None = None
    #: the fewer-steps peer: its steps follow the fastest plan's speedup on the first batch
    matches_fastest: bool = False
    #: under a handle (the work ledger: FLOPs, transformer time)
    ledger: bool = True
    #: its configs were calibrated on the first batch (that run was its warm-up)
    calibrated: bool = False
    #: switches an outside accelerator on (cache-dit) and returns its off switch
    enable: Callable[[Any], Callable[[], None]] | None = None
    spec: str | None = None
    error: str | None = None
    samples: int = 0
    seconds: float = 0.0
    transformer_seconds: float | None = 0.0
    flops: float | None = 0.0
    dense_flops: float | None = 0.0
    peak_bytes: int | None = None
    psnr_frames: list[float] = dataclasses.field(default_factory=list)
    #: SSIM and caption accuracy summed over the frames / samples they were taken on
    ssim_sum: float = 0.0
    perceptual_sum: float = 0.0
    accuracy_sum: float = 0.0
    features: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def fail(self, error: BaseException) -> None:
        """A row that raised is kept with its error (a peer diffusers cannot run on this model, ...)."""
        first = (str(error).strip().splitlines() or [""])[0]
        self.error = f"{type(error).__name__}: {first}"[:300]


def plan_rows(pipe: Any, specs: list[str], steps: int) -> list[Row]:
    """One row per `--plan`, its schedules scaled to the call's steps; what only the model can refuse (a
    calibration file for another model) is refused here, before any generation."""
    rows = []
    for spec in specs:
        configs = parse_plan(spec, steps)
        dit_accel.apply(pipe, *configs).remove()
        rows.append(Row(spec, "plan", configs, spec=spec))
    return rows


def peer_rows(peers: list[tuple[str, tuple | None]], steps: int, video: bool) -> tuple[list[Row], list[str]]:
    """The peers asked for that this environment has, one row per value of its knob (its default when none
    is given), and a note for each it lacks. Their settings follow this project's stacking benchmark: the
    caches start after RAS's dense warm-up steps."""
    import diffusers.hooks as hooks

    warmup = dit_accel.RASConfig.for_steps(steps).warmup_steps
    caches = {
        "fbcache": ("FirstBlockCacheConfig", lambda v: (f"FirstBlockCache {v:g}", dict(threshold=v))),
        "taylorseer": ("TaylorSeerCacheConfig", lambda v: (
            f"TaylorSeer ({_every(v)})",
            dict(cache_interval=v, disable_cache_before_step=warmup, max_order=1, taylor_factors_dtype=torch.float32))),
        "magcache": ("MagCacheConfig", lambda v: (
            f"MagCache {v:g} (calibrated)",
            dict(threshold=v, max_skip_steps=2, calibrate=True, num_inference_steps=steps))),
        "pab": ("PyramidAttentionBroadcastConfig", lambda v: (
            f"PyramidAttentionBroadcast ({_every(v)})", dict(spatial_attention_block_skip_range=v))),
        "fastercache": ("FasterCacheConfig", lambda v: (
            "FasterCache", dict(tensor_format="BFCHW" if video else "BCHW"))),
    }
    rows, notes = [], []
    for name, values in peers:
        if name == "steps":
            if steps <= 1:
                notes.append("no fewer-steps peer: the call has 1 step")
            elif values is None:
                rows.append(Row("dense, fewer steps", "peer", matches_fastest=True))
            else:
                rows += [Row(f"dense, {count} steps", "peer", steps=count) for count in values]
        elif name == "dbcache":
            if importlib.util.find_spec("cache_dit") is None:
                notes.append("cache-dit is not installed, so there is no DBCache row (pip install cache-dit)")
            else:
                rows += [Row(f"cache-dit DBCache F1B0 {value:g}", "peer", enable=_dbcache(value, warmup))
                         for value in values or (PEER_DEFAULTS[name],)]
        else:
            config_name, setting = caches[name]
            config_class = getattr(hooks, config_name, None)
            if config_class is None:
                notes.append(f"this diffusers has no {config_name}: no {name} row")
                continue
            for value in values or (PEER_DEFAULTS.get(name),):
                label, fields = setting(value)
                rows.append(Row(label, "peer", [config_class(**fields)]))
    return rows, notes


def _every(count: int) -> str:
    return "every step" if count == 1 else f"every {({2: '2nd', 3: '3rd'}).get(count, f'{count}th')} step"


def _dbcache(threshold: float, warmup: int) -> Callable[[Any], Callable[[], None]]:
    """cache-dit's DBCache with one forward block and no backward block (F1B0), after `warmup` dense steps,
    as the former RAS quality benchmark did; on for one run, then off again."""

    def enable(pipe: Any) -> Callable[[], None]:
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "warning")
        import cache_dit

        cache_dit.enable_cache(pipe, cache_config=cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=warmup, residual_diff_threshold=threshold))
        return lambda: cache_dit.disable_cache(pipe)

    return enable


def fewer_steps(steps: int, speedup: float | None) -> tuple[int, str]:
    """Dense steps whose time matches a plan `speedup` times faster (round(steps / speedup)), and why;
    half the steps when no plan is faster, so that the row still says what fewer steps cost in quality."""
    if speedup is None or speedup <= 1.05:
        return max(1, steps // 2), "half the steps: no plan was faster"
    return min(steps - 1, max(1, round(steps / speedup))), "time of the fastest plan"


def build_rows(args: argparse.Namespace, pipe: Any, steps: int, video: bool) -> tuple[list[Row], list[str]]:
    """dense (measured), dense (no hooks), the plans, then the peers: the order every batch runs in."""
    rows = [Row("dense", "dense"), Row("dense (no hooks)", "no hooks", ledger=False)]
    rows += plan_rows(pipe, list(args.plans or DEFAULT_PLANS), steps)
    asked = [(name, None) for name in PEERS] if args.peers == [] else list(dict.fromkeys(args.peers or []))
    peers, notes = peer_rows(asked, steps, video)
    return rows + peers, notes


# -- running ---------------------------------------------------------------------------------------

class PeakMemory:
    """Peak memory of one run. On CUDA `max_memory_allocated` (weights included). On a CPU the process's
    peak RSS above its RSS at the start of the run, after glibc gave back the heap it kept from earlier
    runs (else a run reusing it shows 0): Linux lets a process reset its peak (/proc/self/clear_refs);
    elsewhere only the growth of the lifetime peak is seen (often 0 after the first run)."""

    def __init__(self, device: Any):
        self.cuda = torch.device(device).type == "cuda"
        self.device = device
        self.bytes: int | None = None
        self._trim = self._malloc_trim()
        self.resets = not self.cuda and self._reset()
        self.kind = ("CUDA max_memory_allocated" if self.cuda else
                     "CPU peak RSS above the run's start (peak reset per run)" if self.resets else
                     "CPU growth of the process's peak RSS (getrusage)")

    @staticmethod
    def _malloc_trim() -> Callable[[], None]:
        try:
            import ctypes

            trim = ctypes.CDLL("libc.so.6").malloc_trim
            return lambda: trim(0)
        except (OSError, AttributeError):
            return lambda: None

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def _max_rss() -> int:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024

    def __enter__(self) -> "PeakMemory":
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._trim()
            if self.resets:
                self._reset()
        self._start = 0 if self.cuda else self._max_rss()
        return self

    def __exit__(self, *exc) -> None:
        self.bytes = (torch.cuda.max_memory_allocated(self.device) if self.cuda else self._max_rss() - self._start)


def run_row(pipe: Any, row: Row, call: dict[str, Any], seed: int, memory: PeakMemory) -> PlanRun:
    """One generation of `row`: plans under `apply` (inside `timed_run`), dense and cache-dit (switched on
    first) under the measure-only handle, "no hooks" under none; the handle is set up and removed outside
    the timed call."""
    if row.steps is not None and "num_inference_steps" in call:
        call = {**call, "num_inference_steps": row.steps}
    off = row.enable(pipe) if row.enable is not None else None
    try:
        with memory:
            if row.configs or not row.ledger:
                return timed(pipe, call, row.configs, seed)
            with dit_accel.measure(pipe) as handle:
                run = timed(pipe, call, [], seed)
                run.report = handle.report()
                return run
    finally:
        if off is not None:
            off()


def calibrate_rows(pipe: Any, rows: list[Row], call: dict[str, Any], seed: int, say,
                   processes: Processes = ONE_PROCESS, run: bool = True) -> None:
    """MagCache's per-step ratios from a run on the first batch (`dit_accel.calibrate`). Under several
    processes every one with batches to run calibrates on the first batch (the run is also the row's
    warm-up) and then all take rank 0's ratios (or its error), broadcast: every process runs the same
    configs by construction, even on a device whose kernels are not bit for bit deterministic."""
    calibrating = [row for row in rows
                   if row.error is None and any(getattr(c, "calibrate", False) is True for c in row.configs)]
    for row in calibrating if run else []:
        say(f"calibrating {row.label} on the first batch")
        try:
            row.configs = [dit_accel.calibrate(pipe, c, **call, generator=torch.Generator().manual_seed(seed))
                           if getattr(c, "calibrate", False) is True else c for c in row.configs]
            row.calibrated = True
        except Exception as error:  # a row that cannot run is reported, not fatal
            row.fail(error)
    if processes.world > 1 and calibrating:
        settled = processes.broadcast([(row.configs, row.error) for row in calibrating])
        for row, (configs, error) in zip(calibrating, settled):
            row.configs, row.error = configs, error


def warm_up(pipe: Any, rows: list[Row], call: dict[str, Any], seed: int, memory: PeakMemory, say) -> None:
    """One untimed short run of every row, through its own handle or accelerator. A row bound to the
    call's step count (MagCache's ratios, a tuned plan file) cannot run fewer steps: calibrated here, it
    was warmed up by its calibration, else it warms up with the whole call."""
    short = {**call, "num_inference_steps": min(call["num_inference_steps"], WARMUP_STEPS)}
    for row in rows:
        bound = any(getattr(c, "num_inference_steps", None) for c in row.configs)
        if row.error is not None or (bound and row.calibrated):
            continue
        warm = call if bound else short
        say(f"warm-up: {row.label}, {warm['num_inference_steps']} steps, untimed")
        try:
            run_row(pipe, row, warm, seed, memory)
        except Exception as error:
            if row.kind == "dense":
                raise
            row.fail(error)


@dataclasses.dataclass
class Judging:
    """The offline judge and the real procedural images a suite's samples are compared with."""

    judge: Any
    video: bool
    real_features: torch.Tensor
    real: dict[str, float]


def judging(prompts: Prompts, video: bool) -> Judging | None:
    """The judge when the prompts are a suite of this model's kind (image captions for images, video
    captions for videos); also the real images' own scores, for scale."""
    if prompts.suite is None or (prompts.suite == "video") != video:
        return None
    judge = judges.load_judge()
    batch = procedural.video_batch if video else procedural.image_batch
    real, _ = batch(len(prompts.texts), SUITE_SEED)
    others, _ = batch(len(prompts.texts), SUITE_SEED + 1)
    real, others = (real.transpose(1, 2), others.transpose(1, 2)) if video else (real, others)  # pipeline layout
    real_features = judge_features(judge, others)
    score = {"caption_accuracy": caption_accuracy(judge, real, prompts.scenes, video),
             "reference_fid": judges.frechet_distance(judge_features(judge, real), real_features)}
    return Judging(judge, video, real_features, score)


def record(row: Row, run: PlanRun, dense: PlanRun, peak: int | None, scenes: list | None,
           judged: Judging | None, perceptual: PerceptualDistance) -> None:
    """Add one batch's run to its row: time, ledger, memory, quality vs this batch's dense run, judge."""
    samples = run.output.shape[0]
    row.samples += samples
    row.seconds += run.seconds
    report = run.report
    for key in ("transformer_seconds", "flops", "dense_flops"):
        value = getattr(row, key)
        setattr(row, key, None if report is None or value is None else value + report[key])
    row.peak_bytes = peak if row.peak_bytes is None else max(row.peak_bytes, peak or 0)
    if run is not dense:
        values = psnr_frames(run.output, dense.output)
        row.psnr_frames += values
        row.ssim_sum += ssim_frames(run.output, dense.output) * len(values)
        row.perceptual_sum += perceptual(frames(run.output), frames(dense.output)) * len(values)
    if judged is not None and scenes is not None:
        row.accuracy_sum += caption_accuracy(judged.judge, run.output, scenes, judged.video) * samples
        row.features.append(judge_features(judged.judge, run.output))


def _with_rank(say: Callable[[str], None], processes: Processes) -> Callable[[str], None]:
    """Progress lines that say which process wrote them."""
    def say_with_rank(message: str) -> None:
        say(f"[rank {processes.rank}/{processes.world}] {message}")
    return say_with_rank


def _median_of_rounds(rounds: list[PlanRun]) -> PlanRun:
    """The last round's run (outputs are the same in every round) with the rounds' median times."""
    run = rounds[-1]
    if len(rounds) == 1:
        return run
    run.seconds = statistics.median(r.seconds for r in rounds)
    if run.report is not None:
        run.report = {**run.report, "transformer_seconds": statistics.median(
            r.report["transformer_seconds"] for r in rounds)}
    return run


def run_batches(pipe: Any, rows: list[Row], batches: list[tuple[dict, list | None]], seed: int,
                memory: PeakMemory, judged: Judging | None, perceptual: PerceptualDistance, say,
                processes: Processes = ONE_PROCESS, repeats: int = 1) -> None:
    """This process's batches (all of them, or under several processes batch i on rank i % world): dense,
    then each row in turn, `repeats` rounds, on the batch's seed (`seed` + its index); each row keeps the
    median time of its rounds. The fewer-steps peers' step count is decided once, when first reached, by
    rank 0 (which runs batch 0 first, as one process does) and broadcast; a process that never reaches
    them (no batch, or the row failed here) still takes part."""
    dense_row = rows[0]
    decided = False
    for index in processes.share(len(batches)):
        call, scenes = batches[index]
        #: row position -> (run, its peak memory) of every round
        rounds: dict[int, list[tuple[PlanRun, int | None]]] = {}
        for _ in range(repeats):
            for position, row in enumerate(rows):
                if row.error is not None:
                    continue
                if row.matches_fastest and not decided:
                    _decide_steps(rows, dense_row, call["num_inference_steps"], processes)
                    decided = True
                try:
                    run = run_row(pipe, row, call, seed + index, memory)
                except Exception as error:
                    if row is dense_row:
                        raise
                    row.fail(error)
                    say(f"[batch {index + 1}/{len(batches)}] {row.label}: failed ({row.error})")
                    continue
                rounds.setdefault(position, []).append((run, memory.bytes))
                dense_seconds = rounds[0][-1][0].seconds
                say(f"[batch {index + 1}/{len(batches)}] {row.label}: {run.seconds:.2f} s"
                    + ("" if row is dense_row else f", {dense_seconds / run.seconds:.2f}x"))
        medians = {position: _median_of_rounds([run for run, _ in runs]) for position, runs in rounds.items()}
        for position, row in enumerate(rows):
            if row.error is None and position in rounds:
                peaks = [peak for _, peak in rounds[position] if peak is not None]
                record(row, medians[position], medians[0], max(peaks) if peaks else None, scenes, judged,
                       perceptual)
    if processes.world > 1 and not decided and any(row.matches_fastest for row in rows):
        _decide_steps(rows, dense_row, batches[0][0]["num_inference_steps"], processes)


def _decide_steps(rows: list[Row], dense: Row, steps: int, processes: Processes) -> None:
    """The step count of the fewer-steps peers still running, from the fastest plan so far (rank 0's)."""
    count, why = processes.broadcast(fewer_steps(steps, _fastest(rows, dense)))
    for row in rows:
        if row.matches_fastest and row.error is None and row.steps is None:
            row.steps, row.label = count, f"dense, {count} steps ({why})"


def _fastest(rows: list[Row], dense: Row) -> float | None:
    """The best speedup of a plan so far (the first batch, when the fewer-steps peer asks)."""
    speedups = [dense.seconds / row.seconds for row in rows if row.kind == "plan" and row.error is None and row.seconds]
    return max(speedups, default=None)


#: what a process measured of a row, summed over its batches (`partials`, `merge_rows`)
PARTIAL_FIELDS = ("error", "samples", "seconds", "transformer_seconds", "flops", "dense_flops", "peak_bytes",
                  "psnr_frames", "ssim_sum", "perceptual_sum", "accuracy_sum", "features")


def partials(rows: list[Row], indices: list[int]) -> dict[str, Any]:
    """This process's sums of every row and the batches they are over (`indices`), to gather."""
    return {"batches": indices,
            "rows": [{**{key: getattr(row, key) for key in PARTIAL_FIELDS},
                      "features": [f.detach().cpu() for f in row.features]} for row in rows]}


def merge_rows(rows: list[Row], parts: list[dict[str, Any]]) -> None:
    """Every process's `partials` (by rank) into `rows`: the totals one process running every batch would
    have. Times, samples, FLOPs and score sums add up (the ledger's are None where a process's are: a row
    without a handle); the peak memory is the largest; the PSNR frames are all of them (their mean does not
    depend on their order); the judge features go back in batch order; a row that failed in any process
    failed (the lowest rank's error). Labels, steps and configs are the same in every process already."""
    for position, row in enumerate(rows):
        ours = [part["rows"][position] for part in parts]
        row.error = next((p["error"] for p in ours if p["error"] is not None), None)
        row.samples = sum(p["samples"] for p in ours)
        row.seconds = sum(p["seconds"] for p in ours)
        for key in ("transformer_seconds", "flops", "dense_flops"):
            values = [p[key] for p in ours]
            setattr(row, key, None if any(v is None for v in values) else sum(values))
        peaks = [p["peak_bytes"] for p in ours if p["peak_bytes"] is not None]
        row.peak_bytes = max(peaks) if peaks else None
        row.psnr_frames = [value for p in ours for value in p["psnr_frames"]]
        row.ssim_sum = sum(p["ssim_sum"] for p in ours)
        row.perceptual_sum = sum(p["perceptual_sum"] for p in ours)
        row.accuracy_sum = sum(p["accuracy_sum"] for p in ours)
        by_batch = sorted(((index, features) for part, p in zip(parts, ours)
                           for index, features in zip(part["batches"], p["features"])), key=lambda pair: pair[0])
        row.features = [features for _, features in by_batch]


# -- metrics ---------------------------------------------------------------------------------------

def caption_accuracy(judge: Any, output: torch.Tensor, scenes: list, video: bool) -> float:
    """The judge's whole-caption accuracy (videos: appearance and motion)."""
    if video:
        return judges.video_caption_accuracy(judge, channels_first(output), scenes)["all"]
    return judges.caption_accuracy(judge, output, scenes)["all"]


def judge_features(judge: Any, output: torch.Tensor) -> torch.Tensor:
    """The judge's features of every image or frame: what the reference FID compares."""
    return judges.features(judge, frames(output))


def reference_fid(features: torch.Tensor, real_features: torch.Tensor) -> float:
    """`judge.reference_fid` on features gathered batch by batch (the samples need not be kept)."""
    return judges.frechet_distance(features, real_features)


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
                 "configs": [{"technique": registration(c).name, **_plain_fields(c)} for c in row.configs],
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


# -- writing ---------------------------------------------------------------------------------------

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


def notes(rows: list[Row], memory: PeakMemory, judged: Judging | None, perceptual: PerceptualDistance,
          peer_notes: list[str], processes: int = 1) -> list[str]:
    """The footer: what each column means where it is not obvious, what is missing and why."""
    said = [f"peak memory: {memory.kind}",
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


# -- the benchmark ---------------------------------------------------------------------------------

def bench(args: argparse.Namespace) -> dict[str, Any] | None:
    """Load, build the rows, calibrate, warm up, run every batch in turn, then write the results. Under
    `accelerate launch` each process runs its share of the batches, and only the main process merges
    and writes (and returns the results; the others return None)."""
    processes = Processes.current(args.device)  # before the threads: accelerate may set them
    if args.threads:
        torch.set_num_threads(args.threads)
    say = _status(args)
    if processes.world > 1:
        args.device = processes.device_for(args.device)
        say = _with_rank(say, processes)
    suite = _suite_of(args)
    if suite is not None:  # the suite's standard setting, under what the options say
        args.batch = args.batch or SUITE_SETTING["batch"]
        args.steps = args.steps or SUITE_SETTING["steps"]
        args.guidance = SUITE_SETTING["guidance"] if args.guidance is None else args.guidance
        args.model = args.model or f"reference:{suite}"
    given = read_prompts(args.prompt_file) if args.prompt_file is not None else None  # said before loading
    pipe, defaults, model, dtype = _load(args, say)
    pipe.set_progress_bar_config(disable=True)  # one line a run instead
    call = call_kwargs(pipe, defaults, argparse.Namespace(**{**vars(args), "prompt": None}))
    video = "num_frames" in _parameters(pipe)
    prompts = prompt_set(args, suite, given, pipe, video)
    batch = args.batch or DEFAULT_BATCH
    batches = batch_calls(pipe, call, prompts, batch)
    steps = call["num_inference_steps"]
    rows, peer_notes = build_rows(args, pipe, steps, video)
    memory = PeakMemory(args.device)
    judged = judging(prompts, video)

    first = batches[0][0]
    ours = processes.share(len(batches))  # a process with no batch only takes part in what is shared
    calibrate_rows(pipe, rows, first, args.seed, say, processes, run=bool(ours))
    if ours:
        warm_up(pipe, rows, first, args.seed, memory, say)
    perceptual = PerceptualDistance()
    run_batches(pipe, rows, batches, args.seed, memory, judged, perceptual, say, processes, args.repeats)
    if processes.world > 1:
        parts = processes.gather(partials(rows, ours))
        if not processes.main:
            return None
        merge_rows(rows, parts)

    summary = summarize(rows, steps, judged)
    results = {
        "machine": machine(args.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "diffusers": _version("diffusers"), "device": str(args.device), "dtype": str(dtype).removeprefix("torch."),
        "model": model, "pipeline": type(pipe).__name__, "seed": args.seed, "judged": judged is not None,
        "call": {**{k: v for k, v in call.items() if isinstance(v, (str, int, float, bool)) and k != "output_type"},
                 "batch": batch, "batches": len(batches), "warmup_steps": WARMUP_STEPS},
        "prompts": {"source": prompts.source, "count": len(prompts.texts), "texts": prompts.texts},
        "memory": memory.kind, "real_images": judged.real if judged else None, "processes": processes.world,
        "repeats": args.repeats,
        "perceptual": perceptual.name,
        "rows": summary, "notes": notes(rows, memory, judged, perceptual, peer_notes, processes.world),
    }
    written = write_results(results, args.out)
    print(markdown(results), end="")
    say(f"wrote {', '.join(written)} to {args.out}/")
    return results


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
