"""DyDiT dynamic width (TDW) and token skipping (SDT), training-free (after DyDiT, arXiv 2410.03456,
and DyDiT++, arXiv 2504.06803, which fine-tune routers; here the choices come from calibration).

TDW (stage 4): the steps fall into `buckets` equal parts; in each, every block keeps its most
important attention heads and MLP channel groups (one group per head, as in DyDiT), fewer at the
noisy steps. The block really runs narrower: the q/k/v rows and output columns of the kept heads and
the MLP rows and columns of the kept groups are index-selected once per bucket (only the running
bucket's slices are held) and the model's own weights are never written. Where a normalisation spans
all heads (Wan's `norm_q`/`norm_k`), q and k are projected at full width, normalised, then sliced.
The widths depend only on the step, so CFG branches and batches run the same heads.

Which heads and groups: a calibration file (`dit_accel.calibrate` / `dit-accel calibrate`: per
bucket, the Gram matrix of the heads' (groups') contributions to the block output, x_h W_out[:, h],
over the calibration prompts; made for one checkpoint and refused for any other) from which the
units whose dropping changes the block output least are dropped greedily, cancellations between
units included; or without one a data-free default: units ranked by the product of the norms of
their input rows and output columns, the same at every step.

SDT: in each block with a token-wise MLP, only the `token_ratio` of tokens per sample whose MLP input
changed most since they were last computed run the MLP (gathered, run, scattered back: static
shapes); the others reuse their cached MLP output. The first call of every branch computes them all.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook
from torch import nn

from ..config import AccelerationConfig, ConfigError, Stage, param
from ..metrics.flops import UnitWidth
from ..models.base import ChannelSlices, HeadSlices, gather_tokens, scatter_tokens
from ..models.identity import identity_mismatch, model_identity
from ..runtime.call_state import CallState
from ..runtime.registry import register_technique
from ..runtime.technique import Technique

#: safetensors metadata "format" of a calibration file
CALIBRATION_FORMAT = "dit-accel dydit calibration 2"
#: tokens scored at once while calibrating
_SCORE_CHUNK = 1024
#: unit selections searched exhaustively up to this many candidate sets
_EXHAUSTIVE = 4096


@dataclass(frozen=True)
class DyDiTConfig(AccelerationConfig):
    """Timestep-wise dynamic width (TDW) and spatial dynamic tokens (SDT)."""

    width_ratio: float = param(0.7, "fraction of attention heads and MLP channel groups kept in the noisiest bucket "
                                    "of steps (rising linearly to max_width_ratio in the cleanest); sliced, not masked",
                               low=0.0, high=1.0, low_open=True)
    max_width_ratio: float = param(1.0, "fraction of heads and channel groups kept in the cleanest bucket",
                                   low=0.0, high=1.0, low_open=True)
    buckets: int = param(4, "equal parts of the steps, each with its own heads and channel groups", low=1, high=1000)
    token_ratio: float = param(1.0, "fraction of tokens per sample through each MLP; the others reuse their MLP "
                                    "output from when they were last computed", low=0.0, high=1.0, low_open=True)
    calibration: str | None = param(None, "safetensors file of head and group scores from dit_accel.calibrate "
                                          "(`dit-accel calibrate`); None ranks them by weight norms")

    name = "dydit"
    #: measured on the reference image model (8 captions, CFG 4, 20 steps, calibrated): MLP token
    #: skipping costs far less than width there (4 heads a block: one head is a quarter of the width)
    presets = {
        "quality": dict(width_ratio=1.0, max_width_ratio=1.0, token_ratio=0.5),  # 43.7 dB, FLOPs 0.79
        "balanced": dict(width_ratio=1.0, max_width_ratio=1.0, token_ratio=0.25),  # 35.9 dB, FLOPs 0.69
        "fast": dict(width_ratio=0.75, max_width_ratio=1.0, token_ratio=0.25),  # 28.8 dB, FLOPs 0.61
    }

    def validate(self) -> None:
        if self.max_width_ratio < self.width_ratio:
            raise ConfigError(f"DyDiTConfig.max_width_ratio ({self.max_width_ratio}) must be >= width_ratio "
                              f"({self.width_ratio})")
        if self.calibration is not None and not Path(self.calibration).is_file():
            raise ConfigError(f"DyDiTConfig.calibration: no such file {self.calibration!r}; make one with "
                              "dit_accel.calibrate(pipe, DyDiTConfig(), path=...) or `dit-accel calibrate`")

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.WIDTH})

    def width_at(self, bucket: int) -> float:
        """The fraction of heads and groups kept in `bucket` (0: the noisiest steps)."""
        if self.buckets == 1:
            return self.width_ratio
        return self.width_ratio + (self.max_width_ratio - self.width_ratio) * bucket / (self.buckets - 1)

    @classmethod
    def keep_all(cls) -> "DyDiTConfig":
        """Every head, group and token: the slicing, the head count and the token gather/scatter all run."""
        return cls(width_ratio=1.0, max_width_ratio=1.0, token_ratio=1.0)


def kept_count(ratio: float, units: int) -> int:
    return max(1, min(units, round(ratio * units)))


def _bucket_of(call_state: CallState, buckets: int) -> int:
    """Equal parts of the run's steps; a run of unknown length counts as its noisiest part."""
    steps = call_state.ctx.num_steps
    return 0 if not steps else min(buckets - 1, call_state.ctx.step_index * buckets // steps)


def _group_channels(hidden: int, groups: int) -> list[torch.Tensor]:
    return list(torch.arange(hidden).tensor_split(groups))


# -- what one block can narrow -----------------------------------------------------------------------
@dataclass
class _Part:
    """Heads of one attention or channel groups of one MLP: the features each unit owns."""

    key: str
    block: int
    units: list[torch.Tensor]
    #: linears whose output features are these units' (for a gated MLP: both halves)
    rows: list[nn.Linear]
    columns: list[tuple[nn.Linear, int]]
    norms: list[nn.Module]
    gated_hidden: int = 0
    attention: nn.Module | None = None

    @property
    def width(self) -> int:
        return sum(len(u) for u in self.units)

    def features(self, kept: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.units[int(u)] for u in kept])

    def weight_gram(self) -> torch.Tensor:
        """The data-free stand-in for a calibration: a diagonal Gram matrix of each unit's mean row
        norm times its mean column norm, squared (units assumed uncorrelated)."""
        scores = []
        for features in self.units:
            rows = [linear.weight.detach()[features].float().norm() for linear in self.rows]
            columns = [linear.weight.detach()[:, offset + features].float().norm() for linear, offset in self.columns]
            scores.append((torch.stack(rows).mean() if rows else torch.tensor(1.0)) * torch.stack(columns).mean())
        return torch.diag(torch.stack(scores) ** 2)


