"""`tune`: the fastest plan that holds a quality target on the user's model, prompts and step count, or
(`speedup=`) the plan with the best quality at a speed.

Thresholds, ratios and top-p that suit one model, resolution and step count do not suit another, so
the search measures them on the user's own prompts against their own dense outputs, cheaper than a grid:

1. dense runs once per batch of tuning prompts (its outputs are the reference of every candidate);
2. every technique's documented presets and every diffusers cache at a few settings (the singles:
   what each registration's `search_space` offers, `candidates.singles`) run on the first batch
   only: its quality on every metric the target names, the ledger's FLOPs and its time;
3. each knob's boldest setting that still holds the target goes bolder (`Candidate.bolder`) until it
   fails, or changes nothing twice in a row (the speed mode: until it is past the speed asked for);
4. candidates are judged by their expected speed: the ledger's FLOPs, exact and free, times the
   technique's median wall/FLOPs efficiency so far (`Predictor`); one within a margin of every bound on
   the first batch, and within `FINAL_SLACK` of the best expected speed, runs on the other batches,
   and one that meets the target on all of them is confirmed (the speed mode: one expected at the
   speed, within a margin of the best quality confirmed there);
5. stacks of singles from different stages are predicted before they run (FLOPs as the product of
   their members', each metric by adding their errors, both corrected by the stacks of the same pairing
   run so far); only stacks predicted to hold the target and beat the best run, the most promising first;
6. the best confirmed distinct candidates (fastest; the speed mode: best quality) are timed again side
   by side with dense, in turn, over every tuning batch, the best fewer-steps setting always among
   them; the winner has the best median speedup (the speed mode: the best quality among those whose
   side-by-side speedup reaches the speed); a target no plan meets, or a speed none reaches, returns
   dense, said so;
7. held-out prompts, when given, are generated dense and with the winner: how much quality moved.

MagCache's ratios and DyDiT's head scores are calibrated inside the search, on the first batch, when
a candidate needs them (`SearchContext.calibrate`). The budget (seconds and/or generations) covers everything; the search stops
early enough to leave the final timing and the held-out check their share, and returns the best plan
so far. `plan_files.save_plan` writes the result for `dit-accel generate/bench --plan FILE`, the UI,
`load_plan` and `Accelerated*Pipeline(acceleration=FILE)`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..calibration import calibrate
from ..comparison import PlanRun, timed_run
from ..config import ConfigError
from ..loading import call_arguments
from ..machine import machine
from ..metrics.judge import agreement, readings
from ..metrics.quality import PerceptualDistance, channels_first, frames, psnr_frames, ssim_frames
from ..plan_files import plan_summary, save_plan
from ..runtime.registry import registration
from ..runtime.search_space import SearchContext, Setting
from .candidates import Candidate, CandidateStatus, singles
from .predict import Predictor, stack_options
from .target import Budget, Target, judge_suite, model_source

#: prompts a call (the reference models' standard setting)
DEFAULT_BATCH = 8
#: steps of each candidate's untimed warm-up
WARMUP_STEPS = 2
#: stacks tried at most, best predicted first (pairs, then as many triples on confirmed pairs)
MAX_STACKS = 24
#: candidates timed again side by side at the end (over every tuning batch), and rounds of it
FINAL_CANDIDATES = 4
FINAL_ROUNDS = 2
#: a candidate whose expected speed is this close below the best confirmed one's may still win the final
FINAL_SLACK = 0.1


@dataclasses.dataclass
class TuneResult:
    """The plan `tune` chose (`configs`; [] is dense), how it measured, and every candidate tried."""

    configs: list
    label: str
    target: Target
    speedup: float
    #: the primary metric on the tuning prompts, and on the held-out ones
    quality: float | None
    held_out_quality: float | None
    candidates: list[Candidate]
    generations: int
    seconds: float
    message: str
    path: str | None = None
    #: the speed asked for (best quality at it), None: the fastest plan that holds the target
    wanted_speedup: float | None = None
    #: every metric of the target on the tuning prompts, and on the held-out ones
    qualities: dict[str, float | None] = dataclasses.field(default_factory=dict)
    held_out_qualities: dict[str, float | None] = dataclasses.field(default_factory=dict)
    #: which perceptual distance measured a `perceptual` bound (LPIPS or the judge-feature stand-in)
    perceptual: str | None = None

    @property
    def quality_moved(self) -> float | None:
        """Held-out quality minus tuning quality (negative: it held less on prompts it was not tuned on)."""
        if self.quality is None or self.held_out_quality is None:
            return None
        return self.held_out_quality - self.quality

    @property
    def goal(self) -> str:
        """What was asked for, as the plan file records it."""
        if self.wanted_speedup is None:
            return str(self.target)
        floors = self.target.floors()
        return f"best {self.target.metric} at speedup>={self.wanted_speedup:g}" + (f", keeping {floors}" if floors else "")

    def summary(self) -> dict[str, Any]:
        metrics = self.target.metrics
        tried = [c for c in self.candidates if c.batches]
        return {"plan": self.label, "target": self.goal, "speedup": self.speedup,
                **{m: self.qualities.get(m) for m in metrics},
                **{f"held_out_{m}": self.held_out_qualities.get(m) for m in metrics},
                "quality_moved": self.quality_moved, "perceptual": self.perceptual,
                "search_seconds": self.seconds, "generations": self.generations, "candidates_tried": len(tried),
                "message": self.message, "candidates": [c.summary(metrics) for c in tried]}


class _Scorers:
    """What measures a run against dense beyond PSNR and SSIM, loaded once and only for the metrics the
    target names: the perceptual distance and the judge."""

    def __init__(self, target: Target, model: str | None):
        self.perceptual = PerceptualDistance() if "perceptual" in target.metrics else None
        suite = judge_suite(model) if "judge" in target.metrics else None  # check_judge refused any other
        self.judge = suite.load_judge() if suite is not None else None

    def readings(self, output: torch.Tensor) -> list | None:
        """The judge's readings of a pipeline's output, where the target names the judge."""
        return None if self.judge is None else readings(self.judge, channels_first(output))


def _qualities(candidate: Candidate, metrics: tuple[str, ...]) -> str:
    return ", ".join(f"{m} {candidate.quality(m):.3f}" for m in metrics if candidate.quality(m) is not None)


def _measured_speedup(candidate: Candidate) -> float:
    """Its side-by-side speedup from the final, else its speedup over the batches it ran."""
    return candidate.final_speedup or candidate.speedup or 0.0


class _Search:
    """The state of one `tune` call: the batches, dense's outputs, the clock, the budget, and what it
    maximises (the expected speed, or in the speed mode the primary quality at `wanted_speedup`)."""

    def __init__(self, pipe: Any, batches: list[dict], seed: int, target: Target, budget: Budget,
                 say: Callable[[str], None], wanted_speedup: float | None = None, scorers: _Scorers | None = None,
                 on_measured: Callable[[Candidate], None] | None = None):
        self.pipe, self.batches, self.seed, self.target, self.budget, self.say = pipe, batches, seed, target, budget, say
        self.wanted_speedup = wanted_speedup
        self.scorers = scorers or _Scorers(target, model_source(pipe)[0])
        self.on_measured = on_measured or (lambda candidate: None)
        self.started = time.perf_counter()
        self.generations = 0
        self.dense: list[PlanRun] = []
        self.dense_readings: list[list | None] = []
        self.predictor = Predictor(target.metrics)
        #: seconds and generations kept back for the final timing and the held-out check
        self.reserve_seconds = 0.0
        self.reserve_generations = 0
        #: what `worth` is before anything is confirmed: dense's speed, or any quality
        self.start = 1.0 if wanted_speedup is None else -math.inf

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

    def run_dense(self) -> None:
        """Dense on every batch: the reference of every candidate (and the judge's readings of it)."""
        self.dense = [self.run([], i) for i in range(len(self.batches))]
        self.dense_readings = [self.scorers.readings(d.output) for d in self.dense]

    def measure(self, candidate: Candidate, indices: list[int]) -> None:
        """Run `candidate` on the batches `indices` (after an untimed warm-up on its first run) and add
        its time, FLOPs and quality on every metric of the target against dense's outputs."""
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
            if self.scorers.perceptual is not None:
                distance = self.scorers.perceptual(frames(run.output), frames(dense.output)) * len(values)
                candidate.perceptual_sum = (candidate.perceptual_sum or 0.0) + distance
            if self.scorers.judge is not None:
                agreeing, compared = agreement(self.scorers.readings(run.output), self.dense_readings[index])
                candidate.judge_agreeing += agreeing
                candidate.judge_readings += compared
        self.predictor.observe(candidate)

    def _measured(self, candidate: Candidate, indices: list[int]) -> bool:
        """`measure`, keeping a plan the runtime refuses or the model cannot run with its error."""
        try:
            self.measure(candidate, indices)
            return True
        except ConfigError as error:
            candidate.status, candidate.error = CandidateStatus.REFUSED, str(error)
        except Exception as error:  # a candidate the model cannot run is reported, not fatal
            candidate.status, candidate.error = CandidateStatus.FAILED, f"{type(error).__name__}: {error}"[:300]
        return False

    def screen(self, candidate: Candidate) -> bool:
        """Run `candidate` on the first batch, budget allowing; False when it did not run."""
        if not self.can_run(2):
            candidate.status = CandidateStatus.BUDGET_SPENT
            return False
        return self._measured(candidate, [0])

    def worth(self, candidate: Candidate) -> float:
        """What the search maximises, measured or predicted: the expected speed, or in the speed mode the
        primary quality (higher is better)."""
        if self.wanted_speedup is None:
            return self.predictor.speed(candidate)
        value = self.predictor.quality(candidate)
        return -math.inf if value is None else self.target.primary.score(value)

    def at_speed(self, candidate: Candidate) -> bool:
        """The speed mode: expected within `FINAL_SLACK` of the speed asked for (the final decides)."""
        return self.predictor.speed(candidate) >= self.wanted_speedup * (1 - FINAL_SLACK)

    def can_beat(self, candidate: Candidate, best: float) -> bool:
        """Whether a stack not run yet is expected to beat `best` (and, in the speed mode, at the speed)."""
        if self.wanted_speedup is None:
            return self.predictor.speed(candidate) > best
        return self.at_speed(candidate) and self.worth(candidate) > best

    def try_candidate(self, candidate: Candidate, best: float) -> bool:
        """Screen on the first batch, then the other batches if it can still meet the target and win
        (expected speed within `FINAL_SLACK` of `best`, the best confirmed one's; the speed mode: expected
        at the speed, primary quality within its margin of `best`); True when it is confirmed (meets the
        target on every tuning batch)."""
        if not candidate.batches and not self.screen(candidate):
            return False
        if candidate.flops_ratio is not None and candidate.flops_ratio >= 1.0:
            # it ran dense here (a sparse attention on too few tokens): dense itself, not a plan
            candidate.status = CandidateStatus.SAVES_NOTHING
            return False
        if not self.target.near(candidate.quality):
            candidate.status = CandidateStatus.MISSES_ON_FIRST_BATCH
            return False
        if self.wanted_speedup is None and self.predictor.speed(candidate) <= best * (1 - FINAL_SLACK):
            candidate.status = CandidateStatus.MEETS_BUT_SLOWER if self.target.met(candidate.quality) else \
                CandidateStatus.CANNOT_WIN
            return False
        if self.wanted_speedup is not None and not self.at_speed(candidate):
            candidate.status = CandidateStatus.BELOW_SPEED
            return False
        if self.wanted_speedup is not None and self.worth(candidate) < best - self.target.primary.kind.margin:
            candidate.status = CandidateStatus.LOWER_QUALITY
            return False
        rest = list(range(candidate.batches, len(self.batches)))
        if rest and not self.can_run(len(rest)):
            candidate.status = CandidateStatus.BUDGET_SPENT
            return False
        if rest and not self._measured(candidate, rest):
            return False
        met = self.target.met(candidate.quality)
        candidate.status = CandidateStatus.MEETS_TARGET if met else CandidateStatus.MISSES_TARGET
        self.say(f"[{self.elapsed():.0f} s, {self.generations} runs] {candidate.label}: "
                 f"{_qualities(candidate, self.target.metrics)}, {candidate.speedup:.2f}x measured, "
                 f"{self.predictor.speed(candidate):.2f}x expected, FLOPs {candidate.flops_ratio or 1:.3f}: "
                 f"{candidate.status_text}")
        self.on_measured(candidate)
        return met

    def time_side_by_side(self, finalists: list[Candidate]) -> None:
        """`FINAL_ROUNDS` rounds of dense then every finalist, in turn, on every tuning batch, as far as
        the whole budget goes; each finalist's `final_speedup` is the median of its ratios to dense. One
        finalist alone is timed only in the speed mode (its speed decides whether it wins)."""
        rounds = len(self.batches) * (len(finalists) + 1)
        if len(finalists) < (1 if self.wanted_speedup is not None else 2):
            return
        ratios: dict[str, list[float]] = {c.label: [] for c in finalists}
        for _ in range(FINAL_ROUNDS):
            if not self.can_run(rounds, reserved=False):
                break
            for index in range(len(self.batches)):
                dense = self.run([], index)
                for candidate in finalists:
                    ratios[candidate.label].append(dense.seconds / self.run(candidate.configs, index).seconds)
        for candidate in finalists:
            if ratios[candidate.label]:
                candidate.final_speedup = statistics.median(ratios[candidate.label])


def _kept_calibration(config: Any, scratch: Path, plan: Path) -> Any:
    """A config whose calibration file (its `calibration` field) the search wrote in `scratch`, with the
    file moved beside `plan` as `<plan>.<technique>.<suffix>`."""
    calibration = getattr(config, "calibration", None)
    if not isinstance(calibration, str) or Path(calibration).parent != scratch:
        return config
    kept = plan.with_name(f"{plan.stem}.{registration(config).name}{Path(calibration).suffix}")
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(calibration, kept)
    return dataclasses.replace(config, calibration=str(kept))


def tune(pipe: Any, prompts: list[str], *, target: str | Target | None = None, speedup: float | None = None,
         steps: int | None = None, budget: str | Budget | float | None = None, batch: int = DEFAULT_BATCH,
         seed: int = 0, held_out: list[str] | None = None, path: str | os.PathLike | None = None,
         progress: Callable[[str], None] | None = None, on_measured: Callable[[Candidate], None] | None = None,
         members: tuple | list = (), **call: Any) -> TuneResult:
    """The fastest plan whose quality vs dense on `prompts` meets every bound of `target` (default
    psnr=30), within `budget`; with `speedup`, the plan with the best quality by the target's first metric
    (default psnr) among those measured at >= `speedup` x dense, its other bounds kept as floors.

    `call` is the rest of the pipeline call (size, guidance, ...). With `path` the plan is written there
    as a plan file (DyDiT calibrations beside it); `held_out` prompts re-measure the winner on prompts
    it was not tuned on; `on_measured` is handed every candidate measured on every batch, with its
    status (a progress display's structured feed; `progress` gets the text). `members`: configs to try
    besides every technique's search space, alone and stacked (fine-tuned ones, `dit_accel.finetune`). Everything is checked
    before anything runs: a target the model cannot be measured on (`judge` beyond the reference models
    and their captions) is refused by name. See the
    module's docstring for the search.
    """
    target, budget = Target.for_search(target, speedup), Budget.parse(budget)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ConfigError("tune needs a non-empty list of prompts")
    if batch < 1:
        raise ConfigError(f"batch must be >= 1, got {batch}")
    if "generator" in call:
        raise ConfigError("tune seeds every run itself from seed=...; pass no generator")
    for config in members:
        registration(config)
    model, video = model_source(pipe)
    target.check_judge(model, list(prompts) + list(held_out or []), video)
    say = progress or (lambda message: None)
    if steps is None:
        steps = call.pop("num_inference_steps", None) or \
            inspect.signature(pipe.__call__).parameters["num_inference_steps"].default
    call = {**call, "num_inference_steps": steps, "output_type": "pt"}

    def calls(texts: list[str]) -> list[dict]:
        return [{**call_arguments(pipe, call, {"prompt": texts[i:i + batch]}), "output_type": "pt"}
                for i in range(0, len(texts), batch)]

    batches = calls(list(prompts))
    search = _Search(pipe, batches, seed, target, budget, say, speedup, on_measured=on_measured)
    scratch = Path(tempfile.mkdtemp(prefix="dit-accel-tune-"))  # calibrations; the winner's moves beside the plan

    say(f"dense on {len(batches)} batch(es) of up to {batch}, {steps} steps")
    search.run([], 0, min(WARMUP_STEPS, steps))
    search.run_dense()
    dense_batch = statistics.mean(d.seconds for d in search.dense)
    say(f"dense: {dense_batch:.2f} s a batch")
    held = calls(list(held_out)) if held_out else []
    search.reserve_generations = (FINAL_CANDIDATES + 1) * FINAL_ROUNDS * len(batches) + 2 * len(held)
    search.reserve_seconds = search.reserve_generations * dense_batch

    def calibrate_on_first_batch(config: Any, what: str, path: str | None = None) -> Any:
        search.calibrating(what)
        first = {**batches[0], "generator": torch.Generator().manual_seed(seed)}
        return calibrate(pipe, config, path=path, **first)

    pool = singles(SearchContext(steps, calibrate_on_first_batch, scratch),
                   tuple(Setting(plan_summary([config]), (config,)) for config in members))
    confirmed: list[Candidate] = []

    predictor = search.predictor

    def best() -> float:
        """What a candidate must come close to: the best confirmed one's speed; the speed mode: the quality
        of the last of the `FINAL_CANDIDATES` best confirmed (several, should the best fall short of the
        speed side by side)."""
        worths = sorted((search.worth(c) for c in confirmed), reverse=True)
        if speedup is None:
            return worths[0] if worths else search.start
        return worths[FINAL_CANDIDATES - 1] if len(worths) >= FINAL_CANDIDATES else search.start

    def goes_bolder(base: Candidate) -> bool:
        """A knob goes bolder while it holds the target (the speed mode: while short of the speed)."""
        if not target.near(base.quality):
            return False
        return speedup is None or predictor.speed(base) < speedup * (1 + FINAL_SLACK)

    # the singles: all on the first batch first (they are the stacks' members), then the rest of the batches
    for candidate in pool:
        search.screen(candidate)
    # each knob's boldest setting that still holds goes one step bolder, while it holds on the first batch
    bolder = [c for c in pool if c.bolder is not None]
    unchanged = {id(c): 0 for c in bolder}  # steps in a row that changed neither work nor output
    while bolder and search.can_run(2):
        base = bolder.pop(0)
        if not goes_bolder(base):
            continue
        step = base.bolder()
        if step is None:
            continue
        step.members = (step,)
        pool.append(step)
        search.screen(step)
        unchanged[id(step)] = unchanged[id(base)] + 1 if step.does_what(base) else 0
        if step.bolder is not None and unchanged[id(step)] < 2:  # past its effect, a knob changes nothing more
            bolder.append(step)
    for candidate in sorted((c for c in pool if c.batches), key=lambda c: -search.worth(c)):
        if search.try_candidate(candidate, best()):
            confirmed.append(candidate)
    # the fewer-steps setting the search would pick on its own (the fastest that held on the first batch; the
    # speed mode: the best at the speed) is confirmed even when another is ahead: the final measures every
    # plan against it
    if not any(_runs_fewer_steps_only(c) for c in confirmed):
        holding = [c for c in pool if _runs_fewer_steps_only(c) and c.status in (CandidateStatus.MEETS_BUT_SLOWER,
                                                                                   CandidateStatus.LOWER_QUALITY)]
        fewest = max(holding, key=search.worth, default=None)
        if fewest is not None and search.try_candidate(fewest, -math.inf):
            confirmed.append(fewest)
    # stacks, the most promising by the (corrected) prediction first, while any is predicted to win
    for size in (2, 3):
        bases = [c for c in confirmed if len(c.members) == 2] if size == 3 else None
        options = stack_options(pool, target, size, bases)
        pool += options
        for _ in range(MAX_STACKS):
            live = [c for c in options if c.status is CandidateStatus.NOT_TRIED and search.can_beat(c, best())
                    and target.near(lambda metric, c=c: predictor.quality(c, metric))]
            if not live or not search.can_run(2):
                break
            candidate = max(live, key=search.worth)
            candidate.predicted = (predictor.speed(candidate), predictor.quality(candidate))
            if search.try_candidate(candidate, best()):
                confirmed.append(candidate)
        for candidate in options:
            if candidate.status is CandidateStatus.NOT_TRIED:
                candidate.status = CandidateStatus.PREDICTED_OUT

    # the final, side by side: the best distinct confirmed ones in turn with dense, every batch; fewer steps,
    # the simplest thing a user could do instead, always runs in the final when it held
    fewer = max((c for c in confirmed if _runs_fewer_steps_only(c)), key=search.worth, default=None)
    finalists: list[Candidate] = [] if fewer is None else [fewer]
    ranked = sorted(confirmed, key=lambda c: -search.worth(c))
    if speedup is not None:  # the best one expected well past the speed gets a place, should the others fall short
        safe = next((c for c in ranked if predictor.speed(c) >= speedup * (1 + FINAL_SLACK)), None)
        ranked = ranked if safe is None else [safe] + [c for c in ranked if c is not safe]
    for candidate in ranked:
        same = next((f for f in finalists if candidate.does_what(f)), None)
        if candidate is fewer:
            continue
        if same is not None:
            candidate.status, candidate.same_as = CandidateStatus.SAME_AS_ANOTHER, same.label
        elif len(finalists) < FINAL_CANDIDATES:
            finalists.append(candidate)
    search.time_side_by_side(finalists)
    if speedup is None:
        winner = max(finalists, key=lambda c: c.final_speedup or predictor.speed(c), default=None)
    else:
        reached = [c for c in finalists if _measured_speedup(c) >= speedup]
        winner = max(reached, key=lambda c: (search.worth(c), _measured_speedup(c)), default=None)

    metric = target.metric
    tried = [c for c in pool if c.batches]
    floors = target.floors()
    keeping = "" if floors is None else f" keeping {floors}"
    if winner is None and speedup is None:
        met = [c for c in tried if target.met(c.quality)]
        why = (f"{len(met)} met it on the first batch but none ran faster than dense" if met else
               f"none of the {len(tried)} tried met it" if tried else "the budget ran out before any plan ran")
        message = f"no plan met {target} on these prompts faster than dense within the budget ({why}): dense is returned"
    elif winner is None:
        fastest = max((c for c in tried if target.met(c.quality)), key=_measured_speedup, default=None)
        why = (f"the fastest{keeping}: {fastest.label} at {_measured_speedup(fastest):.2f}x" if fastest is not None
               else f"none of the {len(tried)} tried kept {floors}" if tried else "the budget ran out before any plan ran")
        message = f"no plan reached {speedup:g}x{keeping} on these prompts within the budget ({why}): dense is returned"
    if winner is None:
        configs, label, result_speedup = [], "dense", 1.0
    else:
        configs, label, result_speedup = winner.configs, winner.label, _measured_speedup(winner)
        measured = _qualities(winner, target.metrics)
        if speedup is None:
            message = f"{label}: {result_speedup:.2f}x at {measured} on the tuning prompts (target {target})"
            if winner is fewer:
                message = (f"fewer steps alone is the fastest plan that holds {target} here, ahead of every "
                           f"technique and stack tried: {message}")
            elif fewer is not None:
                message += f"; the best fewer-steps setting, {fewer.label}, ran {_measured_speedup(fewer):.2f}x"
        else:
            message = (f"{label}: {measured} at {result_speedup:.2f}x on the tuning prompts, the best {metric} at "
                       f">= {speedup:g}x{keeping}")
            if winner is fewer:
                message = (f"fewer steps alone gives the best {metric} at >= {speedup:g}x here, ahead of every "
                           f"technique and stack tried: {message}")
            elif fewer is not None and fewer in reached:
                message += (f"; the best fewer-steps setting at that speed, {fewer.label}, kept {metric} "
                            f"{fewer.quality(metric):.3f} at {_measured_speedup(fewer):.2f}x")
    held_qualities: dict[str, float | None] = {}
    if winner is not None and held:
        say(f"held-out check: {len(held)} batch(es), dense and {label}")
        check = Candidate(label, configs)
        held_search = _Search(pipe, held, seed + len(batches), target, Budget(None), say, scorers=search.scorers)
        held_search.run_dense()
        held_search.measure(check, list(range(len(held))))
        search.generations += held_search.generations
        held_qualities = {m: check.quality(m) for m in target.metrics}
        message += f"; held-out {metric} {held_qualities[metric]:.3f}"
    result = TuneResult(configs, label, target, result_speedup, None if winner is None else winner.quality(metric),
                        held_qualities.get(metric), pool, search.generations, search.elapsed(), message,
                        wanted_speedup=speedup,
                        qualities={} if winner is None else {m: winner.quality(m) for m in target.metrics},
                        held_out_qualities=held_qualities,
                        perceptual=None if search.scorers.perceptual is None else search.scorers.perceptual.name)
    if path is not None:
        configs = result.configs = [_kept_calibration(c, scratch, Path(path)) for c in configs]
        save_plan(path, configs, pipe, num_inference_steps=steps, target=result.goal,
                  measured={k: v for k, v in result.summary().items() if k != "candidates"},
                  machine=machine(getattr(pipe, "device", "cpu")), threads=torch.get_num_threads(),
                  prompts=len(prompts), held_out_prompts=len(held_out or []))
        result.path = str(path)
    return result


def _runs_fewer_steps_only(candidate: Candidate) -> bool:
    """Whether the candidate only changes the step count (the schedule stage's rewrite, nothing else)."""
    return bool(candidate.configs) and all(getattr(registration(c).technique, "rewrites_schedule", False)
                                           for c in candidate.configs)
