"""The adapter base shared by Flux and HunyuanVideo: double-stream blocks, then single-stream ones."""

from __future__ import annotations

from torch import nn

from .base import MMDIT_TEXT_LINEARS, ModelAdapter, classify_linears
from .width import ChannelSlices, WidthLayout, head_slices


class DualStreamAdapter(ModelAdapter):
    """Structure shared by Flux and HunyuanVideo: double-stream blocks (separate image and text
    weights, one joint attention) followed by single-stream blocks (one set of weights for the
    concatenated sequence)."""

    def blocks(self):
        return list(self.transformer.transformer_blocks) + list(self.transformer.single_transformer_blocks)

    def _is_single(self, block: nn.Module) -> bool:
        return any(block is b for b in self.transformer.single_transformer_blocks)

    def self_attentions(self, block):
        return [block.attn]

    def linear_streams(self, block):
        if self._is_single(block):
            return classify_linears(block, joint=("attn.", "proj_mlp", "proj_out"))
        return classify_linears(block, text=MMDIT_TEXT_LINEARS)

    def attention_streams(self, block):
        return [(block.attn, "joint", "joint")]

    def width_layout(self, block):
        if not self._is_single(block):
            return super().width_layout(block)
        # one fused output projection reads cat([attention output, MLP hidden])
        inner = block.attn.to_q.out_features
        attention = head_slices(block.attn, columns=((block.proj_out, 0),))
        mlp = ChannelSlices(block.proj_mlp.out_features, (block.proj_mlp,), ((block.proj_out, inner),), None)
        return WidthLayout((attention,), mlp)
