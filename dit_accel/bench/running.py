"""Running a benchmark: load, build the rows, calibrate, warm up, then every batch with dense and each row
in turn on the batch's seed (medians over `--repeats` rounds), measuring time, the ledger, peak memory,
quality vs dense and the judge; under several processes, merge and write on the main one."""

from __future__ import annotations

import argparse
import dataclasses
import resource
import statistics
import sys
from typing import Any, Callable

import torch

from ..api import measure
from ..calibration import calibrate
from ..comparison import PlanRun
from ..cli_options import call_kwargs, load_pipeline, status_printer
from ..loading import UsageError, read_prompts
from ..machine import machine
from ..metrics.judge import agreement
from ..metrics.quality import PerceptualDistance, frames, psnr_frames, ssim_frames
from ..metrics.suites import SUITES
from ..tuning.target import model_source
from .common import timed
from .content import ContentScoring, clip_texts, content_scoring
from .judging import Judging, caption_accuracy, judge_features, judge_readings, judging
from .processes import ONE_PROCESS, Processes, merge_rows, partials
from .prompts import DEFAULT_BATCH, SUITE_SETTING, call_parameters, suite_of, batch_calls, prompt_set
from .report import equal_quality, markdown, notes, summarize, write_results
from .rows import Row, build_rows, fewer_steps


#: steps of each row's untimed warm-up run
WARMUP_STEPS = 2


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
            with measure(pipe) as handle:
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
            row.configs = [calibrate(pipe, c, **call, generator=torch.Generator().manual_seed(seed))
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
class Scoring:
    """What a run is scored with beyond time and the ledger: the perceptual distance vs dense, the judge
    (suites), FID and CLIP score (`--fid`)."""

    perceptual: PerceptualDistance
    judged: Judging | None = None
    content: ContentScoring | None = None


@dataclasses.dataclass
class BatchReference:
    """One batch's dense run and what every row's run of the batch is compared with."""

    dense: PlanRun
    scenes: list | None
    #: its prompts (the CLIP score's), where they are text
    texts: list[str] | None
    #: the judge's readings of dense's samples (suites)
    readings: list | None


def record(row: Row, run: PlanRun, peak: int | None, batch: BatchReference, scoring: Scoring) -> None:
    """Add one batch's run to its row: time, ledger, memory, quality vs this batch's dense run, judge,
    FID features and CLIP score."""
    samples = run.output.shape[0]
    row.samples += samples
    row.seconds += run.seconds
    report = run.report
    for key in ("transformer_seconds", "flops", "dense_flops"):
        value = getattr(row, key)
        setattr(row, key, None if report is None or value is None else value + report[key])
    row.peak_bytes = peak if row.peak_bytes is None else max(row.peak_bytes, peak or 0)
    images = frames(run.output)
    if run is not batch.dense:
        values = psnr_frames(run.output, batch.dense.output)
        row.psnr_frames += values
        row.ssim_sum += ssim_frames(run.output, batch.dense.output) * len(values)
        row.perceptual_sum += scoring.perceptual(images, frames(batch.dense.output)) * len(values)
    judged = scoring.judged
    if judged is not None and batch.scenes is not None:
        row.accuracy_sum += caption_accuracy(judged.judge, run.output, batch.scenes, judged.video) * samples
        row.features.append(judge_features(judged.judge, run.output))
        agreeing, compared = agreement(judge_readings(judged, run.output), batch.readings)
        row.agreeing_readings += agreeing
        row.judge_readings += compared
    content = scoring.content
    if content is not None:
        row.fid_features.append(content.features(images))
        if content.clip is not None and batch.texts is not None:
            per_sample = len(images) // len(batch.texts)  # a video's frames each read against its prompt
            texts = [text for text in batch.texts for _ in range(per_sample)]
            row.clip_sum += content.clip(images, texts) * len(images)
            row.clip_frames += len(images)


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
                memory: PeakMemory, scoring: Scoring, say, processes: Processes = ONE_PROCESS,
                repeats: int = 1) -> None:
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
        dense = medians[0]
        reference = BatchReference(dense, scenes, clip_texts(call), None if scoring.judged is None or scenes is None
                                   else judge_readings(scoring.judged, dense.output))
        for position, row in enumerate(rows):
            if row.error is None and position in rounds:
                peaks = [peak for _, peak in rounds[position] if peak is not None]
                record(row, medians[position], max(peaks) if peaks else None, reference, scoring)
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


