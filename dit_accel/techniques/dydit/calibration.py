"""DyDiT's calibration: the scores of heads and channel groups, the files that keep them, the choice
of units from them, and the calibration run behind `dit_accel.calibrate(pipe, DyDiTConfig(...), path=...)`.

While calibrating, every output projection adds the Gram matrix of its heads' (groups')
contributions to the block output (`add_contributions`), per bucket of steps (`DyDiTScores`); the
means go to a safetensors file with the transformer's identity (`models/identity.py`), refused for
any other model (`load_calibration`). `select_units` keeps the units whose dropping changes the
block output least.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...config import ConfigError
from ...models.identity import load_for_model, model_identity, save_for_model
from .config import DyDiTConfig

#: safetensors metadata "format" of a calibration file
CALIBRATION_FORMAT = "dit-accel dydit calibration 2"
#: tokens scored at once while calibrating
_SCORE_CHUNK = 1024
#: unit selections searched exhaustively up to this many candidate sets
_EXHAUSTIVE = 4096


def save_calibration(path: str | Path, scores: dict[str, torch.Tensor], transformer: nn.Module,
                     details: dict[str, Any]) -> None:
    save_for_model(str(path), scores, model_identity(transformer), CALIBRATION_FORMAT, details=json.dumps(details))


def load_calibration(path: str | Path, transformer: nn.Module) -> dict[str, torch.Tensor]:
    """Per part (buckets, units) scores, refused with a `ConfigError` when made for another model."""
    return load_for_model(path, transformer, CALIBRATION_FORMAT, f"DyDiT calibration {str(path)!r}")[0]


class DyDiTScores:
    """While calibrating: per part and bucket, the running mean Gram matrix of the units'
    contributions to the block output, G[h, g] = E_token <x_h W_h^T, x_g W_g^T>. Dropping a set D
    of units changes the output by sum_{h in D} x_h W_h^T, whose expected squared norm is
    1_D^T G 1_D: the selection drops the units that keep it smallest, cancellations included."""

    def __init__(self, buckets: int):
        self.buckets = buckets
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, key: str, bucket: int, gram: torch.Tensor) -> None:
        if key not in self.sums:
            self.sums[key] = torch.zeros(self.buckets, *gram.shape)
            self.counts[key] = torch.zeros(self.buckets)
        self.sums[key][bucket] += gram.float().cpu()
        self.counts[key][bucket] += 1

    def means(self) -> dict[str, torch.Tensor]:
        """Per part (buckets, units, units); a bucket no call fell in takes the nearest that had calls."""
        result = {}
        for key, sums in self.sums.items():
            counts = self.counts[key]
            seen = counts.nonzero().flatten()
            if seen.numel() == 0:
                continue
            nearest = seen[(torch.arange(self.buckets)[:, None] - seen[None]).abs().argmin(1)]
            result[key] = sums[nearest] / counts[nearest, None, None]
        return result


def add_contributions(scores: DyDiTScores, bucket: int, parts: list, linear: nn.Linear, x: torch.Tensor) -> None:
    """The Gram matrix of the heads' and groups' contributions through the output projection `linear`,
    over this call's tokens `x` (in chunks, to bound the memory), added to `scores` for each of `parts`
    ((part, input offset) pairs: `width.Part`s and where their features start in `linear`'s input)."""
    flat = x.detach().reshape(-1, x.shape[-1]).float()
    weight = linear.weight.detach().float()
    for part, offset in parts:
        gram = flat.new_zeros(len(part.units), len(part.units))
        columns = [offset + features.to(x.device) for features in part.units]
        for chunk in flat.split(_SCORE_CHUNK):
            contributions = torch.stack([chunk[:, unit] @ weight[:, unit].T for unit in columns])
            gram += torch.einsum("hto,gto->hg", contributions, contributions)
        scores.add(part.key, bucket, gram / flat.shape[0])


def select_units(gram: torch.Tensor, keep: int) -> torch.Tensor:
    """The `keep` units (sorted) whose dropped complement D has the least expected squared norm of
    its summed contribution, 1_D^T G 1_D: every complement when there are few (at most
    `_EXHAUSTIVE`), else greedily, one unit at a time."""
    units = gram.shape[0]
    if math.comb(units, units - keep) <= _EXHAUSTIVE:
        complements = torch.tensor(list(itertools.combinations(range(units), units - keep)), dtype=torch.long)
        masks = torch.zeros(len(complements), units).scatter_(1, complements.view(len(complements), -1), 1.0)
        best = torch.einsum("ch,hg,cg->c", masks, gram.float(), masks).argmin()
        return (masks[best] == 0).nonzero().flatten()
    dropped = torch.zeros(units, dtype=torch.bool)
    for _ in range(units - keep):
        # 1_{D+h}^T G 1_{D+h} - 1_D^T G 1_D = G[h, h] + 2 sum_{g in D} G[h, g]
        cost = gram.diagonal() + 2 * gram[:, dropped].sum(1)
        cost[dropped] = float("inf")
        dropped[int(cost.argmin())] = True
    return (~dropped).nonzero().flatten()


def calibrate(pipe: Any, config: DyDiTConfig, *, apply: Callable[..., Any], path: str | None,
              call_kwargs: dict[str, Any]) -> DyDiTConfig:
    """DyDiT's entry of `dit_accel.calibrate`: every head's and channel group's mean contribution to its
    block's output, per bucket of steps, over one run of `pipe(**call_kwargs)` with every unit kept
    (under `apply`, `dit_accel.apply`), written to `path`; returns `config` reading that file."""
    if path is None:
        raise ConfigError("calibrate(pipe, DyDiTConfig(...), path=...): name the safetensors file to write")
    probe = dataclasses.replace(DyDiTConfig.keep_all(), buckets=config.buckets)
    with apply(pipe, probe) as handle:
        techniques = handle.techniques
        if len(techniques) != 1:
            raise ConfigError(f"DyDiT calibration scores one transformer; this pipeline has {len(techniques)} "
                              "(apply it to each transformer on its own)")
        (technique,) = techniques
        scores = technique.start_scoring()
        pipe(**call_kwargs)
    means = scores.means()
    if not means:
        raise RuntimeError("DyDiT calibration saw no transformer call")
    prompts = call_kwargs.get("prompt")
    details = {"buckets": config.buckets, "num_inference_steps": call_kwargs.get("num_inference_steps"),
               "prompts": len(prompts) if isinstance(prompts, list) else 1}
    save_calibration(path, means, technique.session.transformer, details)
    return dataclasses.replace(config, calibration=str(path))
