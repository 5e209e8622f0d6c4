"""FLOPs of the transformer blocks: the analytic dense model and the ledger's records of what ran.

A FLOP here is one multiply or one add: a (tokens x d_in) @ (d_in x d_out) product costs
2 * tokens * d_in * d_out, attention costs 4 * head_dim * attended (query, key) pairs per head
(scores and the weighted sum of values). Bias adds, norms, activations, softmax and the
embedding/output layers outside the blocks are left out; the count is exact for what it covers.

A block is split into units, its direct children that hold linear layers (`attn`, `ff`, `norm1`,
...): the runtime records a unit's work when the unit really runs, so a step cache that skips a
block or an attention module is counted by what it left out. Attention units also record their
attention core (`Work` of kind "self_attention" or "cross_attention"); a technique that changes
the attention writes that record itself with the pairs it really attended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..models.base import ModelAdapter, TokenStream

WorkKind = Literal["linear", "self_attention", "cross_attention", "overhead"]


@dataclass(frozen=True)
class Work:
    """One line of the work ledger: something one transformer call really computed."""

    kind: WorkKind
    #: block index, -1 for work outside the blocks
    block: int
    #: the unit within the block ("attn", "ff", ...) or the overhead's name ("ras scoring")
    name: str
    flops: float
    batch: int = 0
    #: tokens through the unit's linears (queries for attention)
    tokens: int = 0
    #: key tokens of an attention
    keys: int = 0
    #: attended (query, key) pairs per head and sample
    pairs: int = 0
    heads: int = 0
    #: widest output of the unit's linears (an MLP's hidden width)
    channels: int = 0


@dataclass(frozen=True)
class UnitWidth:
    """What stage 4 left of one unit this call: the (in, out) features of its sliced linears (by
    qualified name in the block), the attention heads kept, and the fraction of its tokens that ran."""

    features: tuple[tuple[str, int, int], ...] = ()
    heads: int | None = None
    token_fraction: float = 1.0


@dataclass(frozen=True)
class _AttentionCore:
    query: TokenStream
    key: TokenStream
    inner_dim: int
    heads: int

    @property
    def kind(self) -> WorkKind:
        return "cross_attention" if self.query != self.key and "text" in (self.query, self.key) else "self_attention"


def tokens_of(stream: TokenStream, image: int, text: int) -> int:
    return {"image": image, "text": text, "joint": image + text, "pooled": 1}[stream]


class UnitCost:
    """Linear (and attention) FLOPs of one unit as a function of the tokens it sees."""

    def __init__(self, name: str, linears: dict[str, tuple[TokenStream, int]], channels: int,
                 attention: _AttentionCore | None):
        self.name, self.channels, self.attention = name, channels, attention
        #: qualified linear name -> (stream, multiply-adds per token)
        self._linears = linears
        self._macs = self._stream_macs(linears)
        #: records are immutable and shapes repeat from call to call: build each once
        self._records: dict[tuple, tuple[Work, ...]] = {}

    @staticmethod
    def _stream_macs(linears: dict[str, tuple[TokenStream, int]]) -> dict[TokenStream, int]:
        return {stream: sum(m for s, m in linears.values() if s == stream)
                for stream in ("image", "text", "joint", "pooled")}

    def linear_flops(self, batch: int, image: int, text: int, width: UnitWidth | None = None) -> float:
        macs, fraction = self._macs, 1.0
        if width is not None:
            linears = dict(self._linears)
            for linear, features_in, features_out in width.features:
                linears[linear] = (linears[linear][0], features_in * features_out)
            macs, fraction = self._stream_macs(linears), width.token_fraction
        tokens = macs["image"] * image + macs["text"] * text + macs["joint"] * (image + text)
        return 2.0 * batch * (tokens * fraction + macs["pooled"])

    def attention_shape(self, image: int, text: int, kv_image: int | None = None) -> tuple[int, int]:
        """(queries, keys) of the attention core when `image` image tokens are computed."""
        core = self.attention
        keys_image = image if kv_image is None else kv_image
        return tokens_of(core.query, image, text), tokens_of(core.key, keys_image, text)

    def records(self, block: int, batch: int, image: int, text: int, with_core: bool,
                width: UnitWidth | None = None) -> tuple[Work, ...]:
        """The unit's linear work (narrowed by `width`), and its dense attention core when `with_core`."""
        key = (block, batch, image, text, with_core, width)
        works = self._records.get(key)
        if works is None:
            tokens = self.attention_shape(image, text)[0] if self.attention else image
            if width is not None:
                tokens = round(tokens * width.token_fraction)
            works = [Work("linear", block, self.name, self.linear_flops(batch, image, text, width), batch, tokens,
                          channels=self.channels)]
            if with_core and self.attention is not None:
                queries, keys = self.attention_shape(image, text)
                heads = None if width is None else width.heads
                works.append(self.core_record(block, batch, queries, keys, queries * keys, heads))
            self._records[key] = works = tuple(works)
        return works

    def core_record(self, block: int, batch: int, queries: int, keys: int, pairs: int,
                    heads: int | None = None) -> Work:
        """The attention core over `pairs` (query, key) pairs per head, for `heads` of its heads (all: None)."""
        core = self.attention
        heads = core.heads if heads is None else heads
        inner_dim = core.inner_dim * heads // core.heads
        return Work(core.kind, block, self.name, 4.0 * batch * inner_dim * pairs, batch, queries, keys, pairs,
                    heads, inner_dim)


