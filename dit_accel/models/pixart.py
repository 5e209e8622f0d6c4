"""PixArt-α / PixArt-Σ: image-only self-attention, cross-attention to text; absolute positions.

The blocks are diffusers' `BasicTransformerBlock` with "ada_norm_single": `attn1` attends over the
image tokens only, `attn2` lets them query the T5 tokens, and the per-sample modulation comes in as
`timestep` (B, 6 * hidden), so a different token subset per sample works. Sin-cos positions are
added at the patch embedding, before the first block. `attention_mask` (rarely given) reaches
`attn1` as a bias over the image keys and is gathered with the tokens (pooled: a group passes where
any member does); the text mask (`encoder_attention_mask`) only reaches `attn2` and needs nothing.
The output is BCHW, with twice the latent channels when the model learns its variance
(`out_channels = 2 * in_channels`).
"""

from __future__ import annotations

from diffusers import PixArtTransformer2DModel

from ..tokens import gather_tokens, pool_key_mask
from .base import BlockSignature, ModelAdapter, classify_linears
from .registry import register_adapter


@register_adapter
class PixArtAdapter(ModelAdapter):
    family = "pixart"
    transformer_class = PixArtTransformer2DModel
    text_placement = "cross_attention"
    positions = "absolute"
    output_layout = "BCHW"
    default_text_tokens = 300

    def blocks(self):
        return list(self.transformer.transformer_blocks)

    def block_signature(self, block):
        return BlockSignature(mask_arg="attention_mask")

    def self_attentions(self, block):
        return [block.attn1]

    def attention_layout(self, block, attention):
        return "image"

    def linear_streams(self, block):
        return classify_linears(block, text=("attn2.to_k", "attn2.to_v"))

    def attention_streams(self, block):
        streams = [(block.attn1, "image", "image")]
        if block.attn2 is not None:
            streams.append((block.attn2, "image", "text"))
        return streams

    def patch_size(self):
        p = self.transformer.config.patch_size
        return (1, p, p)

    def gather_mask(self, mask, index, text_tokens):
        # (B, 1, N) bias over the image keys of attn1
        return gather_tokens(mask, index, dim=mask.ndim - 1)

    def pool_mask(self, mask, groups, count, text_tokens):
        return pool_key_mask(mask, groups, count)
