"""`tune`: the fastest plan that holds a quality target on the user's model, prompts and step count.

Thresholds, ratios and top-p that suit one model, resolution and step count do not suit another, so
the search measures them on the user's own prompts against their own dense outputs, cheaper than a grid:

1. dense runs once per batch of tuning prompts (its outputs are the reference of every candidate);
2. every technique's documented presets and every diffusers cache at a few settings (the singles)
   run on the first batch only: its quality, the ledger's FLOPs and its time;
3. a candidate whose first-batch quality is within a margin of the target runs on the other batches;
   one that meets the target on all of them is confirmed;
4. stacks of singles from different stages are predicted before they run: their FLOPs as the product
   of their members' (the ledger's, free), their speedup from that and the members' measured
   wall/FLOPs efficiency, their PSNR by adding the members' errors (MSE). Only stacks predicted to
   meet the target and to beat the best confirmed plan run, the most promising first;
5. the fastest confirmed candidates are timed again side by side with dense, in turn, and the winner
   is the one with the best median speedup; a target no plan meets returns dense, said so;
6. held-out prompts, when given, are generated dense and with the winner: how much quality moved.

MagCache's ratios and DyDiT's head scores are calibrated inside the search, on the first batch, when
a candidate needs them. The budget (seconds and/or generations) covers everything; the search stops
early enough to leave the final timing and the held-out check their share, and returns the best plan
so far. `plan_files.save_plan` writes the result for `dit-accel generate/bench --plan FILE`, the UI,
`load_plan` and `Accelerated*Pipeline(acceleration=FILE)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .api import PlanRun, apply, calibrate, timed_run
from .config import ConfigError
from .loading import call_arguments
from .methods.dydit import DyDiTConfig
from .methods.flexdit import FlexDiTConfig
from .methods.proxy import ProxyAttentionConfig
from .methods.ras import RASConfig
from .methods.svg2 import SVG2Config
from .metrics.quality import mean_db, psnr_frames, ssim_frames
from .machine import machine
from .plan_files import save_plan
from .runtime.registry import stages_of

#: prompts a call (the reference models' standard setting)
DEFAULT_BATCH = 8
#: steps of each candidate's untimed warm-up
WARMUP_STEPS = 2
#: stacks tried at most, best predicted first (pairs, then triples on confirmed pairs)
MAX_STACKS = 16
#: candidates timed again side by side at the end, and rounds of it
FINAL_CANDIDATES = 3
FINAL_ROUNDS = 2


@dataclasses.dataclass(frozen=True)
class Target:
    """The quality a plan must keep against dense: mean per-frame PSNR (dB) or SSIM, at least `value`."""

    metric: str = "psnr"
    value: float = 30.0

    METRICS = ("psnr", "ssim")

    def __post_init__(self) -> None:
        if self.metric not in self.METRICS:
            raise ConfigError(f"target metric {self.metric!r}: valid metrics: {', '.join(self.METRICS)}")
        if self.metric == "ssim" and not 0 < self.value <= 1:
            raise ConfigError(f"target ssim={self.value}: SSIM targets lie in (0, 1]")

    @classmethod
    def parse(cls, text: str | Target) -> Target:
        """`"psnr=30"`, `"ssim=0.9"` (or a Target)."""
        if isinstance(text, Target):
            return text
        metric, equals, value = str(text).partition("=")
        try:
            number = float(value if equals else metric)
        except ValueError:
            raise ConfigError(f"target {text!r}: expected metric=value, e.g. psnr=30 or ssim=0.9") from None
        return cls(metric.strip().lower(), number) if equals else cls(value=number)

    @property
    def margin(self) -> float:
        """How far below the target a first batch may be and still be worth the other batches."""
        return 1.0 if self.metric == "psnr" else 0.02

    def __str__(self) -> str:
        return f"{self.metric}>={self.value:g}"


@dataclasses.dataclass(frozen=True)
class Budget:
    """When the search stops: after `seconds` of wall clock and/or `generations` pipeline calls."""

    seconds: float | None = 45 * 60
    generations: int | None = None

    @classmethod
    def parse(cls, text: str | Budget | float | None) -> Budget:
        """`"45m"`, `"90s"`, `"1.5h"`, `"120gen"` (pipeline calls), a number of seconds, or a Budget."""
        if text is None or isinstance(text, Budget):
            return text or cls()
        if isinstance(text, (int, float)):
            return cls(seconds=float(text))
        match = re.fullmatch(r"\s*([0-9.]+)\s*(s|m|h|gen)?\s*", str(text))
        if match is None:
            raise ConfigError(f"budget {text!r}: expected e.g. 45m, 90s, 1h or 120gen")
        amount, unit = float(match.group(1)), match.group(2) or "s"
        if amount <= 0:
            raise ConfigError(f"budget {text!r} must be > 0")
        if unit == "gen":
            return cls(seconds=None, generations=int(amount))
        return cls(seconds=amount * {"s": 1, "m": 60, "h": 3600}[unit])


@dataclasses.dataclass
class Candidate:
    """One plan the search considered, and what it measured (sums over the batches it ran)."""

    label: str
    configs: list
    #: the singles a stack is made of (itself for a single)
    members: tuple = ()
    #: makes the configs when first run (calibrations), else None
    prepare: Callable[[], list] | None = None
    status: str = "not tried"
    error: str | None = None
    batches: int = 0
    seconds: float = 0.0
    dense_seconds: float = 0.0
    flops_ratio: float | None = None
    psnr_frames: list = dataclasses.field(default_factory=list)
    ssim_sum: float = 0.0
    #: (predicted speedup, predicted quality) of a stack before it ran
    predicted: tuple[float, float] | None = None
    final_speedup: float | None = None

    @property
    def stages(self) -> frozenset:
        return frozenset().union(*(stages_of(c) for c in self.configs))

    @property
    def speedup(self) -> float | None:
        return self.dense_seconds / self.seconds if self.seconds else None

    def quality(self, metric: str) -> float | None:
        if not self.psnr_frames:
            return None
        return mean_db(self.psnr_frames) if metric == "psnr" else self.ssim_sum / len(self.psnr_frames)

    @property
    def efficiency(self) -> float:
        """Wall-clock speedup over the FLOPs speedup (1: time falls exactly as the counted work does)."""
        return (self.speedup or 1.0) * (self.flops_ratio or 1.0)

    def summary(self, metric: str) -> dict[str, Any]:
        return {"label": self.label, "status": self.status, "error": self.error, "batches": self.batches,
                "speedup": self.speedup, "final_speedup": self.final_speedup, "flops_ratio": self.flops_ratio,
                metric: self.quality(metric), "predicted": self.predicted}


@dataclasses.dataclass
class TuneResult:
    """The plan `tune` chose (`configs`; [] is dense), how it measured, and every candidate tried."""

    configs: list
    label: str
    target: Target
    speedup: float
    quality: float | None
    held_out_quality: float | None
    candidates: list[Candidate]
    generations: int
    seconds: float
    message: str
    path: str | None = None

    @property
    def quality_moved(self) -> float | None:
        """Held-out quality minus tuning quality (negative: it held less on prompts it was not tuned on)."""
        if self.quality is None or self.held_out_quality is None:
            return None
        return self.held_out_quality - self.quality

    def summary(self) -> dict[str, Any]:
        metric = self.target.metric
        tried = [c for c in self.candidates if c.batches]
        return {"plan": self.label, "target": str(self.target), "speedup": self.speedup, metric: self.quality,
                f"held_out_{metric}": self.held_out_quality, "quality_moved": self.quality_moved,
                "search_seconds": self.seconds, "generations": self.generations, "candidates_tried": len(tried),
                "message": self.message, "candidates": [c.summary(metric) for c in tried]}


# -- what the search starts from -------------------------------------------------------------------

def singles(pipe: Any, steps: int, calibration_path: str, first_call: Callable[[], dict],
            calibrating: Callable[[str], None]) -> list[Candidate]:
    """Every technique's documented presets and diffusers' caches at a few settings each; DyDiT's width
    presets also calibrated, and MagCache calibrated, on the first batch (`calibrating` is told of each
    calibration run)."""
    import diffusers.hooks as hooks

    found = [Candidate(f"ras:sample_ratio={ratio:g}", [RASConfig.for_steps(steps, sample_ratio=ratio)])
             for ratio in (0.75, 0.5, 0.25)]
    for cls in (FlexDiTConfig, DyDiTConfig, SVG2Config, ProxyAttentionConfig):
        found += [Candidate(f"{cls.name}:preset={name}", [cls.preset(name)]) for name in cls.presets]

    def calibrated_dydit(name: str) -> Callable[[], list]:
        def prepare() -> list:
            calibrating(f"DyDiT's heads and channel groups (for {name})")
            return [calibrate(pipe, DyDiTConfig.preset(name), path=calibration_path, **first_call())]
        return prepare

    found += [Candidate(f"dydit:preset={name},calibrated", [], prepare=calibrated_dydit(name))
              for name, fields in DyDiTConfig.presets.items() if fields["width_ratio"] < 1]
    warmup = RASConfig.for_steps(steps).warmup_steps
    found += [Candidate(f"fbcache:threshold={t:g}", [hooks.FirstBlockCacheConfig(threshold=t)])
              for t in (0.05, 0.08, 0.12, 0.2, 0.3)]
    found += [Candidate(f"taylorseer:cache_interval={n}", [hooks.TaylorSeerCacheConfig(
        cache_interval=n, disable_cache_before_step=warmup, max_order=1, taylor_factors_dtype=torch.float32)])
        for n in (2, 3)]
    ratios: list = []

    def magcache(threshold: float) -> Callable[[], list]:
        def prepare() -> list:
            if not ratios:  # one calibration run serves every threshold
                calibrating("MagCache's per-step ratios")
                probe = hooks.MagCacheConfig(threshold=threshold, max_skip_steps=2, calibrate=True)
                ratios.append(calibrate(pipe, probe, **first_call()).mag_ratios)
            return [hooks.MagCacheConfig(threshold=threshold, max_skip_steps=2, mag_ratios=ratios[0],
                                         num_inference_steps=steps)]
        return prepare

    found += [Candidate(f"magcache:threshold={t:g}", [], prepare=magcache(t)) for t in (0.03, 0.06, 0.1, 0.15)]
    found.append(Candidate("pab:spatial_attention_block_skip_range=2",
                           [hooks.PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2)]))
    for candidate in found:
        candidate.members = (candidate,)
    return found


def predicted_quality(members: tuple[Candidate, ...], metric: str) -> float:
    """A stack's quality from its members': PSNR by adding their mean squared errors, SSIM by adding
    their losses (errors of independent stages roughly add)."""
    values = [m.quality(metric) for m in members]
    if metric == "psnr":
        return -10 * math.log10(sum(10 ** (-min(v, 100.0) / 10) for v in values))
    return 1 - sum(1 - v for v in values)


def predicted_speedup(members: tuple[Candidate, ...]) -> float:
    """The product of the members' FLOPs speedups (the ledger's) times the worst member's efficiency."""
    flops = math.prod(m.flops_ratio or 1.0 for m in members)
    return min(m.efficiency for m in members) / flops


