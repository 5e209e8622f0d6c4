"""What the benchmarks share: their start (threads, quiet diffusers, the machine named), runs repeated
in turn (whole generations, or any callables), their medians, and markdown tables."""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch
from diffusers.utils import logging as diffusers_logging

from dit_accel.comparison import PlanRun, timed_run
from dit_accel.machine import cpu_name


def start(threads: int) -> str:
    """Torch on `threads` threads, diffusers without progress bars or notices; returns the line that
    names the machine, which every benchmark prints first."""
    torch.set_num_threads(threads)
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    return f"machine: {cpu_name()}, {os.cpu_count()} cores, {threads} threads, torch {torch.__version__}, fp32"


def timed(pipe, call: dict, configs: list, seed: int) -> PlanRun:
    """One timed generation (`configs` empty: dense)."""
    run = PlanRun("plan" if configs else "dense", list(configs))
    timed_run(pipe, run, call, seed)
    return run


def in_turn(pipe, call: dict, members: dict[str, list], repeats: int, seed: int) -> dict[str, list[PlanRun]]:
    """`repeats` rounds of dense, then every plan (dense, plan, dense, plan, ...), so a drift of the
    machine's speed hits all plans alike; per label, the runs of every round."""
    runs: dict[str, list[PlanRun]] = {"dense": [], **{label: [] for label in members}}
    for _ in range(repeats):
        dense = timed(pipe, call, [], seed)
        runs["dense"].append(dense)
        for label, configs in members.items():
            run = timed(pipe, call, configs, seed)
            run.speedup = dense.seconds / run.seconds
            runs[label].append(run)
    return runs


def medians(runs: dict[str, list[PlanRun]]) -> list[dict]:
    """Per label: median time, median of the per-round speedups, the FLOPs ratio of the last round."""
    return [{"plan": label, "seconds": statistics.median(r.seconds for r in rounds),
             "speedup": statistics.median(r.speedup for r in rounds), "flops_ratio": rounds[-1].flops_ratio}
            for label, rounds in runs.items()]


def seconds(fn: Callable[[], object], clock: Callable[[], float] = time.perf_counter) -> float:
    """How long one call of `fn` took on `clock`."""
    start = clock()
    fn()
    return clock() - start


def median_seconds_in_turn(runs: dict[str, Callable[[], object]], rounds: int,
                           clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Per label, the median time of its callable over `rounds` rounds that call every one in turn, so a
    drift of the machine's speed hits all alike."""
    times: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(rounds):
        for label, fn in runs.items():
            times[label].append(seconds(fn, clock))
    return {label: statistics.median(values) for label, values in times.items()}


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Rows as a markdown table; columns are (key, title, format), "-" where a value is missing."""
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else format(value, fmt) if fmt else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
