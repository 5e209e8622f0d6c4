"""The shapes a plan will run at, known before it runs, for estimating the bytes it holds.

`CallShapes` says what one transformer call of a pipeline run sees (samples per step, the token
grid, text tokens, the model's dtype); `attention_shapes` reads each self-attention's heads and head
size from the adapter. Each technique turns them into bytes per kind (`Technique.estimate_bytes`);
`api.estimate` sums them without running the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.base import AttentionLayout, ModelAdapter, TokenGrid


@dataclass(frozen=True)
class CallShapes:
    """One pipeline run's transformer calls, as far as held state goes."""

    #: samples each step runs through the transformer, every CFG branch counted (batch x 2 under CFG,
    #: in one batched call or two calls: held state grows with the product either way)
    samples: int
    grid: TokenGrid
    #: text tokens of a call (in the joint attention sequence, or cross-attended)
    text_tokens: int
    #: bytes per element of the model's dtype
    itemsize: int
    #: hidden size of the tokens between blocks, and the width of the model output per token
    hidden: int
    output_channels: int

    @property
    def tokens(self) -> int:
        return self.grid.num_tokens


@dataclass(frozen=True)
class AttentionShape:
    """One self-attention of a block: its heads, their size, and where text sits in its sequence."""

    block: int
    #: position among the block's self-attentions
    index: int
    heads: int
    head_dim: int
    layout: AttentionLayout

    def keys(self, shapes: CallShapes) -> int:
        """Keys of its sequence: the image tokens, and the text where it is in the same sequence."""
        return shapes.tokens + (shapes.text_tokens if self.layout in ("image_text", "text_image") else 0)


def attention_shapes(adapter: ModelAdapter) -> list[AttentionShape]:
    """Every self-attention of the blocks, in block order."""
    shapes = []
    for index, block in enumerate(adapter.blocks()):
        for position, attention in enumerate(adapter.self_attentions(block)):
            inner = attention.to_k.out_features
            heads = attention.heads * inner // attention.to_q.out_features if hasattr(attention, "to_q") \
                else attention.heads
            shapes.append(AttentionShape(index, position, heads, inner // heads,
                                         adapter.attention_layout(block, attention)))
    return shapes
