"""CogVideoX 1.0 / 1.5: text tokens FIRST, then video tokens, in one attention; output BFCHW.

The attention processor concatenates [text, video] and the feed-forward runs on the same
concatenation, so both see joint tokens. Positions: with `use_rotary_positional_embeddings`
(CogVideoX-5b, 1.5) the pipeline passes `image_rotary_emb`, a (cos, sin) pair of (N, head_dim)
rows for the video tokens only; diffusers' `apply_rotary_emb` indexes it as `cos[None, None]`, which
only works for a 2-D table, so a token subset must be shared by the batch. Without rotary
(CogVideoX-2b) sin-cos (or learned) positions are added at the patch embedding and a per-sample
subset works; `positions` and `per_sample_positions` are therefore set per instance from the
config. CogVideoX 1.5 patches time too (`patch_size_t`); the pipeline pads the latent frames to a
multiple of it.
"""

from __future__ import annotations

from diffusers import CogVideoXTransformer3DModel

from .base import BlockSignature, ModelAdapter, classify_linears
from .registry import register_adapter


@register_adapter
class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    transformer_class = CogVideoXTransformer3DModel
    text_placement = "text_first"
    positions = "rotary"
    per_sample_positions = False
    output_layout = "BFCHW"
    default_text_tokens = 226

    def __init__(self, transformer):
        super().__init__(transformer)
        if not transformer.config.use_rotary_positional_embeddings:
            self.positions = "absolute"
            self.per_sample_positions = True

    def blocks(self):
        return list(self.transformer.transformer_blocks)

    def block_signature(self, block):
        return BlockSignature(rotary_arg="image_rotary_emb", output_hidden_index=0)

    def self_attentions(self, block):
        return [block.attn1]

    def attention_layout(self, block, attention):
        return "text_image"

    def linear_streams(self, block):
        return classify_linears(block, joint=("attn1.", "ff."))

    def attention_streams(self, block):
        return [(block.attn1, "joint", "joint")]

    def patch_size(self):
        config = self.transformer.config
        return (config.patch_size_t or 1, config.patch_size, config.patch_size)

    def gather_rotary(self, rotary, index, text_tokens):
        return self.gather_shared_rotary(rotary, index)

    def pool_rotary(self, rotary, groups, count, text_tokens):
        return self.pool_shared_rotary(rotary, groups, count)
