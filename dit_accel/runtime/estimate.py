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


def call_shapes(adapter: ModelAdapter, *, height: int, width: int, num_frames: int = 1, batch: int = 1,
                guidance: bool | None = None, text_tokens: int | None = None, itemsize: int | None = None,
                spatial: int = 8, temporal: int = 4) -> CallShapes:
    """The shapes of a pipeline call at these sizes (pixels; `spatial`/`temporal`: the VAE's scale factors);
    `guidance` None: as the family's pipelines run by default; `itemsize` None: the blocks' weights'."""
    for name, value in (("height", height), ("width", width), ("num_frames", num_frames), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"estimate: {name} must be a positive int, got {value!r}")
    grid = adapter.grid_for(height, width, num_frames, spatial, temporal)
    if grid.num_tokens == 0:
        raise ValueError(f"estimate: {height} x {width} pixels give no tokens ({spatial * adapter.latent_packing} "
                         f"pixels a latent, patches of {adapter.patch_size()[1:]})")
    guided = adapter.guidance_by_default if guidance is None else guidance
    return shapes_of(adapter, batch * (2 if guided else 1), grid,
                     adapter.default_text_tokens if text_tokens is None else text_tokens, itemsize)


def shapes_of(adapter: ModelAdapter, samples: int, grid: TokenGrid, text_tokens: int,
              itemsize: int | None = None) -> CallShapes:
    """`CallShapes` of `adapter`'s model for these samples, grid and text (`itemsize` None: the blocks'
    weights')."""
    return CallShapes(samples, grid, text_tokens, itemsize or adapter.activation_itemsize(), adapter.hidden_size(),
                      adapter.output_channels())
