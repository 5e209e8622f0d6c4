"""DyDiT's learned routers (arXiv 2410.03456): which heads and MLP channel groups a step runs (TDW) and
which tokens run each MLP (SDT), trained by `dit_accel.finetune` and kept in a file.

Width (TDW): the call's scalar timestep, embedded by a fixed sinusoid, goes through a small MLP
shared by every block (as DiT's own timestep MLP) to one logit per attention head and MLP channel
group of every block. Its input is only the timestep, so at inference it runs on the CPU from the
host float: no device sync, no per-sample cost, one selection per step (a unit runs where its logit
is > 0, at least one per part), which the technique's slicing hooks run as they run a bucket's.

Tokens (SDT): per block with a token-wise MLP, a linear layer scores every MLP input token; at
inference the top `token_ratio` of them per sample run the MLP (gathered, run, scattered into zeros:
static shapes, no host sync), the others pass through the residual alone. Routers trained at
token_ratio 1 have no token router: they run at any `token_ratio`, skipping MLP tokens by the
training-free cache heuristic (`tokens.py`), whose skipped tokens keep their last MLP output.

Corrections: DyDiT fine-tunes the model to its narrowing; here each output linear the parts feed (an
attention's output projection, an MLP's down projection) gets a low-rank term of the kept units'
features (`Correction`, rank `TrainingSettings.lora_rank`, starting at zero) trained with the routers:
it adds back what the dropped units gave. At inference its down projection is sliced like the
linear's input (`DyDiT.corrected`); the model's own weights are never written.

Training (`RouterTraining`, the fine-tune's `Trainable`): every head and group runs at full width;
each unit's features are multiplied by its mask where the part's output linears read them (dropping
a head zeroes its contribution to the output projection, which equals slicing it out), and each
token's MLP output by its token mask. A mask is a straight-through Gumbel-sigmoid: hard 0/1 forward,
the sigmoid's gradient backward; a unit is kept where its logit plus logistic noise is > 0 (and the
largest of its part, as at inference), a token where its noisy score is among the top `token_ratio`
of its sample (the count inference runs: a static shape, where the paper's threshold is not). The
penalty is DyDiT's FLOPs constraint on the widths, `flops_weight * (ratio - target)**2`: `ratio` is
the fraction of the narrowable linears' multiply-adds per token the call's hard masks keep (each
part's kept width, times `token_ratio` for an MLP with a token router), `target` the same at the
config's mean width over its buckets. The routers start keeping nearly everything (the
loss starts at dense quality) and the constraint pulls the ratio down.

The file (safetensors, fp32) holds the routers with the transformer's identity (`models/identity.py`:
refused for another checkpoint), the config fields they were trained for, the parts' unit counts and
the range of timesteps they saw.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from diffusers.models.embeddings import get_timestep_embedding
from torch import nn

from ...config import ConfigError
from ...models.identity import load_for_model, save_for_model
from ...runtime.call_state import CallState
from ...runtime.session_view import SessionView
from ...runtime.training import Trainable, TrainingSettings, changed_fields
from ...tokens import gather_tokens, scatter_tokens
from .config import DyDiTConfig
from .tokens import record_fraction
from .width import Part

#: safetensors metadata "format" of a routers file
ROUTERS_FORMAT = "dit-accel dydit routers 1"
#: the file a fine-tune writes into its folder
ROUTERS_FILE = "dydit_routers.safetensors"
#: width of the timestep's sinusoidal embedding, and of the shared timestep MLP
_EMBEDDING, _HIDDEN = 128, 64
#: the logit every unit and token starts at: kept with probability sigmoid(3) = 0.95 under the noise
_START_LOGIT = 3.0
#: timesteps the worst case of slice copies is taken over (`DyDiT.estimate_bytes`)
GRID = 101


def _fp32(device: torch.device | str):
    """Router math in fp32 also under a fine-tune's mixed-precision autocast."""
    return torch.autocast(torch.device(device).type, enabled=False)