# -- the search ------------------------------------------------------------------------------------

class _Search:
    """The state of one `tune` call: the batches, dense's outputs, the clock and the budget."""

    def __init__(self, pipe: Any, batches: list[dict], seed: int, target: Target, budget: Budget,
                 say: Callable[[str], None]):
        self.pipe, self.batches, self.seed, self.target, self.budget, self.say = pipe, batches, seed, target, budget, say
        self.started = time.perf_counter()
        self.generations = 0
        self.dense: list[PlanRun] = []
        #: seconds and generations kept back for the final timing and the held-out check
        self.reserve_seconds = 0.0
        self.reserve_generations = 0

    def calibrating(self, what: str) -> None:
        """A calibration run (on the first batch) is about to happen: say so and count it."""
        self.say(f"calibrating {what} on the first batch")
        self.generations += 1

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def can_run(self, runs: int, reserved: bool = True) -> bool:
        """Whether `runs` more generations (each about a dense batch's time) fit in the budget."""
        keep_s, keep_g = (self.reserve_seconds, self.reserve_generations) if reserved else (0.0, 0)
        if self.budget.generations is not None and self.generations + runs > self.budget.generations - keep_g:
            return False
        if self.budget.seconds is not None:
            cost = runs * statistics.mean(d.seconds for d in self.dense) if self.dense else 0.0
            return self.elapsed() + cost <= self.budget.seconds - keep_s
        return True

    def run(self, configs: list, index: int, steps: int | None = None) -> PlanRun:
        call = self.batches[index] if steps is None else {**self.batches[index], "num_inference_steps": steps}
        run = PlanRun("plan", list(configs))
        timed_run(self.pipe, run, call, self.seed + index)
        self.generations += 1
        return run

    def measure(self, candidate: Candidate, indices: list[int]) -> None:
        """Run `candidate` on the batches `indices` (after an untimed warm-up on its first run) and add
        its time, FLOPs and quality against dense's outputs."""
        if candidate.prepare is not None:
            candidate.configs, candidate.prepare = candidate.prepare(), None
        if not candidate.batches and not any(getattr(c, "num_inference_steps", None) for c in candidate.configs):
            self.run(candidate.configs, 0, min(WARMUP_STEPS, self.batches[0]["num_inference_steps"]))
        for index in indices:
            run = self.run(candidate.configs, index)
            dense = self.dense[index]
            candidate.batches += 1
            candidate.seconds += run.seconds
            candidate.dense_seconds += dense.seconds
            ratio = run.report["flops_ratio"] if run.report else None
            if ratio is not None:  # mean over batches, weighted alike (the batches are the same size)
                done = candidate.batches - 1
                candidate.flops_ratio = ratio if candidate.flops_ratio is None else \
                    (candidate.flops_ratio * done + ratio) / candidate.batches
            values = psnr_frames(run.output, dense.output)
            candidate.psnr_frames += values
            candidate.ssim_sum += ssim_frames(run.output, dense.output) * len(values)

    def try_candidate(self, candidate: Candidate, best: float) -> bool:
        """Screen on the first batch, then the other batches if it can still meet the target and win;
        True when it is confirmed (meets the target on every tuning batch)."""
        metric = self.target.metric
        try:
            if not candidate.batches:
                if not self.can_run(2):
                    candidate.status = "budget spent"
                    return False
                self.measure(candidate, [0])
            first = candidate.quality(metric)
            if first < self.target.value - self.target.margin:
                candidate.status = "misses the target on the first batch"
                return False
            if (candidate.speedup or 0) <= best:
                candidate.status = "meets it, slower than the best so far" if first >= self.target.value else \
                    "cannot win: slower than the best so far"
                return False
            rest = list(range(candidate.batches, len(self.batches)))
            if rest:
                if not self.can_run(len(rest)):
                    candidate.status = "budget spent"
                    return False
                self.measure(candidate, rest)
        except ConfigError as error:
            candidate.status, candidate.error = "refused", str(error)
            return False
        except Exception as error:  # a candidate the model cannot run is reported, not fatal
            candidate.status, candidate.error = "failed", f"{type(error).__name__}: {error}"[:300]
            return False
        met = candidate.quality(metric) >= self.target.value
        candidate.status = "meets the target" if met else "misses the target"
        self.say(f"[{self.elapsed():.0f} s, {self.generations} runs] {candidate.label}: {metric} "
                 f"{candidate.quality(metric):.3f}, {candidate.speedup:.2f}x, FLOPs {candidate.flops_ratio or 1:.3f}: "
                 f"{candidate.status}")
        return met