def _parts_of(block: int, attentions: tuple[HeadSlices, ...], mlp: ChannelSlices | None) -> list[_Part]:
    parts = []
    for a, heads in enumerate(attentions):
        units = [torch.arange(h * heads.head_dim, (h + 1) * heads.head_dim) for h in range(heads.heads)]
        parts.append(_Part(f"block{block}.attention{a}", block, units, list(heads.rows), list(heads.columns),
                           list(heads.norms), attention=heads.attention))
    if mlp is not None:
        groups = _group_channels(mlp.hidden, attentions[0].heads if attentions else 1)
        parts.append(_Part(f"block{block}.mlp", block, groups, list(mlp.rows), list(mlp.columns), [],
                           gated_hidden=mlp.hidden if mlp.gated else 0))
    return parts


# -- calibration files -------------------------------------------------------------------------------
def save_calibration(path: str | Path, scores: dict[str, torch.Tensor], transformer: nn.Module,
                     details: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    metadata = {"format": CALIBRATION_FORMAT, **model_identity(transformer), "details": json.dumps(details)}
    save_file({k: v.float().contiguous() for k, v in scores.items()}, str(path), metadata=metadata)


def load_calibration(path: str | Path, transformer: nn.Module) -> dict[str, torch.Tensor]:
    """Per part (buckets, units) scores, refused with a `ConfigError` when made for another model."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            metadata = file.metadata() or {}
            scores = {key: file.get_tensor(key) for key in file.keys()}
    except Exception as error:  # safetensors raises its own error types for a file that is not one
        raise ConfigError(f"DyDiT calibration {str(path)!r} is not a safetensors file: {error}") from error
    if metadata.get("format") != CALIBRATION_FORMAT:
        raise ConfigError(f"DyDiT calibration {str(path)!r} is not a dit-accel DyDiT calibration file")
    mismatch = identity_mismatch(metadata, transformer)
    if mismatch is not None:
        raise ConfigError(f"DyDiT calibration {str(path)!r} does not fit this transformer: {mismatch}")
    return scores


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


# -- hooks -------------------------------------------------------------------------------------------
class _SlicedLinear(ModelHook):
    """A linear that runs on the running bucket's rows or columns of its weight."""

    def __init__(self, technique: "DyDiT", linear: nn.Linear):
        super().__init__()
        self.technique, self.linear = technique, linear

    def new_forward(self, module, x):
        if self.technique.session.call_state is None:
            return self.fn_ref.original_forward(x)
        weight, bias = self.technique.sliced(module)
        if self.technique.scores is not None:
            self.technique.score(module, x)
        return F.linear(x, weight, bias)


class _SlicedNorm(ModelHook):
    """A normalisation over all heads: normalise at full width, keep the running heads' features."""

    def __init__(self, technique: "DyDiT", part: _Part):
        super().__init__()
        self.technique, self.part = technique, part

    def post_forward(self, module, output):
        if self.technique.session.call_state is None:
            return output
        return output.index_select(-1, self.technique.features(self.part, output.device))


class _Heads(ModelHook):
    """The attention's processor reshapes by `heads`: the running bucket's count while it runs."""

    def __init__(self, technique: "DyDiT", part: _Part):
        super().__init__()
        self.technique, self.part = technique, part

    def new_forward(self, module, *args, **kwargs):
        if self.technique.session.call_state is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        full = module.heads
        module.heads = len(self.technique.kept(self.part))
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            module.heads = full


class _TokenSkip(ModelHook):
    """The MLP runs on the tokens that changed most; the others keep their cached output."""

    def __init__(self, technique: "DyDiT", block: int, unit: str):
        super().__init__()
        self.technique, self.block, self.unit = technique, block, unit

    def new_forward(self, module, hidden, *args, **kwargs):
        if self.technique.session.call_state is None:
            return self.fn_ref.original_forward(hidden, *args, **kwargs)
        return self.technique.run_mlp(self.block, self.unit, lambda x: self.fn_ref.original_forward(x, *args, **kwargs),
                                      hidden)


@register_technique(DyDiTConfig, "DyDiT: attention heads and MLP channel groups per step bucket, MLP tokens")
class DyDiT(Technique):
    def __init__(self, config: DyDiTConfig, session):
        super().__init__(config, session)
        self._parts: list[_Part] = []
        #: block -> (its token-wise MLP, the block's unit holding it)
        self._mlps: dict[int, tuple[nn.Module, str]] = {}
        for index, block in enumerate(self.adapter.blocks()):
            layout = self.adapter.width_layout(block)
            self._parts.extend(_parts_of(index, layout.attentions, layout.mlp))
            if layout.mlp is not None and layout.mlp.module is not None:
                self._mlps[index] = (layout.mlp.module, _unit_name(block, layout.mlp.module))
        self._check_linears()
        grams = self._grams()
        #: per bucket, per part key: the kept units, sorted
        self._kept = [{part.key: select_units(grams[part.key][bucket], kept_count(config.width_at(bucket),
                                                                                 len(part.units)))
                       for part in self._parts} for bucket in range(config.buckets)]
        self._linear_parts = self._index_linears()
        blocks = self.adapter.blocks()
        names = {module: (index, name) for index, block in enumerate(blocks) for name, module in block.named_modules()}
        #: (parent, attribute) of every sliced linear, to notice a layer swapped in after apply (LoRA)
        self._places = []
        for linear in self._linear_parts:
            index, name = names[linear]
            parent, _, attribute = name.rpartition(".")
            self._places.append((blocks[index].get_submodule(parent), attribute, linear))
        self._widths = [self._ledger_widths(bucket, names) for bucket in range(config.buckets)]
        self._bucket = 0
        #: the running bucket's sliced (weight, bias) per linear, and feature indices per (part, device)
        self._sliced: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._features: dict[tuple[str, torch.device], torch.Tensor] = {}
        #: per (branch, block): (MLP input, MLP output) when each token was last computed
        self._mlp_cache: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        #: block -> fraction of its MLP tokens computed this call
        self._mlp_fractions: dict[int, float] = {}
        #: set by `dit_accel.calibrate` while it scores heads and groups
        self.scores: DyDiTScores | None = None

    # -- setup -------------------------------------------------------------------------------------
    def _check_linears(self) -> None:
        for part in self._parts:
            for linear in part.rows + [linear for linear, _ in part.columns]:
                if type(linear) is not nn.Linear:
                    raise ConfigError(f"DyDiTConfig slices nn.Linear weights; {part.key} has a "
                                      f"{type(linear).__name__} (a LoRA layer? fuse it first: pipe.fuse_lora())")

    def _grams(self) -> dict[str, torch.Tensor]:
        """Per part (buckets, units, units) Gram matrices: from the calibration file (its buckets mapped
        onto the config's by their middle step), else from the weights."""
        buckets = self.config.buckets
        if self.config.calibration is None:
            return {part.key: part.weight_gram().expand(buckets, -1, -1) for part in self._parts}
        grams = load_calibration(self.config.calibration, self.session.transformer)
        centres = (torch.arange(buckets) + 0.5) / buckets
        mapped = {}
        for part in self._parts:
            units = len(part.units)
            table = grams.get(part.key)
            if table is None or tuple(table.shape[1:]) != (units, units):
                raise ConfigError(f"DyDiT calibration {self.config.calibration!r} has no scores for the "
                                  f"{units} units of {part.key}")
            mapped[part.key] = table[(centres * table.shape[0]).long().clamp(max=table.shape[0] - 1)]
        return mapped

    def _index_linears(self) -> dict[nn.Linear, tuple[str, list[tuple[_Part, int]]]]:
        """Each sliced linear: "rows" or "columns", and the parts (with input offsets) it is sliced by."""
        linears: dict[nn.Linear, tuple[str, list[tuple[_Part, int]]]] = {}
        for part in self._parts:
            for linear in part.rows:
                linears[linear] = ("rows", [(part, 0)])
            for linear, offset in part.columns:
                linears.setdefault(linear, ("columns", []))[1].append((part, offset))
        for linear, (kind, parts) in linears.items():
            if kind == "columns" and sum(part.width for part, _ in parts) != linear.in_features:
                raise ConfigError(f"DyDiT: the adapter's width layout does not cover the {linear.in_features} "
                                  f"inputs of {parts[0][0].key}'s output projection")
        return linears

    def _ledger_widths(self, bucket: int, names: dict[nn.Module, tuple[int, str]]
                       ) -> dict[tuple[int, str], UnitWidth]:
        """What the ledger records for each narrowed unit in `bucket`: sliced features and kept heads
        (`names`: every module of the blocks -> (block index, qualified name in its block))."""
        kept = self._kept[bucket]

        def width(part: _Part) -> int:
            return sum(len(part.units[int(u)]) for u in kept[part.key])

        features: dict[tuple[int, str], list[tuple[str, int, int]]] = {}
        for linear, (kind, parts) in self._linear_parts.items():
            index, name = names[linear]
            if kind == "rows":
                part = parts[0][0]
                feature = (name, linear.in_features, width(part) * (2 if part.gated_hidden else 1))
            else:
                feature = (name, sum(width(part) for part, _ in parts), linear.out_features)
            features.setdefault((index, name.split(".")[0]), []).append(feature)
        heads = {}
        for part in self._parts:
            if part.attention is not None:
                index, name = names[part.attention]
                heads[(index, name.split(".")[0])] = len(kept[part.key])
        return {unit: UnitWidth(tuple(features.get(unit, ())), heads.get(unit)) for unit in set(features) | set(heads)}

    def attach(self) -> None:
        hooks = self.session.hooks
        for linear in self._linear_parts:
            hooks.add(linear, _SlicedLinear(self, linear), "dydit.slice")
        for part in self._parts:
            for norm in part.norms:
                hooks.add(norm, _SlicedNorm(self, part), "dydit.norm")
            if part.attention is not None:
                hooks.add(part.attention, _Heads(self, part), "dydit.heads")
        # at token_ratio 1 too: every token is gathered, run and scattered, the path SDT takes
        for index, (module, unit) in self._mlps.items():
            hooks.add(module, _TokenSkip(self, index, unit), "dydit.tokens")

    # -- per call ----------------------------------------------------------------------------------
    def begin_call(self, call_state: CallState) -> None:
        for parent, name, linear in self._places:
            if getattr(parent, name) is not linear:
                raise ConfigError(f"DyDiTConfig: {type(getattr(parent, name)).__name__} replaced a linear layer it "
                                  "slices after dit_accel.apply() (a LoRA adapter?): fuse it (pipe.fuse_lora()) "
                                  "or remove the handle and apply again")
        bucket = _bucket_of(call_state, self.config.buckets)
        if bucket != self._bucket:
            self._bucket = bucket
            self._sliced.clear()
            self._features.clear()
        self._check_processors()
        call_state.widths.update(self._widths[bucket])
        self._mlp_fractions = {}

    def _check_processors(self) -> None:
        """A processor with weights of its own over every head (IP-Adapter's `to_k_ip`, whose output it adds
        in head space) cannot run on fewer heads: refused before any block runs."""
        for part in self._parts:
            processor = getattr(part.attention, "processor", None)
            if isinstance(processor, nn.Module) and any(True for _ in processor.parameters()) \
                    and any(len(kept[part.key]) < len(part.units) for kept in self._kept):
                raise ConfigError(f"DyDiTConfig narrows the heads of {part.key}, whose processor "
                                  f"{type(processor).__name__} has weights of its own over every head (an "
                                  "IP-Adapter?): keep every head (width_ratio=1; token skipping still works) or "
                                  "unload it")

    def end_run(self) -> None:
        self._sliced.clear()
        self._features.clear()
        self._mlp_cache.clear()

    def selection(self, bucket: int) -> dict[str, torch.Tensor]:
        """The units kept in `bucket`: "block{i}.attention{a}" -> heads, "block{i}.mlp" -> channel groups."""
        return dict(self._kept[bucket])

    def kept(self, part: _Part) -> torch.Tensor:
        return self._kept[self._bucket][part.key]

    def features(self, part: _Part, device: torch.device) -> torch.Tensor:
        """The running bucket's features of `part`."""
        key = (part.key, device)
        if key not in self._features:
            self._features[key] = part.features(self.kept(part)).to(device)
        return self._features[key]

    def sliced(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The running bucket's (weight, bias) of `linear`, index-selected once per bucket."""
        held = self._sliced.get(linear)
        weight = linear.weight
        if held is None or held[0].device != weight.device or held[0].dtype != weight.dtype:
            kind, parts = self._linear_parts[linear]
            if kind == "rows":
                part = parts[0][0]
                rows = self.features(part, weight.device)
                if part.gated_hidden:  # a gated activation's two halves
                    rows = torch.cat([rows, rows + part.gated_hidden])
                bias = None if linear.bias is None else linear.bias.index_select(0, rows)
                held = (weight.index_select(0, rows), bias)
            else:
                columns = torch.cat([offset + self.features(part, weight.device) for part, offset in parts])
                held = (weight.index_select(1, columns), linear.bias)
            self._sliced[linear] = held
        return held

    def run_mlp(self, block: int, unit: str, forward, hidden: torch.Tensor) -> torch.Tensor:
        """SDT: the MLP on the tokens per sample whose input changed most since last computed."""
        call_state = self.session.call_state
        batch, tokens = hidden.shape[:2]
        key = (call_state.ctx.slot, block)
        cached = self._mlp_cache.get(key)
        if cached is not None and cached[0].shape != hidden.shape:  # another token count: start again
            cached = None
        if cached is None:
            index = torch.arange(tokens, device=hidden.device)
        else:
            change = (hidden - cached[0]).float().pow(2).sum(-1)
            index = change.topk(math.ceil(self.config.token_ratio * tokens), dim=1).indices.sort(dim=1).values
            call_state.record_overhead("dydit token change", 3.0 * batch * tokens * hidden.shape[-1], tokens)
        fraction = index.shape[-1] / tokens
        width = call_state.widths.get((block, unit), UnitWidth())
        call_state.widths[(block, unit)] = dataclasses.replace(width, token_fraction=fraction)
        self._mlp_fractions[block] = fraction
        inputs = gather_tokens(hidden, index)
        computed = forward(inputs)
        if cached is None:
            output = scatter_tokens(computed.new_empty(*hidden.shape[:2], computed.shape[-1]), index, computed)
        else:
            hidden = scatter_tokens(cached[0], index, inputs)
            output = scatter_tokens(cached[1], index, computed)
        if self.config.token_ratio < 1.0:
            self._mlp_cache[key] = (hidden, output)
        return output

    # -- calibration -------------------------------------------------------------------------------
    def score(self, linear: nn.Linear, x: torch.Tensor) -> None:
        """Calibrating: the Gram matrix of the heads' and groups' contributions through this output
        projection, over this call's tokens (in chunks, to bound the memory)."""
        kind, parts = self._linear_parts[linear]
        if kind != "columns":
            return
        bucket = _bucket_of(self.session.call_state, self.scores.buckets)
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        weight = linear.weight.detach().float()
        for part, offset in parts:
            gram = flat.new_zeros(len(part.units), len(part.units))
            columns = [offset + features.to(x.device) for features in part.units]
            for chunk in flat.split(_SCORE_CHUNK):
                contributions = torch.stack([chunk[:, unit] @ weight[:, unit].T for unit in columns])
                gram += torch.einsum("hto,gto->hg", contributions, contributions)
            self.scores.add(part.key, bucket, gram / flat.shape[0])

    # -- report ------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        tensors = [t for pair in self._mlp_cache.values() for t in pair]
        tensors += [t for weight, bias in self._sliced.values() for t in (weight, bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def call_stats(self, call_state: CallState) -> dict:
        """The bucket, the fraction of heads and of MLP channel groups kept, and of MLP tokens computed:
        on average, and per block for the UI's pictures."""
        kept = self._kept[self._bucket]
        widths: dict[int, list[float]] = {}
        for part in self._parts:
            widths.setdefault(part.block, []).append(len(kept[part.key]) / len(part.units))
        heads = [len(kept[p.key]) / len(p.units) for p in self._parts if p.attention is not None]
        groups = [len(kept[p.key]) / len(p.units) for p in self._parts if p.attention is None]
        stats = {"dydit_bucket": self._bucket, "dydit_heads": sum(heads) / max(1, len(heads)),
                 "dydit_groups": sum(groups) / max(1, len(groups)),
                 "dydit_width_by_block": {b: sum(w) / len(w) for b, w in sorted(widths.items())}}
        if self._mlp_fractions:
            fractions = self._mlp_fractions
            stats["dydit_mlp_tokens"] = sum(fractions.values()) / len(fractions)
            stats["dydit_mlp_tokens_by_block"] = dict(sorted(fractions.items()))
        return stats


def _unit_name(block: nn.Module, module: nn.Module) -> str:
    """The block's direct child that holds `module` (the ledger's unit)."""
    return next(name for name, child in block.named_modules() if child is module).split(".")[0]
