"""The DyDiT technique: per call, the kept heads and channel groups of every block (a `Selection`:
from the call's bucket of steps, or from learned routers at its timestep; `width.py`'s hooks run
them), the MLP tokens (`tokens.py`'s cache, or `routers.py`'s token routers), the scoring hook a
calibration run uses (`calibration.py`), training the routers (`routers.py`), and what the ledger
and `report()` get.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...config import ConfigError
from ...metrics.flops import UnitWidth
from ...models.identity import model_identity
from ...runtime.call_state import CallState
from ...runtime.estimate import CallShapes
from ...runtime.registry import register_technique
from ...runtime.stats import Stat, StatKind
from ...runtime.storage import stored_bytes
from ...runtime.technique import Technique
from ...runtime.training import Trainable, TrainingSettings
from .calibration import DyDiTScores, add_contributions, calibrate, load_calibration, select_units
from .config import DyDiTConfig, bucket_of, kept_count, search_space
from .routers import GRID, RouterTraining, RoutedTokens, load_routers
from .tokens import SKETCH_DIM, MLPTokens, SkipTokens, TokenMLP, TokenRunner
from .width import HeadCount, Part, SlicedLinear, SlicedNorm, parts_of


@dataclass(frozen=True)
class Selection:
    """The heads and groups a call keeps: part key -> kept units (sorted), the parts that keep every unit
    (their linears run on their own weights) and what the ledger records of each narrowed unit."""

    kept: dict[str, torch.Tensor]
    whole: frozenset[str]
    widths: dict[tuple[int, str], UnitWidth]


@register_technique(DyDiTConfig, "DyDiT: attention heads and MLP channel groups per step bucket, MLP tokens",
                    search_space=search_space, calibrate=calibrate)
class DyDiT(Technique):
    stats = (Stat("dydit_bucket", StatKind.DETAIL), Stat("dydit_heads", StatKind.VALUE),
             Stat("dydit_groups", StatKind.VALUE),
             Stat("dydit_width_by_block", StatKind.BLOCK_FRACTION, "DyDiT width (heads and channel groups kept)"),
             Stat("dydit_mlp_tokens", StatKind.VALUE),
             Stat("dydit_mlp_tokens_by_block", StatKind.BLOCK_FRACTION, "DyDiT MLP tokens computed"))

    trains = ("timestep-wise routers over heads and MLP channel groups, a token router per MLP (DyDiT's), and a "
              "low-rank correction per output linear")

    def __init__(self, config: DyDiTConfig, session):
        super().__init__(config, session)
        self.parts: list[Part] = []
        #: block -> its token-wise MLP, and the width of that MLP's input
        self._mlps: dict[int, TokenMLP] = {}
        self._mlp_inputs: dict[int, int] = {}
        for index, block in enumerate(self.adapter.blocks()):
            layout = self.adapter.width_layout(block)
            self.parts.extend(parts_of(index, layout.attentions, layout.mlp))
            if layout.mlp is not None and layout.mlp.module is not None:
                self._mlps[index] = TokenMLP.of(self.adapter, block, layout.mlp)
                self._mlp_inputs[index] = layout.mlp.rows[0].in_features
        self._check_linears()
        self._linear_parts = self._index_linears()
        blocks = self.adapter.blocks()
        #: every module of the blocks -> (block index, qualified name in its block)
        self._names = {module: (index, name) for index, block in enumerate(blocks)
                       for name, module in block.named_modules()}
        #: (parent, attribute) of every sliced linear, to notice a layer swapped in after apply (LoRA)
        self._places = []
        for linear in self._linear_parts:
            index, name = self._names[linear]
            parent, _, attribute = name.rpartition(".")
            self._places.append((blocks[index].get_submodule(parent), attribute, linear))
        #: every distinct selection made so far, by its kept units (a handful per run)
        self._selections: dict[tuple, Selection] = {}
        self._full = self._selection_of({part.key: torch.arange(len(part.units)) for part in self.parts})
        #: learned routers (`config.routers`), their corrections by output linear, and their selection at
        #: each timestep seen this run
        self._routers = None
        self._corrections: dict[nn.Linear, nn.Module] = {}
        self._by_timestep: dict[float, Selection] = {}
        #: per bucket of steps, without routers
        self._buckets: list[Selection] = []
        #: every selection a run may make: the buckets', or the routers' over a grid of timesteps spanning
        #: those they were trained on (for the memory estimate and the processor check)
        self._candidates: list[Selection] = []
        if config.routers is not None:
            outputs = list(self.unit_of_input())
            self._routers, timesteps = load_routers(config.routers, session.transformer, config,
                                                    [(part.key, len(part.units)) for part in self.parts],
                                                    [(linear.in_features, linear.out_features) for linear in outputs])
            self._corrections = dict(zip(outputs, self._routers.corrections))
            self._candidates = [self._selection_of(self._routers.kept(float(t)))
                                for t in torch.linspace(*timesteps, GRID)]
        else:
            grams = self._grams()
            self._buckets = [self._selection_of({
                part.key: select_units(grams[part.key][bucket], kept_count(config.width_at(bucket), len(part.units)))
                for part in self.parts}) for bucket in range(config.buckets)]
            self._candidates = self._buckets
        self._bucket = 0
        #: the running call's selection, its sliced (weight, bias) per linear, and feature indices per
        #: (part, device)
        self._selection = self._buckets[0] if self._buckets else self._full
        self._sliced: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor | None]] = {}
        #: the running call's (down, up) weights of each output linear's correction, down sliced as its input
        self._corrections_sliced: dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]] = {}
        self._features: dict[tuple[str, torch.device], torch.Tensor] = {}
        #: how the token-wise MLPs run: the learned token routers, or the token cache
        self.mlp_tokens: TokenRunner = (
            RoutedTokens(self._routers, config.token_ratio) if self._routers is not None and self._routers.tokens
            else MLPTokens(config.token_ratio, config.token_cache, sorted(self._mlps)))
        #: while a fine-tune trains routers (`start_training`), and the token runner it stands in for
        self._training: RouterTraining | None = None
        self._untrained_tokens: TokenRunner | None = None
        #: while a calibration run scores heads and groups (`start_scoring`)
        self.scores: DyDiTScores | None = None

    # -- setup -------------------------------------------------------------------------------------
    def _check_linears(self) -> None:
        for part in self.parts:
            for linear in part.rows + [linear for linear, _ in part.columns]:
                if type(linear) is not nn.Linear:
                    raise ConfigError(f"DyDiTConfig slices nn.Linear weights; {part.key} has a "
                                      f"{type(linear).__name__} (a LoRA layer? fuse it first: pipe.fuse_lora())")

    def _grams(self) -> dict[str, torch.Tensor]:
        """Per part (buckets, units, units) Gram matrices: from the calibration file (its buckets mapped
        onto the config's by their middle step), else from the weights."""
        buckets = self.config.buckets
        if self.config.calibration is None:
            return {part.key: part.weight_gram().expand(buckets, -1, -1) for part in self.parts}
        grams = load_calibration(self.config.calibration, self.session.transformer)
        centres = (torch.arange(buckets) + 0.5) / buckets
        mapped = {}
        for part in self.parts:
            units = len(part.units)
            table = grams.get(part.key)
            if table is None or tuple(table.shape[1:]) != (units, units):
                raise ConfigError(f"DyDiT calibration {self.config.calibration!r} has no scores for the "
                                  f"{units} units of {part.key}")
            mapped[part.key] = table[(centres * table.shape[0]).long().clamp(max=table.shape[0] - 1)]
        return mapped

    def _index_linears(self) -> dict[nn.Linear, tuple[str, list[tuple[Part, int]]]]:
        """Each sliced linear: "rows" or "columns", and the parts (with input offsets) it is sliced by."""
        linears: dict[nn.Linear, tuple[str, list[tuple[Part, int]]]] = {}
        for part in self.parts:
            for linear in part.rows:
                linears[linear] = ("rows", [(part, 0)])
            for linear, offset in part.columns:
                linears.setdefault(linear, ("columns", []))[1].append((part, offset))
        for linear, (kind, parts) in linears.items():
            if kind == "columns" and sum(part.width for part, _ in parts) != linear.in_features:
                raise ConfigError(f"DyDiT: the adapter's width layout does not cover the {linear.in_features} "
                                  f"inputs of {parts[0][0].key}'s output projection")
        return linears

    @staticmethod
    def _kept_features(kept: dict[str, torch.Tensor], part: Part) -> int:
        return sum(len(part.units[int(u)]) for u in kept[part.key])

    def _selection_of(self, kept: dict[str, torch.Tensor]) -> Selection:
        """The selection keeping `kept` (part key -> sorted units), made once per distinct choice."""
        key = tuple(tuple(kept[part.key].tolist()) for part in self.parts)
        if key not in self._selections:
            whole = frozenset(part.key for part in self.parts if len(kept[part.key]) == len(part.units))
            self._selections[key] = Selection(kept, whole, self._ledger_widths(kept))
        return self._selections[key]

    def _ledger_widths(self, kept: dict[str, torch.Tensor]) -> dict[tuple[int, str], UnitWidth]:
        """What the ledger records for each narrowed unit when `kept` run: sliced features and kept heads."""
        features: dict[tuple[int, str], list[tuple[str, int, int]]] = {}
        for linear, (kind, parts) in self._linear_parts.items():
            index, name = self._names[linear]
            if kind == "rows":
                part = parts[0][0]
                rows = self._kept_features(kept, part) * (2 if part.gated_hidden else 1)
                feature = (name, linear.in_features, rows)
            else:
                feature = (name, sum(self._kept_features(kept, part) for part, _ in parts), linear.out_features)
            features.setdefault((index, name.split(".")[0]), []).append(feature)
        heads = {}
        for part in self.parts:
            if part.attention is not None:
                index, name = self._names[part.attention]
                heads[(index, name.split(".")[0])] = len(kept[part.key])
        return {unit: UnitWidth(tuple(features.get(unit, ())), heads.get(unit)) for unit in set(features) | set(heads)}

    def attach(self) -> None:
        hooks = self.session.hooks
        for linear in self._linear_parts:
            hooks.add(linear, SlicedLinear(self, linear), "dydit.slice")
        for part in self.parts:
            for norm in part.norms:
                hooks.add(norm, SlicedNorm(self, part), "dydit.norm")
            if part.attention is not None:
                hooks.add(part.attention, HeadCount(self, part), "dydit.heads")
        if self.config.token_ratio < 1.0:  # at 1 every token runs: no gather, scatter or cache
            for index, mlp in self._mlps.items():
                hooks.add(mlp.module, SkipTokens(self, index, mlp.unit), "dydit.tokens")

    # -- per call ----------------------------------------------------------------------------------
    def begin_call(self, call_state: CallState) -> None:
        for parent, name, linear in self._places:
            if getattr(parent, name) is not linear:
                raise ConfigError(f"DyDiTConfig: {type(getattr(parent, name)).__name__} replaced a linear layer it "
                                  "slices after dit_accel.apply() (a LoRA adapter?): fuse it (pipe.fuse_lora()) "
                                  "or remove the handle and apply again")
        self._bucket = bucket_of(call_state, self.config.buckets)
        if self._training is not None:  # full width: the routers' gates drop the units
            selection, widths = self._full, self._ledger_widths(self._training.begin_call(call_state))
        else:
            selection = self._routed(call_state.ctx.timestep) if self._routers is not None \
                else self._buckets[self._bucket]
            widths = selection.widths
        if selection is not self._selection:
            self._selection = selection
            self._sliced.clear()
            self._corrections_sliced.clear()
            self._features.clear()
        self._prepare()
        self._check_processors()
        call_state.widths.update(widths)
        self.mlp_tokens.begin_call(call_state)

    def _routed(self, timestep: float) -> Selection:
        """The routers' selection at `timestep` (evaluated on the CPU, once per timestep and run)."""
        if timestep not in self._by_timestep:
            self._by_timestep[timestep] = self._selection_of(self._routers.kept(timestep))
        return self._by_timestep[timestep]

    def _check_processors(self) -> None:
        """A processor with weights of its own over every head (IP-Adapter's `to_k_ip`, whose output it adds
        in head space) cannot run on fewer heads: refused before any block runs."""
        for part in self.parts:
            processor = getattr(part.attention, "processor", None)
            if isinstance(processor, nn.Module) and any(True for _ in processor.parameters()) \
                    and any(part.key not in selection.whole for selection in self._candidates):
                raise ConfigError(f"DyDiTConfig narrows the heads of {part.key}, whose processor "
                                  f"{type(processor).__name__} has weights of its own over every head (an "
                                  "IP-Adapter?): keep every head (width_ratio=1; token skipping still works) or "
                                  "unload it")

    def end_run(self) -> None:
        self._sliced.clear()
        self._corrections_sliced.clear()
        self._features.clear()
        self._by_timestep.clear()
        self.mlp_tokens.end_run()

    def selection(self, bucket: int) -> dict[str, torch.Tensor]:
        """The units kept in `bucket` (without routers): "block{i}.attention{a}" -> heads, "block{i}.mlp" ->
        channel groups."""
        return dict(self._buckets[bucket].kept)

    def kept(self, part: Part) -> torch.Tensor:
        return self._selection.kept[part.key]

    def whole(self, part: Part) -> bool:
        """Whether the running call keeps every unit of `part` (nothing to slice)."""
        return part.key in self._selection.whole

    def _uncut(self, selection: Selection, linear: nn.Linear) -> bool:
        """Whether `selection` keeps every unit of every part `linear` is sliced by: it runs on its own weight."""
        return all(part.key in selection.whole for part, _ in self._linear_parts[linear][1])

    def breaks_block_graph(self) -> bool:
        """MLP token skipping runs eagerly inside the block (the width hooks trace)."""
        return self.config.token_ratio < 1.0

    def _prepare(self) -> None:
        """The running call's slices and feature indices, made before the blocks run: the width hooks then
        only look them up, so a compiled block body traces them as inputs rather than building them."""
        for linear in self._linear_parts:
            self.sliced(linear)
        for part in self.parts:
            if part.norms:
                self.features(part, (part.rows or [linear for linear, _ in part.columns])[0].weight.device)

    def features(self, part: Part, device: torch.device) -> torch.Tensor:
        """The running call's features of `part`."""
        key = (part.key, device)
        if key not in self._features:
            self._features[key] = part.features(self.kept(part)).to(device)
        return self._features[key]

    def sliced(self, linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The running call's (weight, bias) of `linear`, index-selected once per change of selection; the
        linear's own where the selection cuts none of its units (no copy, no index work)."""
        if self._uncut(self._selection, linear):
            return linear.weight, linear.bias
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
                held = (weight.index_select(1, self._columns(linear)), linear.bias)
            self._sliced[linear] = held
        return held

    def _columns(self, linear: nn.Linear) -> torch.Tensor:
        """The running call's input features of the output linear `linear`."""
        device = linear.weight.device
        return torch.cat([offset + self.features(part, device) for part, offset in self._linear_parts[linear][1]])

    def corrected(self, linear: nn.Linear, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """`output` of the output linear `linear` on the kept features `x`, plus the routers' correction of
        it where they carry one (its down projection sliced as `x` is)."""
        correction = self._corrections.get(linear)
        if correction is None:
            return output
        held = self._corrections_sliced.get(linear)
        if held is None or held[0].device != x.device or held[0].dtype != x.dtype:
            down = correction.down.weight.to(x.device, x.dtype)
            if not self._uncut(self._selection, linear):
                down = down.index_select(1, self._columns(linear))
            held = self._corrections_sliced[linear] = (down, correction.up.weight.to(x.device, x.dtype))
        down, up = held
        call_state = self.session.call_state
        tokens = x.numel() // x.shape[-1]
        call_state.record_overhead("dydit width correction", 2.0 * tokens * down.shape[0] * (down.shape[1] + up.shape[0]),
                                   x.shape[-2])
        return output + torch.nn.functional.linear(torch.nn.functional.linear(x, down), up)

    # -- training ----------------------------------------------------------------------------------
    def start_training(self, settings: TrainingSettings) -> Trainable:
        """Routers that start keeping nearly everything, trained by the fine-tune (`routers.RouterTraining`):
        meanwhile every head and group runs at full width, gated where the output linears read them, and
        with token_ratio < 1 every token runs the MLP, its output gated."""
        if self.config.keeps_everything():
            raise ConfigError("DyDiTConfig keeps every head, channel group and token (width_ratio = max_width_ratio "
                              "= token_ratio = 1): its routers have nothing to learn; lower width_ratio or token_ratio")
        if self._routers is not None:
            raise ConfigError("DyDiTConfig.routers are loaded already: fine-tune a config without them")
        identity = model_identity(self.session.transformer)
        token_inputs = self._mlp_inputs if self.config.token_ratio < 1.0 else {}
        self._training = RouterTraining(self, settings, identity, token_inputs)
        self._untrained_tokens, self.mlp_tokens = self.mlp_tokens, self._training.tokens
        return self._training

    def detach(self) -> None:
        """A fine-tune that ended without `stop` (an error): its gate hooks come off with the handle."""
        if self._training is not None:
            self._training.stop()

    def stop_training(self) -> None:
        """Back to the training-free choice (the trained routers are in their file)."""
        self.mlp_tokens, self._training, self._untrained_tokens = self._untrained_tokens, None, None

    def unit_of_input(self) -> dict[nn.Linear, torch.Tensor]:
        """Each part's output linear: the unit (numbered over every part's units in a row) each of its input
        features belongs to, for the training gates."""
        starts, start = {}, 0
        for part in self.parts:
            starts[part.key], start = start, start + len(part.units)
        result = {}
        for linear, (kind, parts) in self._linear_parts.items():
            if kind == "columns":
                units = torch.empty(linear.in_features, dtype=torch.long)
                for part, offset in parts:
                    for number, features in enumerate(part.units):
                        units[offset + features] = starts[part.key] + number
                result[linear] = units
        return result

    # -- calibration -------------------------------------------------------------------------------
    def start_scoring(self) -> DyDiTScores:
        """Calibrating: from now on every call adds its heads' and groups' contributions to the block
        outputs to the scores returned (`calibration.calibrate` runs this on a keep-all config)."""
        self.scores = DyDiTScores(self.config.buckets)
        return self.scores

    def score(self, linear: nn.Linear, x: torch.Tensor) -> None:
        """Calibrating: the contributions of the heads and groups this output projection reads, over
        this call's tokens `x`."""
        kind, parts = self._linear_parts[linear]
        if kind == "columns":
            add_contributions(self.scores, bucket_of(self.session.call_state, self.scores.buckets), parts, linear, x)

    # -- report ------------------------------------------------------------------------------------
    def state_bytes(self) -> int:
        copies = [t for linear, held in self._sliced.items() for t in held if t is not None and t is not linear.bias]
        copies += [t for held in self._corrections_sliced.values() for t in held]
        return self.mlp_tokens.nbytes() + sum(t.numel() * t.element_size() for t in copies)

    def estimate_bytes(self, shapes: CallShapes) -> dict[str, int]:
        """The slice copies of the selection that copies most (of the buckets', or of the routers' over the
        timesteps they were trained on), the routers' corrections on the device, and the token cache where it
        skips tokens (every branch and block with a token-wise MLP, token_ratio < 1, no token routers): input
        sketches in fp32 and MLP outputs in `token_cache`'s form."""
        estimate = {"slice_copies": max(self._slice_bytes(selection, shapes.itemsize)
                                        for selection in self._candidates),
                    "correction_weights": sum(p.numel() for c in self._corrections.values()
                                              for p in c.parameters()) * shapes.itemsize}
        if self.config.token_ratio < 1.0 and isinstance(self.mlp_tokens, MLPTokens):
            for mlp in self._mlps.values():
                tokens = shapes.samples * (shapes.tokens + (shapes.text_tokens if mlp.joint else 0))
                estimate["token_cache"] = estimate.get("token_cache", 0) + tokens * SKETCH_DIM * 4
                kind, held = stored_bytes("token_cache", tokens * mlp.out_features, shapes.itemsize,
                                          self.config.token_cache, tokens)
                estimate[kind] = estimate.get(kind, 0) + held
        return {kind: held for kind, held in estimate.items() if held}

    def _slice_bytes(self, selection: Selection, itemsize: int) -> int:
        """Bytes of the weight and bias copies `sliced` makes for `selection`."""
        elements = 0
        for linear, (kind, parts) in self._linear_parts.items():
            if self._uncut(selection, linear):
                continue
            features = sum(self._kept_features(selection.kept, part) for part, _ in parts)
            if kind == "columns":
                elements += linear.out_features * features
            else:
                rows = features * (2 if parts[0][0].gated_hidden else 1)
                elements += rows * (linear.in_features + (linear.bias is not None))
        return elements * itemsize

    def call_stats(self, call_state: CallState) -> dict:
        """The bucket (without routers), the fraction of heads and of MLP channel groups kept, and of MLP tokens computed:
        on average, and per block for the UI's pictures."""
        kept = self._selection.kept
        widths: dict[int, list[float]] = {}
        for part in self.parts:
            widths.setdefault(part.block, []).append(len(kept[part.key]) / len(part.units))
        heads = [len(kept[p.key]) / len(p.units) for p in self.parts if p.attention is not None]
        groups = [len(kept[p.key]) / len(p.units) for p in self.parts if p.attention is None]
        stats = {} if self._routers is not None else {"dydit_bucket": self._bucket}
        stats.update({"dydit_heads": sum(heads) / max(1, len(heads)), "dydit_groups": sum(groups) / max(1, len(groups)),
                      "dydit_width_by_block": {b: sum(w) / len(w) for b, w in sorted(widths.items())}})
        if self.mlp_tokens.fractions:
            fractions = self.mlp_tokens.fractions
            stats["dydit_mlp_tokens"] = sum(fractions.values()) / len(fractions)
            stats["dydit_mlp_tokens_by_block"] = dict(sorted(fractions.items()))
        return stats