def _composable(pipe: Any, configs: list) -> bool:
    try:
        apply(pipe, *configs).remove()
    except ConfigError:
        return False
    return True


def stacks(pipe: Any, pool: list[Candidate], best: float, target: Target, size: int,
           bases: list[Candidate] | None = None) -> list[Candidate]:
    """Stacks of `size` members from different stages, each member meeting the target alone (or, for
    triples, a confirmed pair plus one), predicted to meet it and to beat `best`; most promising first."""
    metric = target.metric
    usable = [c for c in pool if c.batches and c.quality(metric) is not None and c.quality(metric) >= target.value]
    groups = ([base.members + (extra,) for base in bases for extra in usable if extra not in base.members]
              if bases is not None else itertools.combinations(usable, size))
    found, seen = [], set()
    for members in groups:
        key = frozenset(m.label for m in members)
        stages = [m.stages for m in members]
        if key in seen or any(a & b for a, b in itertools.combinations(stages, 2)):
            continue
        seen.add(key)
        speed, quality = predicted_speedup(members), predicted_quality(members, metric)
        if quality < target.value - target.margin or speed <= best:
            continue
        configs = [c for m in members for c in m.configs]
        if not _composable(pipe, configs):
            continue
        found.append(Candidate("+".join(m.label for m in members), configs, members, predicted=(speed, quality)))
    return sorted(found, key=lambda c: -c.predicted[0])


