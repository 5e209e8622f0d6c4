"""`tune`: the fastest plan that holds a quality target on the user's model, prompts and step count.

By job: `target.py` (what a plan must keep and when the search stops: `Target`, `Budget`),
`candidates.py` (`Candidate`, what became of it, and the singles: every registered technique's
`search_space`), `predict.py` (a candidate's speed and quality before timing it, and the stacks worth
trying) and `search.py` (the search itself, `tune` and its `TuneResult`; its docstring tells the
search step by step). `dit_accel.tune`, `Target`, `Budget` and `TuneResult` are the public names.
"""

from .candidates import Candidate, CandidateStatus, singles
from .predict import Predictor, predicted_quality, stack_options
from .search import TuneResult, tune
from .target import Budget, Target

__all__ = ["Budget", "Candidate", "CandidateStatus", "Predictor", "Target", "TuneResult", "predicted_quality",
           "singles", "stack_options", "tune"]