class Correction(nn.Module):
    """A low-rank term added to an output linear, `up(down(x))`, over the features of the units kept: what
    the narrowed block learns to add back for the units it drops (DyDiT fine-tunes the model itself)."""

    def __init__(self, features: int, outputs: int, rank: int):
        super().__init__()
        self.down = nn.Linear(features, rank, bias=False)
        self.up = nn.Linear(rank, outputs, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class Routers(nn.Module):
    """The width router (timestep -> a logit per unit of every part, in `parts` order), a token router per
    block with a token-wise MLP (`token_inputs`: block -> the MLP's input width) and a `Correction` of
    `rank` per output linear the parts feed (`outputs`: their (in, out) features, in the technique's order)."""

    def __init__(self, parts: list[tuple[str, int]], token_inputs: dict[int, int],
                 outputs: list[tuple[int, int]], rank: int):
        super().__init__()
        self.parts, self.outputs, self.rank = parts, outputs, rank
        self.width = nn.Sequential(nn.Linear(_EMBEDDING, _HIDDEN), nn.SiLU(),
                                   nn.Linear(_HIDDEN, sum(units for _, units in parts)))
        self.tokens = nn.ModuleDict({str(block): nn.Linear(channels, 1) for block, channels in token_inputs.items()})
        self.corrections = nn.ModuleList([Correction(i, o, rank) for i, o in outputs] if rank else [])

    @classmethod
    def initial(cls, parts: list[tuple[str, int]], token_inputs: dict[int, int], outputs: list[tuple[int, int]],
                rank: int) -> Routers:
        """Routers that keep nearly every unit and token at any timestep, and corrections that add nothing
        yet (a seeded draw: reproducible)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            routers = cls(parts, token_inputs, outputs, rank)
        with torch.no_grad():
            for layer in [routers.width[-1], *routers.tokens.values()]:
                layer.weight.zero_()
                layer.bias.fill_(_START_LOGIT)
            for correction in routers.corrections:
                correction.up.weight.zero_()
        return routers

    def token_inputs(self) -> dict[int, int]:
        return {int(block): layer.in_features for block, layer in self.tokens.items()}

    def unit_logits(self, timestep: float) -> torch.Tensor:
        """(units,) fp32 logits on the CPU, every part's units in a row."""
        embedding = get_timestep_embedding(torch.tensor([float(timestep)]), _EMBEDDING, flip_sin_to_cos=True,
                                           downscale_freq_shift=0)
        with _fp32("cpu"):
            return self.width(embedding)[0]

    def token_logits(self, block: int, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T) fp32 logits of the MLP input tokens `hidden` of `block`: of each token's direction (unit
        length), so a step moves a logit as much at any hidden width or activation scale."""
        layer = self.tokens[str(block)]
        if layer.weight.device != hidden.device:  # once: the file loads on the CPU, the model may move
            layer.to(hidden.device)
        with _fp32(hidden.device):
            direction = torch.nn.functional.normalize(hidden.float(), dim=-1)
            return torch.nn.functional.linear(direction, layer.weight, layer.bias)[..., 0]

    def kept(self, timestep: float) -> dict[str, torch.Tensor]:
        """Part key -> the units (sorted) whose logit at `timestep` is > 0 or the largest of their part."""
        with torch.no_grad():
            logits = self.unit_logits(timestep)
        return {key: ((part > 0) | (part == part.max())).nonzero().flatten()
                for (key, _), part in zip(self.parts, logits.split([units for _, units in self.parts]))}


def save_routers(path: Path, routers: Routers, identity: dict[str, str], trained_for: dict[str, Any],
                 timesteps: tuple[float, float], details: dict[str, Any]) -> None:
    """Write `routers` with the transformer's `identity`, the config fields they were `trained_for` and the
    range of `timesteps` they saw."""
    save_for_model(str(path), routers.state_dict(), identity, ROUTERS_FORMAT, parts=json.dumps(routers.parts),
                   token_inputs=json.dumps(routers.token_inputs()), timesteps=json.dumps(list(timesteps)),
                   outputs=json.dumps(routers.outputs), rank=str(routers.rank),
                   trained_for=json.dumps(trained_for, sort_keys=True), details=json.dumps(details))


def load_routers(path: str, transformer: nn.Module, config: DyDiTConfig, parts: list[tuple[str, int]],
                 outputs: list[tuple[int, int]]) -> tuple[Routers, tuple[float, float]]:
    """(the routers, the range of timesteps they were trained on), refused with a `ConfigError` when made
    for another model, another config or other parts or output linears."""
    what = f"DyDiTConfig.routers {path!r}"
    state, metadata = load_for_model(path, transformer, ROUTERS_FORMAT, what)
    token_inputs = {int(b): c for b, c in json.loads(metadata["token_inputs"]).items()}
    trained_for = json.loads(metadata["trained_for"])
    if not token_inputs:
        trained_for.pop("token_ratio", None)
    changed = changed_fields(trained_for, config.trained_for(tokens=bool(token_inputs)))
    if changed is not None:
        raise ConfigError(f"{what} were trained for another config: {changed}")
    if [tuple(p) for p in json.loads(metadata["parts"])] != parts or \
            [tuple(o) for o in json.loads(metadata["outputs"])] != outputs:
        raise ConfigError(f"{what} route other heads and channel groups than this transformer's")
    routers = Routers(parts, token_inputs, outputs, int(metadata["rank"]))
    routers.load_state_dict(state)
    routers.requires_grad_(False)
    low, high = json.loads(metadata["timesteps"])
    return routers, (low, high)


def logistic_noise(logits: torch.Tensor) -> torch.Tensor:
    """`logits` plus logistic noise: thresholded at 0, a Gumbel-sigmoid draw (keep with p = sigmoid(logit))."""
    uniform = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    return logits + uniform.log() - (-uniform).log1p()


def straight_through(noisy: torch.Tensor, hard: torch.Tensor) -> torch.Tensor:
    """The gates `hard` (0/1) forward, the sigmoid of the `noisy` logits' gradient backward."""
    soft = torch.sigmoid(noisy)
    return hard.to(soft.dtype) + soft - soft.detach()