def tune(pipe: Any, prompts: list[str], *, target: str | Target = "psnr=30", steps: int | None = None,
         budget: str | Budget | float | None = None, batch: int = DEFAULT_BATCH, seed: int = 0,
         held_out: list[str] | None = None, path: str | os.PathLike | None = None,
         progress: Callable[[str], None] | None = None, **call: Any) -> TuneResult:
    """The fastest plan whose quality vs dense on `prompts` meets `target`, within `budget`.

    `call` is the rest of the pipeline call (size, guidance, ...). With `path` the plan is written there
    as a plan file (DyDiT calibrations beside it); `held_out` prompts re-measure the winner on prompts
    it was not tuned on. See the module's docstring for the search.
    """
    target, budget = Target.parse(target), Budget.parse(budget)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("tune needs a non-empty list of prompts")
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    if "generator" in call:
        raise ConfigError("tune seeds every run itself from seed=...; pass no generator")
    say = progress or (lambda message: None)
    if steps is None:
        steps = call.pop("num_inference_steps", None) or \
            inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    call = {**call, "num_inference_steps": steps, "output_type": "pt"}

    def calls(texts: list[str]) -> list[dict]:
        return [{**call_arguments(pipe, call, {"prompt": texts[i:i + batch]}), "output_type": "pt"}
                for i in range(0, len(texts), batch)]

    batches = calls(list(prompts))
    search = _Search(pipe, batches, seed, target, budget, say)
    workdir = Path(path).parent if path is not None else Path(tempfile.mkdtemp(prefix="dit-accel-tune-"))
    stem = Path(path).stem if path is not None else "tuned"

    say(f"dense on {len(batches)} batch(es) of up to {batch}, {steps} steps")
    search.run([], 0, min(WARMUP_STEPS, steps))
    search.dense = [search.run([], i) for i in range(len(batches))]
    dense_batch = statistics.mean(d.seconds for d in search.dense)
    say(f"dense: {dense_batch:.2f} s a batch")
    held = calls(list(held_out)) if held_out else []
    search.reserve_generations = FINAL_CANDIDATES * FINAL_ROUNDS + FINAL_ROUNDS + 2 * len(held)
    search.reserve_seconds = search.reserve_generations * dense_batch

    pool = singles(pipe, steps, str(workdir / f"{stem}.dydit.safetensors"),
                   lambda: {**batches[0], "generator": torch.Generator().manual_seed(seed)}, search.calibrating)
    confirmed: list[Candidate] = []

    def best() -> float:
        return max((c.speedup for c in confirmed), default=1.0)

    # the singles: all on the first batch first (they are the stacks' members), then the rest of the batches
    for candidate in pool:
        try:
            if search.can_run(2):
                search.measure(candidate, [0])
        except ConfigError as error:
            candidate.status, candidate.error = "refused", str(error)
        except Exception as error:
            candidate.status, candidate.error = "failed", f"{type(error).__name__}: {error}"[:300]
    for candidate in sorted((c for c in pool if c.batches), key=lambda c: -(c.speedup or 0)):
        if search.try_candidate(candidate, best()):
            confirmed.append(candidate)
    for size in (2, 3):
        bases = [c for c in confirmed if len(c.members) == 2] if size == 3 else None
        tried = stacks(pipe, pool, best(), target, size, bases)[:MAX_STACKS // 2 if size == 3 else MAX_STACKS]
        pool += tried
        for candidate in tried:
            if candidate.predicted[0] > best() and search.try_candidate(candidate, best()):
                confirmed.append(candidate)
            elif candidate.status == "not tried":
                candidate.status = "cannot win: predicted slower than the best so far"

    # the final, side by side: the fastest confirmed ones in turn with dense
    finalists = sorted(confirmed, key=lambda c: -c.speedup)[:FINAL_CANDIDATES]
    if len(finalists) > 1 and search.can_run(len(finalists) + 1, reserved=False):
        ratios: dict[str, list[float]] = {c.label: [] for c in finalists}
        for _ in range(FINAL_ROUNDS):
            if not search.can_run(len(finalists) + 1, reserved=False):
                break
            dense = search.run([], 0)
            for candidate in finalists:
                ratios[candidate.label].append(dense.seconds / search.run(candidate.configs, 0).seconds)
        for candidate in finalists:
            if ratios[candidate.label]:
                candidate.final_speedup = statistics.median(ratios[candidate.label])
    winner = max(finalists, key=lambda c: c.final_speedup or c.speedup, default=None)

    metric = target.metric
    if winner is None:
        tried = [c for c in pool if c.batches]
        met = [c for c in tried if c.quality(target.metric) >= target.value]
        why = (f"{len(met)} met it on the first batch but none ran faster than dense" if met else
               f"none of the {len(tried)} tried met it")
        message = f"no plan met {target} on these prompts faster than dense within the budget ({why}): dense is returned"
        configs, label, speedup, quality = [], "dense", 1.0, None
    else:
        configs, label = winner.configs, winner.label
        speedup, quality = winner.final_speedup or winner.speedup, winner.quality(metric)
        message = f"{label}: {speedup:.2f}x at {metric} {quality:.3f} on the tuning prompts (target {target})"
    held_quality = None
    if winner is not None and held:
        say(f"held-out check: {len(held)} batch(es), dense and {label}")
        check = Candidate(label, configs)
        held_search = _Search(pipe, held, seed + len(batches), target, Budget(None), say)
        held_search.dense = [held_search.run([], i) for i in range(len(held))]
        held_search.measure(check, list(range(len(held))))
        search.generations += held_search.generations
        held_quality = check.quality(metric)
        message += f"; held-out {metric} {held_quality:.3f}"
    result = TuneResult(configs, label, target, speedup, quality, held_quality, pool, search.generations,
                        search.elapsed(), message)
    if path is not None:
        save_plan(path, configs, pipe, num_inference_steps=steps, target=str(target),
                  measured={k: v for k, v in result.summary().items() if k != "candidates"},
                  machine=machine(getattr(pipe, "device", "cpu")), threads=torch.get_num_threads(),
                  prompts=len(prompts), held_out_prompts=len(held_out or []))
        result.path = str(path)
    say(message)
    return result
