"""What a technique's `call_stats` returns, declared key by key with how the tools show it.

A technique class lists its keys in `Technique.stats`. `report()` carries the values per call as
they are; the UI (`ui/report_view.py`) lists and draws them by `StatKind`, iterating the registered
techniques (`runtime.registry.declared_stats`), so a new technique's numbers and pictures need no
change outside its own file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class StatKind(enum.Enum):
    """How a value is shown; the value's shape per call follows from it."""

    #: a number per call, listed per step
    VALUE = "value"
    #: {block: number} per call, listed per step
    BY_BLOCK = "by block"
    #: {block: fraction in [0, 1]} per call (a block left out counts as 1), drawn as a call x block grid
    #: (white: 1, dense)
    BLOCK_FRACTION = "block fraction"
    #: the sorted token indices of the first sample per call (None: every token) on the grid that the
    #: stat's `grid` key holds ([frames, rows, cols]), drawn over the image as how often each token was in it
    TOKEN_SET = "token set"
    #: {"block": b, "labels": [frames][rows][cols] of ints, -1 for none}, the last call's drawn over the
    #: image as a map of its labels
    TOKEN_LABELS = "token labels"
    #: in `report()` only
    DETAIL = "detail"


@dataclass(frozen=True)
class Stat:
    """One key of a technique's `call_stats`."""

    key: str
    kind: StatKind
    #: what the UI calls it (the start of a picture's caption)
    label: str = ""
    #: listed in the UI's per-step table; None: values and per-block numbers are, the rest is not
    listed: bool | None = None
    #: TOKEN_SET: the key of the call's [frames, rows, cols]
    grid: str | None = None

    @property
    def in_table(self) -> bool:
        return self.kind in (StatKind.VALUE, StatKind.BY_BLOCK) if self.listed is None else self.listed

    @property
    def drawn(self) -> bool:
        return self.kind in (StatKind.BLOCK_FRACTION, StatKind.TOKEN_SET, StatKind.TOKEN_LABELS)
