"""What the stages, the ledger hooks and the techniques see of the session they belong to.

`Session` (session.py) builds techniques and stage helpers and hands them itself; they read it only
through `SessionView`, so none of them imports session.py (which imports them). The view is read
only: the session alone swaps its hooks and opens and closes its call state.
"""

from __future__ import annotations

from typing import Mapping, Protocol

from torch import nn

from ..config import Stage
from ..models.base import ModelAdapter
from .call_state import CallState
from .hooks import HookSet


class StageMember(Protocol):
    """What a technique may read of the other members of its plan: their name, for messages."""

    @property
    def label(self) -> str: ...


class SessionView(Protocol):
    """One accelerated transformer, as a technique or a stage helper reads it."""

    @property
    def transformer(self) -> nn.Module: ...

    @property
    def adapter(self) -> ModelAdapter: ...

    @property
    def hooks(self) -> HookSet:
        """Where a technique adds its hooks; `detach` takes them all off."""
        ...

    @property
    def call_state(self) -> CallState | None:
        """The transformer call running now (None between calls)."""
        ...

    @property
    def details(self) -> bool:
        """Whether per-call pictures (token sets, cluster maps) are kept for the UI; build them only then."""
        ...

    @property
    def by_stage(self) -> Mapping[Stage, StageMember]:
        """The plan's techniques by the stages they occupy."""
        ...
