"""Analytic FLOPs of the transformer blocks (where nearly all the compute of a DiT is).

A FLOP here is one multiply or one add: a (tokens x d_in) @ (d_in x d_out) product costs
2 * tokens * d_in * d_out, attention costs 4 * heads * head_dim * queries * keys (scores and the
weighted sum of values). Bias adds, norms, activations, softmax and the embedding/output layers
outside the blocks are left out; the count is exact for what it covers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from torch import nn

from ..models.base import ModelAdapter, TokenStream


@dataclass(frozen=True)
class BlockWork:
    """What one block computes in one call; techniques shrink it."""

    batch: int
    image_tokens: int
    text_tokens: int
    #: image tokens visible as attention keys/values (RAS keeps cached ones visible)
    kv_image_tokens: int
    #: fraction of (query, key) pairs computed (sparse attention)
    attention_density: float = 1.0
    #: fraction of attention heads / MLP channels computed (dynamic width)
    head_ratio: float = 1.0
    mlp_ratio: float = 1.0
    #: image tokens that go through the MLP, when fewer than `image_tokens` (token routing)
    mlp_image_tokens: int | None = None

    @classmethod
    def dense(cls, batch: int, image_tokens: int, text_tokens: int) -> "BlockWork":
        return cls(batch, image_tokens, text_tokens, image_tokens)

    def with_(self, **changes) -> "BlockWork":
        return replace(self, **changes)


def _linear_kind(name: str) -> str:
    if "attn" in name:
        return "attention"
    if name.startswith(("ff", "proj_mlp")) or ".ff" in name:
        return "mlp"
    return "other"


@dataclass(frozen=True)
class _Linear:
    stream: TokenStream
    kind: str
    macs_per_token: int


@dataclass(frozen=True)
class _Attention:
    query: TokenStream
    key: TokenStream
    inner_dim: int


class BlockCostModel:
    """FLOPs of one block as a function of its `BlockWork`, read once from the module structure."""

    def __init__(self, adapter: ModelAdapter, block: nn.Module):
        modules = dict(block.named_modules())
        self.linears = [
            _Linear(stream, _linear_kind(name), modules[name].in_features * modules[name].out_features)
            for name, stream in adapter.linear_streams(block).items()
        ]
        self.attentions = [
            _Attention(query, key, attn.to_q.out_features)
            for attn, query, key in adapter.attention_streams(block)
        ]

    @staticmethod
    def _tokens(stream: TokenStream, image: int, text: int) -> int:
        return {"image": image, "text": text, "joint": image + text, "pooled": 1}[stream]

    def flops(self, work: BlockWork) -> float:
        total = 0.0
        mlp_image = work.image_tokens if work.mlp_image_tokens is None else work.mlp_image_tokens
        for linear in self.linears:
            image = mlp_image if linear.kind == "mlp" else work.image_tokens
            ratio = {"attention": work.head_ratio, "mlp": work.mlp_ratio}.get(linear.kind, 1.0)
            total += 2 * linear.macs_per_token * self._tokens(linear.stream, image, work.text_tokens) * ratio
        for attn in self.attentions:
            queries = self._tokens(attn.query, work.image_tokens, work.text_tokens)
            keys = self._tokens(attn.key, work.kv_image_tokens, work.text_tokens)
            total += 4 * attn.inner_dim * queries * keys * work.attention_density * work.head_ratio
        return total * work.batch


class TransformerCostModel:
    """Per-block cost models of a whole transformer."""

    def __init__(self, adapter: ModelAdapter):
        self.blocks = [BlockCostModel(adapter, block) for block in adapter.blocks()]

    def flops(self, works: list[BlockWork]) -> float:
        return sum(block.flops(work) for block, work in zip(self.blocks, works, strict=True))

    def dense_works(self, batch: int, image_tokens: int, text_tokens: int) -> list[BlockWork]:
        return [BlockWork.dense(batch, image_tokens, text_tokens) for _ in self.blocks]


def transformer_flops(adapter: ModelAdapter, batch: int, image_tokens: int, text_tokens: int) -> float:
    """Dense FLOPs of one forward of the blocks of `adapter.transformer`."""
    model = TransformerCostModel(adapter)
    return model.flops(model.dense_works(batch, image_tokens, text_tokens))
