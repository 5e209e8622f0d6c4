"""What the search expects before it times a candidate: `Predictor` (speed from the ledger's FLOPs
at each technique's measured wall/FLOPs efficiency; a stack's quality from its members' errors,
corrected by the stacks of the same pairing run so far), `predicted_quality`, and `stack_options`,
the stacks of singles from different stages worth predicting.
"""

from __future__ import annotations

import itertools
import math
import statistics

from ..runtime.registry import registration
from .candidates import Candidate
from .target import METRICS, Target


def predicted_quality(members: tuple[Candidate, ...], metric: str) -> float | None:
    """A stack's quality from its members' if their errors added (`Metric.loss`): PSNR by adding their
    mean squared errors, SSIM and the judge's agreement by adding their losses, a perceptual distance by
    adding the distances; None where a member's was not measured."""
    values = [m.quality(metric) for m in members]
    if any(v is None for v in values):
        return None
    kind = METRICS[metric]
    return kind.from_loss(sum(kind.loss(v) for v in values))


class Predictor:
    """Speed and quality of candidates before (or without) timing them side by side.

    Speed comes from the ledger's FLOPs, which are exact and free, times a wall/FLOPs efficiency per
    technique: the median over every run of that technique so far (single runs on this machine drift by
    10-30%, a FLOPs ratio does not). A stack's FLOPs are its members' product until it runs. Quality of
    a stack starts as its members' errors added (`predicted_quality`) and its efficiency as its worst
    member's; both are corrected by the stacks of the same techniques run so far (the median of measured
    error / added errors, and of measured efficiency / predicted). Errors compound unevenly (a step
    cache reusing residuals that token skipping already approximated loses far more than the two alone),
    so each pairing of techniques is learnt on its own, and a pairing not run yet is tried optimistically.
    """

    def __init__(self, metrics: tuple[str, ...]):
        #: the target's metrics, the primary first
        self.metrics = tuple(metrics)
        self.efficiencies: dict[str, list[float]] = {}
        #: per pairing of techniques (their kinds, sorted) and per metric for the errors: measured / predicted
        self.error_ratios: dict[tuple, list[float]] = {}
        self.efficiency_ratios: dict[tuple, list[float]] = {}

    @staticmethod
    def _median(values: list[float] | None) -> float:
        return statistics.median(values) if values else 1.0

    @staticmethod
    def _kind(candidate: Candidate) -> str:
        return "+".join(sorted(registration(c).name for c in candidate.configs))

    def _pairing(self, candidate: Candidate) -> tuple:
        return tuple(sorted(self._kind(m) for m in candidate.members))

    def efficiency(self, candidate: Candidate) -> float:
        if len(candidate.members) <= 1:
            return self._median(self.efficiencies.get(self._kind(candidate)))
        worst = min(self.efficiency(m) for m in candidate.members)
        return worst * self._median(self.efficiency_ratios.get(self._pairing(candidate)))

    def flops(self, candidate: Candidate) -> float:
        if candidate.flops_ratio is not None:
            return candidate.flops_ratio
        return math.prod(m.flops_ratio or 1.0 for m in candidate.members)

    def speed(self, candidate: Candidate) -> float:
        """The expected wall-clock speedup: the FLOPs speedup at the technique's efficiency."""
        return self.efficiency(candidate) / self.flops(candidate)

    def quality(self, candidate: Candidate, metric: str | None = None) -> float | None:
        """`metric` (default: the primary one) measured, else (a stack not run yet) predicted."""
        metric = metric or self.metrics[0]
        if candidate.batches:
            return candidate.quality(metric)
        added = predicted_quality(candidate.members, metric)
        if added is None:
            return None
        kind = METRICS[metric]
        return kind.from_loss(kind.loss(added) * self._median(self.error_ratios.get((self._pairing(candidate), metric))))

    def observe(self, candidate: Candidate) -> None:
        """Take in a candidate's run: its technique's efficiency; for a stack its error and efficiency
        against the predicted ones."""
        if not candidate.speedup or candidate.flops_ratio is None:
            return
        if len(candidate.members) <= 1:
            self.efficiencies.setdefault(self._kind(candidate), []).append(candidate.efficiency)
            return
        pairing = self._pairing(candidate)
        for metric in self.metrics:
            measured, added = candidate.quality(metric), predicted_quality(candidate.members, metric)
            kind = METRICS[metric]
            if measured is not None and added is not None and kind.loss(added) > 0:
                self.error_ratios.setdefault((pairing, metric), []).append(kind.loss(measured) / kind.loss(added))
        worst = min(self.efficiency(m) for m in candidate.members)
        self.efficiency_ratios.setdefault(pairing, []).append(candidate.efficiency / worst)


def stack_options(pool: list[Candidate], target: Target, size: int,
                  bases: list[Candidate] | None = None) -> list[Candidate]:
    """Every stack of `size` members from different stages, each member meeting the target alone on the
    first batch (triples: a confirmed pair plus one such member); a bound without a value (the speed mode's
    metric to maximise) keeps every member. Not yet checked to compose: a plan the runtime refuses is
    refused when it is tried."""
    usable = [c for c in pool if len(c.members) == 1 and c.batches and target.met(c.quality)]
    groups = ([base.members + (extra,) for base in bases for extra in usable if extra not in base.members]
              if bases is not None else itertools.combinations(usable, size))
    found, seen = [], set()
    for members in groups:
        key = frozenset(m.label for m in members)
        if key in seen or any(a.stages & b.stages for a, b in itertools.combinations(members, 2)):
            continue
        seen.add(key)
        found.append(Candidate("+".join(m.label for m in members), [c for m in members for c in m.configs], members))
    return found
