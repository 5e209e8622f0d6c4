"""DiT (class-conditional): image-only self-attention, no text at all; absolute positions.

diffusers' `BasicTransformerBlock` with "ada_norm_zero": the class label and timestep reach every
block as per-sample vectors (the embedding and modulation layers live in `norm1`, one vector per
sample), so a different token subset per sample works. Sin-cos positions are added at the patch
embedding. The output is BCHW with learned sigma (2x channels); the model unpatchifies with
`height = width = sqrt(tokens)`, so only square latents are valid, which the pipeline guarantees.
"""

from __future__ import annotations

from diffusers import DiTTransformer2DModel

from .base import BlockSignature, ModelAdapter, classify_linears
from .registry import register_adapter


@register_adapter
class DiTAdapter(ModelAdapter):
    family = "dit"
    transformer_class = DiTTransformer2DModel
    # no text tokens anywhere: nothing shares the self-attention sequence with the image tokens
    text_placement = "cross_attention"
    positions = "absolute"
    output_layout = "BCHW"

    def blocks(self):
        return list(self.transformer.transformer_blocks)

    def block_signature(self, block):
        # the model always passes attention_mask=None
        return BlockSignature(text_arg=None)

    def self_attentions(self, block):
        return [block.attn1]

    def attention_layout(self, block, attention):
        return "image"

    def linear_streams(self, block):
        return classify_linears(block)

    def attention_streams(self, block):
        return [(block.attn1, "image", "image")]

    def patch_size(self):
        p = self.transformer.config.patch_size
        return (1, p, p)
