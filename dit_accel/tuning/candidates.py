"""The candidates of a search: `Candidate` (one plan and what it measured), `CandidateStatus` (what
became of it) and `singles`, every registered technique's settings as candidates.

A technique declares what `tune` tries of it on its registration (`search_space`, plain `Setting`s
from `runtime/search_space.py`); this module names no technique.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Any, Callable

from ..metrics.quality import mean_db
from ..runtime.registry import registrations, stages_of
from ..runtime.search_space import SearchContext, Setting


class CandidateStatus(str, enum.Enum):
    """What became of a candidate; the value is what the search's table and summary say."""

    NOT_TRIED = "not tried"
    BUDGET_SPENT = "budget spent"
    #: the runtime refused the plan (`Candidate.error` says why)
    REFUSED = "refused"
    #: the model could not run it (`Candidate.error` says why)
    FAILED = "failed"
    #: it ran dense here (a sparse attention on too few tokens)
    SAVES_NOTHING = "saves nothing here"
    MISSES_ON_FIRST_BATCH = "misses the target on the first batch"
    MEETS_BUT_SLOWER = "meets it, slower than the best so far"
    CANNOT_WIN = "cannot win: slower than the best so far"
    #: the speed mode: expected below the speed asked for
    BELOW_SPEED = "slower than the speed asked for"
    #: the speed mode: at the speed, but lower quality than the best so far there
    LOWER_QUALITY = "at the speed, lower quality than the best so far"
    MEETS_TARGET = "meets the target"
    MISSES_TARGET = "misses the target"
    #: a stack left out: predicted to lose or to miss the target
    PREDICTED_OUT = "cannot win or hold the target, as predicted"
    #: met the target with the same work and outputs as a faster candidate (`Candidate.same_as`)
    SAME_AS_ANOTHER = "meets the target, does what another does"

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass
class Candidate:
    """One plan the search considered, and what it measured (sums over the batches it ran)."""

    label: str
    configs: list
    #: the singles a stack is made of (itself for a single)
    members: tuple = ()
    #: makes the configs when first run (calibrations), else None
    prepare: Callable[[], list] | None = None
    #: the knob a setting belongs to ("fbcache", "magcache, 4 skips", ...), if it has one
    knob: str | None = None
    #: the next, bolder setting of the same knob (kept on the boldest one of the start), else None
    bolder: Callable[[], "Candidate | None"] | None = None
    status: CandidateStatus = CandidateStatus.NOT_TRIED
    #: SAME_AS_ANOTHER: the label of the candidate it does the same as
    same_as: str | None = None
    error: str | None = None
    batches: int = 0
    seconds: float = 0.0
    dense_seconds: float = 0.0
    flops_ratio: float | None = None
    psnr_frames: list = dataclasses.field(default_factory=list)
    ssim_sum: float = 0.0
    #: summed over frames like SSIM; None where the target names no perceptual bound (not measured)
    perceptual_sum: float | None = None
    #: the judge's readings equal to dense's, of those compared (only where the target names the judge)
    judge_agreeing: int = 0
    judge_readings: int = 0
    #: (predicted speedup, predicted quality) of a stack before it ran
    predicted: tuple[float, float] | None = None
    final_speedup: float | None = None

    @property
    def stages(self) -> frozenset:
        return frozenset().union(*(stages_of(c) for c in self.configs))

    @property
    def speedup(self) -> float | None:
        return self.dense_seconds / self.seconds if self.seconds else None

    @property
    def status_text(self) -> str:
        """The status as the search's summary says it."""
        if self.status is CandidateStatus.SAME_AS_ANOTHER:
            return f"meets the target, does what {self.same_as} does"
        return self.status.value

    def quality(self, metric: str) -> float | None:
        """Its mean `metric` (a name of `target.METRICS`) over what it ran; None where not measured."""
        if not self.psnr_frames:
            return None
        if metric == "psnr":
            return mean_db(self.psnr_frames)
        if metric == "ssim":
            return self.ssim_sum / len(self.psnr_frames)
        if metric == "perceptual":
            return None if self.perceptual_sum is None else self.perceptual_sum / len(self.psnr_frames)
        return self.judge_agreeing / self.judge_readings if self.judge_readings else None

    def does_what(self, other: "Candidate") -> bool:
        """The same work and the same outputs as `other`: the same plan in effect (a knob past its effect)."""
        return self.flops_ratio == other.flops_ratio and self.psnr_frames == other.psnr_frames

    @property
    def efficiency(self) -> float:
        """Wall-clock speedup over the FLOPs speedup (1: time falls exactly as the counted work does)."""
        return (self.speedup or 1.0) * (self.flops_ratio or 1.0)

    def summary(self, metrics: tuple[str, ...]) -> dict[str, Any]:
        return {"label": self.label, "status": self.status_text, "error": self.error, "batches": self.batches,
                "speedup": self.speedup, "final_speedup": self.final_speedup, "flops_ratio": self.flops_ratio,
                **{metric: self.quality(metric) for metric in metrics}, "predicted": self.predicted}


def candidate_of(setting: Setting, context: SearchContext) -> Candidate:
    """A technique's setting as a candidate (its `prepare` and `bolder` bound to `context`)."""
    prepare = None if setting.prepare is None else (lambda: setting.prepare(context))
    bolder = None
    if setting.bolder is not None:
        def bolder() -> Candidate | None:
            step = setting.bolder()
            return None if step is None else candidate_of(step, context)
    return Candidate(setting.label, list(setting.configs), prepare=prepare, knob=setting.knob, bolder=bolder)


def singles(context: SearchContext, members: tuple[Setting, ...] = ()) -> list[Candidate]:
    """Every registered technique's settings (`Registration.search_space`: documented presets, a few
    settings of diffusers' caches, calibrated ones made on the first batch through `context`), in
    registration order, after the `members` the caller brings (fine-tuned configs: screened first, so
    a short budget still measures them); of each knob only the last (boldest) setting may go bolder."""
    found = [candidate_of(setting, context) for setting in members] + [
        candidate_of(setting, context) for r in registrations() if r.search_space is not None
        for setting in r.search_space(context)]
    boldest = {c.knob: c for c in found if c.knob is not None}  # the last setting of each knob
    for candidate in found:
        candidate.members = (candidate,)
        if boldest.get(candidate.knob) is not candidate:
            candidate.bolder = None
    return found