def _unit_of(name: str) -> str:
    return name.split(".")[0]


class BlockCostModel:
    """The units of one block, read once from the module structure."""

    def __init__(self, adapter: ModelAdapter, block: nn.Module):
        modules = dict(block.named_modules())
        attentions = {id(attn): (query, key) for attn, query, key in adapter.attention_streams(block)}
        linears: dict[str, dict[str, tuple[TokenStream, int]]] = {}
        channels: dict[str, int] = {}
        for name, stream in adapter.linear_streams(block).items():
            linear = modules[name]
            unit = _unit_of(name)
            linears.setdefault(unit, {})[name] = (stream, linear.in_features * linear.out_features)
            channels[unit] = max(channels.get(unit, 0), linear.out_features)
        self.units: dict[str, UnitCost] = {}
        for unit, unit_linears in linears.items():
            module = modules[unit]
            core = None
            if id(module) in attentions:
                query, key = attentions[id(module)]
                core = _AttentionCore(query, key, module.to_q.out_features, module.heads)
            self.units[unit] = UnitCost(unit, unit_linears, channels[unit], core)

    def dense_flops(self, batch: int, image: int, text: int) -> float:
        return sum(w.flops for unit in self.units.values() for w in unit.records(0, batch, image, text, True))


class TransformerCostModel:
    """Per-block unit costs of a whole transformer."""

    def __init__(self, adapter: ModelAdapter):
        self.blocks = [BlockCostModel(adapter, block) for block in adapter.blocks()]
        self._dense: dict[tuple, float] = {}

    def dense_flops(self, batch: int, image_tokens: int, text_tokens: int,
                    skipped_blocks: frozenset[int] = frozenset()) -> float:
        """The blocks a call runs, all at full size (`skipped_blocks`: those the call does not run)."""
        key = (batch, image_tokens, text_tokens, skipped_blocks)
        if key not in self._dense:
            self._dense[key] = sum(block.dense_flops(batch, image_tokens, text_tokens)
                                   for index, block in enumerate(self.blocks) if index not in skipped_blocks)
        return self._dense[key]


def transformer_flops(adapter: ModelAdapter, batch: int, image_tokens: int, text_tokens: int) -> float:
    """Dense FLOPs of one forward of the blocks of `adapter.transformer`."""
    return TransformerCostModel(adapter).dense_flops(batch, image_tokens, text_tokens)
