"""Wan 2.1 / 2.2: image-only self-attention with rotary tables, cross-attention to text; BCFHW.

`attn1` attends over the video tokens only and `attn2` lets them query the UMT5 tokens (and, for
Wan 2.1 image-to-video, the CLIP image-context tokens through `add_k_proj`/`add_v_proj`). The rotary
table `rotary_emb` is a (cos, sin) pair of shape (1, N, 1, head_dim) that the processor broadcasts
over the batch, so a gathered (or pooled) per-sample table (B, n, 1, head_dim) works:
`per_sample_positions`. Wan 2.2 A14B alternates two transformers of this class (`transformer`,
`transformer_2`); each gets its own adapter and they share the step context.

Per-token timesteps (Wan 2.2 TI2V, `expand_timesteps=True`: `timestep` is (B, N), 0 on the
conditioning frame) give every block a per-token modulation `temb` (B, N, 6, hidden); it is gathered
with the tokens (pooled: each group's mean), so token subsets and pooled blocks work there too. The
step context then reads the per-sample largest timestep, the noise level of the generated frames.

FLOPs: `text_tokens` counts the text tokens only; the 257 CLIP image-context tokens of Wan 2.1 I2V
are charged as if their projections and attention spanned the text length (approximate there,
exact for text-to-video and Wan 2.2).
"""

from __future__ import annotations

import dataclasses

from diffusers import WanTransformer3DModel

from ..tokens import gather_tokens, pool_rotation, pool_tokens
from .base import BlockSignature, ModelAdapter, classify_linears
from .registry import register_adapter


@register_adapter
class WanAdapter(ModelAdapter):
    family = "wan"
    transformer_class = WanTransformer3DModel
    text_placement = "cross_attention"
    positions = "rotary"
    per_sample_positions = True
    output_layout = "BCFHW"
    default_text_tokens = 512

    def blocks(self):
        return list(self.transformer.blocks)

    def block_signature(self, block):
        return BlockSignature(rotary_arg="rotary_emb")

    def self_attentions(self, block):
        return [block.attn1]

    def attention_layout(self, block, attention):
        return "image"

    def mlp_module(self, block):
        return block.ffn

    def linear_streams(self, block):
        text = ("attn2.to_k", "attn2.to_v", "attn2.add_k_proj", "attn2.add_v_proj", "attn2.to_added_kv")
        return classify_linears(block, text=text)

    def attention_streams(self, block):
        return [(block.attn1, "image", "image"), (block.attn2, "image", "text")]

    def patch_size(self):
        return tuple(self.transformer.config.patch_size)

    def call_info(self, args, kwargs):
        info = super().call_info(args, kwargs)
        timestep = info.timestep
        if timestep.ndim == 2:  # Wan 2.2 TI2V: one timestep per token
            if timestep.shape[1] != info.grid.num_tokens:
                raise ValueError(f"Wan per-token timesteps cover {timestep.shape[1]} tokens, the latents "
                                 f"{info.grid.num_tokens}")
            info = dataclasses.replace(info, timestep=timestep.amax(dim=1))
        return info

    def gather_rotary(self, rotary, index, text_tokens):
        return tuple(gather_tokens(table, index) for table in rotary)

    def gather_block_inputs(self, block, bound, index, text_tokens, gather_hidden):
        bound = super().gather_block_inputs(block, bound, index, text_tokens, gather_hidden)
        temb = bound.get("temb")
        if temb is not None and temb.ndim == 4:  # (B, N, 6, hidden): per-token timesteps (Wan 2.2 TI2V)
            bound["temb"] = gather_tokens(temb, index)
        return bound

    def pool_rotary(self, rotary, groups, count, text_tokens):
        return pool_rotation(*rotary, groups, count)

    def pool_block_inputs(self, block, bound, groups, count, text_tokens):
        bound = super().pool_block_inputs(block, bound, groups, count, text_tokens)
        temb = bound.get("temb")
        if temb is not None and temb.ndim == 4:  # per-token modulation: each group's mean
            bound["temb"] = pool_tokens(temb, groups, count)
        return bound
