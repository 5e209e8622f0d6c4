"""`tune`: the fastest plan that holds a quality target on the user's model, prompts and step count.

Thresholds, ratios and top-p that suit one model, resolution and step count do not suit another, so
the search measures them on the user's own prompts against their own dense outputs, cheaper than a grid:

1. dense runs once per batch of tuning prompts (its outputs are the reference of every candidate);
2. every technique's documented presets and every diffusers cache at a few settings (the singles:
   what each registration's `search_space` offers, `candidates.singles`) run on the first batch
   only: its quality, the ledger's FLOPs and its time;
3. each knob's boldest setting that still holds the target goes bolder (`Candidate.bolder`) until it
   fails, or changes nothing twice in a row;
4. candidates are judged by their expected speed: the ledger's FLOPs, exact and free, times the
   technique's median wall/FLOPs efficiency so far (`Predictor`); one within a margin of the target on
   the first batch, and within `FINAL_SLACK` of the best expected speed, runs on the other batches,
   and one that meets the target on all of them is confirmed;
5. stacks of singles from different stages are predicted before they run (FLOPs as the product of
   their members', PSNR by adding their errors, both corrected by the stacks of the same pairing run
   so far); only stacks predicted to hold the target and beat the best run, the most promising first;
6. the fastest expected distinct confirmed candidates are timed again side by side with dense, in
   turn, over every tuning batch; the winner has the best median speedup; a target no plan meets
   returns dense, said so;
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
from ..metrics.quality import psnr_frames, ssim_frames
from ..plan_files import save_plan
from ..runtime.registry import registration
from ..runtime.search_space import SearchContext
from .candidates import Candidate, CandidateStatus, singles
from .predict import Predictor, stack_options
from .target import Budget, Target

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


class _Search:
    """The state of one `tune` call: the batches, dense's outputs, the clock and the budget."""

    def __init__(self, pipe: Any, batches: list[dict], seed: int, target: Target, budget: Budget,
                 say: Callable[[str], None]):
        self.pipe, self.batches, self.seed, self.target, self.budget, self.say = pipe, batches, seed, target, budget, say
        self.started = time.perf_counter()
        self.generations = 0
        self.dense: list[PlanRun] = []
        self.predictor = Predictor(target.metric)
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

    def try_candidate(self, candidate: Candidate, best: float) -> bool:
        """Screen on the first batch, then the other batches if it can still meet the target and win
        (expected speed within `FINAL_SLACK` of `best`, the best confirmed one's); True when it is
        confirmed (meets the target on every tuning batch)."""
        metric = self.target.metric
        if not candidate.batches and not self.screen(candidate):
            return False
        first = candidate.quality(metric)
        if candidate.flops_ratio is not None and candidate.flops_ratio >= 1.0:
            # it ran dense here (a sparse attention on too few tokens): dense itself, not a plan
            candidate.status = CandidateStatus.SAVES_NOTHING
            return False
        if first < self.target.value - self.target.margin:
            candidate.status = CandidateStatus.MISSES_ON_FIRST_BATCH
            return False
        if self.predictor.speed(candidate) <= best * (1 - FINAL_SLACK):
            candidate.status = CandidateStatus.MEETS_BUT_SLOWER if first >= self.target.value else \
                CandidateStatus.CANNOT_WIN
            return False
        rest = list(range(candidate.batches, len(self.batches)))
        if rest and not self.can_run(len(rest)):
            candidate.status = CandidateStatus.BUDGET_SPENT
            return False
        if rest and not self._measured(candidate, rest):
            return False
        met = candidate.quality(metric) >= self.target.value
        candidate.status = CandidateStatus.MEETS_TARGET if met else CandidateStatus.MISSES_TARGET
        self.say(f"[{self.elapsed():.0f} s, {self.generations} runs] {candidate.label}: {metric} "
                 f"{candidate.quality(metric):.3f}, {candidate.speedup:.2f}x measured, "
                 f"{self.predictor.speed(candidate):.2f}x expected, FLOPs {candidate.flops_ratio or 1:.3f}: "
                 f"{candidate.status_text}")
        return met

    def time_side_by_side(self, finalists: list[Candidate]) -> None:
        """`FINAL_ROUNDS` rounds of dense then every finalist, in turn, on every tuning batch, as far as
        the whole budget goes; each finalist's `final_speedup` is the median of its ratios to dense."""
        rounds = len(self.batches) * (len(finalists) + 1)
        if len(finalists) < 2:
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
    scratch = Path(tempfile.mkdtemp(prefix="dit-accel-tune-"))  # calibrations; the winner's moves beside the plan

    say(f"dense on {len(batches)} batch(es) of up to {batch}, {steps} steps")
    search.run([], 0, min(WARMUP_STEPS, steps))
    search.dense = [search.run([], i) for i in range(len(batches))]
    dense_batch = statistics.mean(d.seconds for d in search.dense)
    say(f"dense: {dense_batch:.2f} s a batch")
    held = calls(list(held_out)) if held_out else []
    search.reserve_generations = (FINAL_CANDIDATES + 1) * FINAL_ROUNDS * len(batches) + 2 * len(held)
    search.reserve_seconds = search.reserve_generations * dense_batch

    def calibrate_on_first_batch(config: Any, what: str, path: str | None = None) -> Any:
        search.calibrating(what)
        first = {**batches[0], "generator": torch.Generator().manual_seed(seed)}
        return calibrate(pipe, config, path=path, **first)

    pool = singles(SearchContext(steps, calibrate_on_first_batch, scratch))
    confirmed: list[Candidate] = []

    predictor = search.predictor

    def best() -> float:
        return max((predictor.speed(c) for c in confirmed), default=1.0)

    # the singles: all on the first batch first (they are the stacks' members), then the rest of the batches
    for candidate in pool:
        search.screen(candidate)
    # each knob's boldest setting that still holds goes one step bolder, while it holds on the first batch
    bolder = [c for c in pool if c.bolder is not None]
    unchanged = {id(c): 0 for c in bolder}  # steps in a row that changed neither work nor output
    while bolder and search.can_run(2):
        base = bolder.pop(0)
        if base.quality(target.metric) is None or base.quality(target.metric) < target.value - target.margin:
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
    for candidate in sorted((c for c in pool if c.batches), key=lambda c: -predictor.speed(c)):
        if search.try_candidate(candidate, best()):
            confirmed.append(candidate)
    # the fastest fewer-steps setting that held on the first batch is confirmed even when slower than the
    # best so far: the final measures every plan against it
    if not any(_runs_fewer_steps_only(c) for c in confirmed):
        holding = [c for c in pool if _runs_fewer_steps_only(c) and c.status is CandidateStatus.MEETS_BUT_SLOWER]
        fewest = max(holding, key=predictor.speed, default=None)
        if fewest is not None and search.try_candidate(fewest, 0.0):
            confirmed.append(fewest)
    # stacks, the most promising by the (corrected) prediction first, while any is predicted to win
    for size in (2, 3):
        bases = [c for c in confirmed if len(c.members) == 2] if size == 3 else None
        options = stack_options(pool, target, size, bases)
        pool += options
        for _ in range(MAX_STACKS):
            live = [c for c in options if c.status is CandidateStatus.NOT_TRIED and predictor.speed(c) > best()
                    and predictor.quality(c) >= target.value - target.margin]
            if not live or not search.can_run(2):
                break
            candidate = max(live, key=predictor.speed)
            candidate.predicted = (predictor.speed(candidate), predictor.quality(candidate))
            if search.try_candidate(candidate, best()):
                confirmed.append(candidate)
        for candidate in options:
            if candidate.status is CandidateStatus.NOT_TRIED:
                candidate.status = CandidateStatus.PREDICTED_OUT

    # the final, side by side: the fastest expected distinct confirmed ones in turn with dense, every batch
    # fewer steps, the simplest thing a user could do instead, always runs in the final when it held
    fewer = max((c for c in confirmed if _runs_fewer_steps_only(c)), key=predictor.speed, default=None)
    finalists: list[Candidate] = [] if fewer is None else [fewer]
    for candidate in sorted(confirmed, key=lambda c: -predictor.speed(c)):
        same = next((f for f in finalists if candidate.does_what(f)), None)
        if candidate is fewer:
            continue
        if same is not None:
            candidate.status, candidate.same_as = CandidateStatus.SAME_AS_ANOTHER, same.label
        elif len(finalists) < FINAL_CANDIDATES:
            finalists.append(candidate)
    search.time_side_by_side(finalists)
    winner = max(finalists, key=lambda c: c.final_speedup or predictor.speed(c), default=None)

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
        if winner is fewer:
            message = (f"fewer steps alone is the fastest plan that holds {target} here, ahead of every technique "
                       f"and stack tried: {message}")
        elif fewer is not None:
            message += f"; the best fewer-steps setting, {fewer.label}, ran {fewer.final_speedup or fewer.speedup:.2f}x"
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
        configs = result.configs = [_kept_calibration(c, scratch, Path(path)) for c in configs]
        save_plan(path, configs, pipe, num_inference_steps=steps, target=str(target),
                  measured={k: v for k, v in result.summary().items() if k != "candidates"},
                  machine=machine(getattr(pipe, "device", "cpu")), threads=torch.get_num_threads(),
                  prompts=len(prompts), held_out_prompts=len(held_out or []))
        result.path = str(path)
    return result


def _runs_fewer_steps_only(candidate: Candidate) -> bool:
    """Whether the candidate only changes the step count (the schedule stage's rewrite, nothing else)."""
    return bool(candidate.configs) and all(getattr(registration(c).technique, "rewrites_schedule", False)
                                           for c in candidate.configs)
