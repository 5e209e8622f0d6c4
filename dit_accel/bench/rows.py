"""The rows of a benchmark table: dense, dense without hooks, the plans, and the peers a plan has to beat
(dense with fewer steps, diffusers' step caches, cache-dit's DBCache), each summing what its timed runs
measured."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
from typing import Any, Callable

import torch

from ..api import apply
from ..cli_options import DEFAULT_PLANS
from ..plan_spec import parse_plan
from ..techniques import RASConfig


#: threshold of the FirstBlockCache and DBCache peers (the stacking benchmark's image setting)
PEER_THRESHOLD = 0.12
PEERS = ("steps", "fbcache", "taylorseer", "magcache", "pab", "fastercache", "dbcache")
#: each peer's one knob, swept by `--peers NAME=V,V,...` (name, type); FasterCache has none
PEER_KNOBS = {"steps": ("step count", int), "fbcache": ("threshold", float),
              "taylorseer": ("cache interval", int), "magcache": ("threshold", float),
              "pab": ("spatial block skip range", int), "dbcache": ("residual diff threshold", float)}
#: each knob's default (the stacking benchmark's settings; the fewer-steps peer matches the fastest plan)
PEER_DEFAULTS = {"fbcache": PEER_THRESHOLD, "taylorseer": 2, "magcache": 0.06, "pab": 2, "dbcache": PEER_THRESHOLD}
#: what `--equal` sweeps of a peer named without values (steps: shares of the call's steps), so that each
#: family's fastest setting at the target can be found in one run
EQUAL_SWEEPS = {"steps": (0.75, 0.6, 0.5, 0.4, 0.3, 0.25), "fbcache": (0.05, 0.1, 0.2, 0.4),
                "taylorseer": (2, 3, 4), "magcache": (0.06, 0.12, 0.25), "pab": (2, 3, 4), "dbcache": (0.08, 0.16, 0.32)}
#: each peer's family, as the equal-quality table names it
PEER_FAMILIES = {"steps": "fewer steps", "fbcache": "FirstBlockCache", "taylorseer": "TaylorSeer",
                 "magcache": "MagCache", "pab": "PyramidAttentionBroadcast", "fastercache": "FasterCache",
                 "dbcache": "cache-dit DBCache"}


@dataclasses.dataclass
class Row:
    """One line of the table: how it runs, and what its timed runs measured, summed over the batches."""

    label: str
    #: "dense", "no hooks", "plan" or "peer"
    kind: str
    configs: list = dataclasses.field(default_factory=list)
    #: what the equal-quality table keeps one row of: each plan its own, each peer's `PEER_FAMILIES` name
    family: str | None = None
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
    #: the judge's readings equal to its readings of dense, of those compared (suites)
    agreeing_readings: int = 0
    judge_readings: int = 0
    #: the judge's features (reference FID, suites) and the Inception features (--fid), batch by batch
    features: list[torch.Tensor] = dataclasses.field(default_factory=list)
    fid_features: list[torch.Tensor] = dataclasses.field(default_factory=list)
    #: CLIP score summed over the images or frames it was taken on (--fid, where open_clip loads)
    clip_sum: float = 0.0
    clip_frames: int = 0

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
        apply(pipe, *configs).remove()
        rows.append(Row(spec, "plan", configs, family=spec, spec=spec))
    return rows


def peer_rows(peers: list[tuple[str, tuple | None]], steps: int, video: bool) -> tuple[list[Row], list[str]]:
    """The peers asked for that this environment has, one row per value of its knob (its default when none
    is given), and a note for each it lacks. Their settings follow this project's stacking benchmark: the
    caches start after RAS's dense warm-up steps."""
    import diffusers.hooks as hooks

    warmup = RASConfig.for_steps(steps).warmup_steps
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
        family = PEER_FAMILIES[name]
        if name == "steps":
            if steps <= 1:
                notes.append("no fewer-steps peer: the call has 1 step")
            elif values is None:
                rows.append(Row("dense, fewer steps", "peer", family=family, matches_fastest=True))
            else:
                rows += [Row(f"dense, {count} steps", "peer", family=family, steps=count) for count in values]
        elif name == "dbcache":
            if importlib.util.find_spec("cache_dit") is None:
                notes.append("cache-dit is not installed, so there is no DBCache row (pip install cache-dit)")
            else:
                rows += [Row(f"cache-dit DBCache F1B0 {value:g}", "peer", family=family, enable=_dbcache(value, warmup))
                         for value in values or (PEER_DEFAULTS[name],)]
        else:
            config_name, setting = caches[name]
            config_class = getattr(hooks, config_name, None)
            if config_class is None:
                notes.append(f"this diffusers has no {config_name}: no {name} row")
                continue
            for value in values or (PEER_DEFAULTS.get(name),):
                label, fields = setting(value)
                rows.append(Row(label, "peer", [config_class(**fields)], family=family))
    return rows, notes


def equal_sweep(name: str, steps: int) -> tuple | None:
    """The values `--equal` sweeps of peer `name` named without any (`EQUAL_SWEEPS`; steps: the counts below
    the call's), None for a peer without a knob."""
    if name == "steps":
        return tuple(dict.fromkeys(c for c in (max(1, round(steps * share)) for share in EQUAL_SWEEPS[name])
                                   if c < steps))
    return EQUAL_SWEEPS.get(name)


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
    """dense (measured), dense (no hooks), the plans, then the peers: the order every batch runs in. With
    `--equal` every peer family runs unless `--peers` names some, each over its `equal_sweep`."""
    rows = [Row("dense", "dense"), Row("dense (no hooks)", "no hooks", ledger=False)]
    rows += plan_rows(pipe, list(args.plans or DEFAULT_PLANS), steps)
    every = [(name, None) for name in PEERS]
    asked = every if args.peers == [] else list(dict.fromkeys(args.peers or []))
    if args.equal is not None:  # every peer family unless some are named, each swept unless its values are given
        asked = [(name, values or equal_sweep(name, steps)) for name, values in asked or every]
    peers, notes = peer_rows(asked, steps, video)
    return rows + peers, notes