class _RoutedTokenRunner:
    """What both token runners keep: nothing between calls, this call's computed fraction per block."""

    def __init__(self, routers: Routers, token_ratio: float):
        self.routers, self.token_ratio = routers, token_ratio
        #: block -> fraction of its MLP tokens computed this call
        self.fractions: dict[int, float] = {}

    def begin_call(self, call_state: CallState) -> None:
        self.fractions = {}

    def end_run(self) -> None:
        """Nothing is kept between calls."""

    def nbytes(self) -> int:
        return 0


class RoutedTokens(_RoutedTokenRunner):
    """Inference: per sample the top `token_ratio` of the MLP input tokens by router score run the MLP;
    the others get no MLP output (the residual alone). The technique's `mlp_tokens` with routers."""

    def run(self, call_state: CallState, block: int, unit: str, forward: Callable[[torch.Tensor], torch.Tensor],
            hidden: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = hidden.shape
        scores = self.routers.token_logits(block, hidden)
        call_state.record_overhead("dydit token router", 2.0 * batch * tokens * channels, tokens)
        index = scores.topk(math.ceil(self.token_ratio * tokens), dim=1).indices.sort(dim=1).values
        record_fraction(call_state, block, unit, index.shape[-1] / tokens, self.fractions)
        computed = forward(gather_tokens(hidden, index))
        return scatter_tokens(computed.new_zeros(batch, tokens, computed.shape[-1]), index, computed)


class TrainedTokens(_RoutedTokenRunner):
    """Fine-tuning: every token runs the MLP and its output is multiplied by the token's gate: 1 for the
    top `token_ratio` of the noisy scores per sample (the count inference runs), 0 for the others."""

    def run(self, call_state: CallState, block: int, unit: str, forward: Callable[[torch.Tensor], torch.Tensor],
            hidden: torch.Tensor) -> torch.Tensor:
        noisy = logistic_noise(self.routers.token_logits(block, hidden))
        kept = math.ceil(self.token_ratio * hidden.shape[1])
        hard = torch.zeros_like(noisy).scatter_(1, noisy.detach().topk(kept, dim=1).indices, 1.0)
        gates = straight_through(noisy, hard)
        record_fraction(call_state, block, unit, kept / hidden.shape[1], self.fractions)
        output = forward(hidden)
        return output * gates.unsqueeze(-1).to(output.dtype)


class Routed(Protocol):
    """What the routers' training asks of its technique (DyDiT)."""

    config: DyDiTConfig
    parts: list[Part]
    session: SessionView

    def unit_of_input(self) -> dict[nn.Linear, torch.Tensor]: ...

    def stop_training(self) -> None: ...


class RouterTraining(Trainable):
    """DyDiT's routers while `dit_accel.finetune` trains them (see the module doc); `technique` runs every
    head and group at full width meanwhile and asks `begin_call` for each call's kept units."""

    def __init__(self, technique: Routed, settings: TrainingSettings, identity: dict[str, str],
                 token_inputs: dict[int, int]):
        self.technique, self.identity, self.flops_weight = technique, identity, settings.flops_weight
        config = technique.config
        parts: list[Part] = technique.parts
        outputs = technique.unit_of_input()
        self.routers = Routers.initial([(part.key, len(part.units)) for part in parts], token_inputs,
                                       [(linear.in_features, linear.out_features) for linear in outputs],
                                       settings.lora_rank)
        self.tokens = TrainedTokens(self.routers, config.token_ratio)
        device = next(technique.session.transformer.parameters()).device
        self.routers.tokens.to(device)
        self.routers.corrections.to(device)
        self._counts = [len(part.units) for part in parts]
        #: per part: multiply-adds per token of its linears at full width (its share of a linear it shares)
        macs = []
        for part in parts:
            rows = sum(linear.in_features for linear in part.rows) * part.width * (2 if part.gated_hidden else 1)
            macs.append(rows + sum(linear.out_features for linear, _ in part.columns) * part.width)
        self._macs = torch.tensor(macs, dtype=torch.float32)
        #: per part: the block whose token router gates it (an MLP part), else None
        self._token_blocks = [part.block if part.attention is None and part.block in token_inputs else None
                              for part in parts]
        width = sum(config.width_at(bucket) for bucket in range(config.buckets)) / config.buckets
        #: per part: the fraction of tokens it runs on (an MLP with a token router: the config's, fixed)
        self._tokens = torch.tensor([1.0 if block is None else config.token_ratio for block in self._token_blocks])
        self.target = float((self._macs * width * self._tokens).sum() / self._macs.sum())
        #: every unit's share of its part's width, in the routers' order
        self._shares = torch.cat([torch.tensor([len(u) / part.width for u in part.units]) for part in parts])
        self._part_of_unit = torch.repeat_interleave(torch.arange(len(parts)), torch.tensor(self._counts))
        self._hooks = [linear.register_forward_pre_hook(self._mask_hook(units.to(device)))
                       for linear, units in outputs.items()]
        self._hooks += [linear.register_forward_hook(self._correction_hook(correction))
                        for linear, correction in zip(outputs, self.routers.corrections)]
        #: this call's unit gates (on the CPU, and on the model's device for the hooks)
        self._gates: torch.Tensor | None = None
        self._device_gates: torch.Tensor | None = None
        self._timesteps = (math.inf, -math.inf)
        #: the last call's kept fraction of the narrowable multiply-adds, and of the widths alone
        self._ratio = self._width = 1.0

    def _mask_hook(self, units: torch.Tensor):
        """An output linear's pre-hook: each input feature times its unit's gate (`units`: the unit of each)."""
        def hook(module, args):
            if self._device_gates is None or self.technique.session.call_state is None:
                return None
            x = args[0]
            return (x * self._device_gates.index_select(0, units).to(x.dtype), *args[1:])
        return hook

    def _correction_hook(self, correction: Correction):
        """An output linear's hook: its correction of the gated input (the mask hook ran before) added."""
        def hook(module, args, output):
            if self._device_gates is None or self.technique.session.call_state is None:
                return None
            return output + correction(args[0].to(correction.down.weight.dtype)).to(output.dtype)
        return hook

    def begin_call(self, call_state: CallState) -> dict[str, torch.Tensor]:
        """This call's unit gates (drawn at its timestep); the kept units they amount to, for the ledger."""
        timestep = call_state.ctx.timestep
        self._timesteps = (min(self._timesteps[0], timestep), max(self._timesteps[1], timestep))
        noisy = logistic_noise(self.routers.unit_logits(timestep))
        largest = torch.zeros(len(self._counts)).scatter_reduce(0, self._part_of_unit, noisy.detach(), "amax",
                                                                include_self=False)
        hard = (noisy > 0) | (noisy == largest[self._part_of_unit])  # as at inference: one unit a part at least
        self._gates = straight_through(noisy, hard)
        self._device_gates = self._gates.to(self._device())
        return {part.key: units.nonzero().flatten()
                for part, units in zip(self.technique.parts, hard.split(self._counts))}

    def _device(self) -> torch.device:
        return next(self.technique.session.transformer.parameters()).device

    def parameters(self) -> list[nn.Parameter]:
        return list(self.routers.parameters())

    def penalty(self) -> torch.Tensor | None:
        if self._gates is None:
            return None
        widths = torch.zeros(len(self._counts)).index_add(0, self._part_of_unit, self._gates * self._shares)
        ratio = (self._macs * widths * self._tokens).sum() / self._macs.sum()
        self._ratio = float(ratio.detach())
        self._width = float((self._macs * widths.detach()).sum() / self._macs.sum())
        self._gates = None
        return self.flops_weight * (ratio - self.target) ** 2

    def progress(self) -> dict[str, float]:
        fractions = self.tokens.fractions
        shown = {"width": self._width, "ratio": self._ratio, "target": self.target}
        if fractions:
            shown["tokens"] = sum(fractions.values()) / len(fractions)
        return shown

    def save(self, directory: Path, details: dict[str, Any]) -> DyDiTConfig:
        path = (directory / ROUTERS_FILE).resolve()
        config = self.technique.config
        seen = self._timesteps if self._timesteps[0] <= self._timesteps[1] else (0.0, 1000.0)
        save_routers(path, self.routers, self.identity, config.trained_for(), seen, details)
        return dataclasses.replace(config, routers=str(path), calibration=None)

    def stop(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        self._gates = self._device_gates = None
        self.technique.stop_training()