def bench(args: argparse.Namespace) -> dict[str, Any] | None:
    """Load, build the rows, calibrate, warm up, run every batch in turn, then write the results. Under
    `accelerate launch` each process runs its share of the batches, and only the main process merges
    and writes (and returns the results; the others return None)."""
    processes = Processes.current(args.device)  # before the threads: accelerate may set them
    if args.threads:
        torch.set_num_threads(args.threads)
    say = status_printer(args)
    if processes.world > 1:
        args.device = processes.device_for(args.device)
        say = _with_rank(say, processes)
    suite = suite_of(args)
    if suite is not None:  # the suite's standard setting, under what the options say
        args.batch = args.batch or SUITE_SETTING["batch"]
        args.steps = args.steps or SUITES[suite].steps
        args.guidance = SUITE_SETTING["guidance"] if args.guidance is None else args.guidance
        args.model = args.model or f"reference:{suite}"
    given = read_prompts(args.prompt_file) if args.prompt_file is not None else None  # said before loading
    if args.equal is not None and "judge" in args.equal.metrics and suite is None:
        raise UsageError(f"--equal {args.equal}: the judge's agreement is measured on the reference models' caption "
                         "suites only (--suite image|detail|video, or a reference:* model without --prompts)")
    content = content_scoring(args.fid)  # refused here, before any model loads, where its weights cannot
    pipe, defaults, model, dtype = load_pipeline(args, say)
    pipe.set_progress_bar_config(disable=True)  # one line a run instead
    call = call_kwargs(pipe, defaults, argparse.Namespace(**{**vars(args), "prompt": None}))
    video = "num_frames" in call_parameters(pipe)
    prompts = prompt_set(args, suite, given, pipe, video)
    batch = args.batch or DEFAULT_BATCH
    batches = batch_calls(pipe, call, prompts, batch)
    steps = call["num_inference_steps"]
    if args.equal is not None:  # a judge bound on a model the judge cannot read: before any generation
        args.equal.check_judge(model_source(pipe)[0], prompts.texts, video)
    rows, peer_notes = build_rows(args, pipe, steps, video)
    memory = PeakMemory(args.device)
    judged = judging(prompts, video)

    first = batches[0][0]
    ours = processes.share(len(batches))  # a process with no batch only takes part in what is shared
    calibrate_rows(pipe, rows, first, args.seed, say, processes, run=bool(ours))
    if ours:
        warm_up(pipe, rows, first, args.seed, memory, say)
    scoring = Scoring(PerceptualDistance(), judged, content)
    run_batches(pipe, rows, batches, args.seed, memory, scoring, say, processes, args.repeats)
    if processes.world > 1:
        parts = processes.gather(partials(rows, ours))
        if not processes.main:
            return None
        merge_rows(rows, parts)

    summary = summarize(rows, steps, judged, content)
    equal = None if args.equal is None else {"target": str(args.equal), "rows": equal_quality(summary, args.equal)}
    results = {
        "machine": machine(args.device), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "diffusers": _version("diffusers"), "device": str(args.device), "dtype": str(dtype).removeprefix("torch."),
        "model": model, "pipeline": type(pipe).__name__, "seed": args.seed, "judged": judged is not None,
        "call": {**{k: v for k, v in call.items() if isinstance(v, (str, int, float, bool)) and k != "output_type"},
                 "batch": batch, "batches": len(batches), "warmup_steps": WARMUP_STEPS},
        "prompts": {"source": prompts.source, "count": len(prompts.texts), "texts": prompts.texts},
        "memory": memory.kind, "real_images": judged.real if judged else None, "processes": processes.world,
        "repeats": args.repeats,
        "perceptual": scoring.perceptual.name, "fid": None if content is None else content.source,
        "rows": summary, "equal_quality": equal,
        "notes": notes(rows, memory.kind, judged, scoring.perceptual, peer_notes, processes.world, content),
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
