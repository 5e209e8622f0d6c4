"""Stable Diffusion 3 / 3.5 (MMDiT): image tokens first in one joint attention; absolute positions.

SD3.5's dual attention adds an image-only `attn2` in the first blocks; SD3.5's qk-norm lives inside
the attention processors and needs nothing here. Skip-layer guidance (SD3.5's `skip_guidance_layers`)
makes an extra call per step that passes `skip_layers`: the transformer does not run those blocks.
"""

from __future__ import annotations

from diffusers import SD3Transformer2DModel

from .base import MMDIT_TEXT_LINEARS, BlockSignature, ModelAdapter, classify_linears
from .registry import register_adapter


@register_adapter
class SD3Adapter(ModelAdapter):
    family = "sd3"
    transformer_class = SD3Transformer2DModel
    text_placement = "image_first"
    positions = "absolute"
    output_layout = "BCHW"
    default_text_tokens = 333

    def blocks(self):
        return list(self.transformer.transformer_blocks)

    def skipped_blocks(self, arguments):
        # skip-layer guidance's extra call: `forward` runs none of these blocks
        return frozenset(int(i) for i in arguments.get("skip_layers") or ())

    def block_signature(self, block):
        return BlockSignature(output_hidden_index=1)

    def drops_text_output(self, block):
        # the last block is `context_pre_only`: its text output is None
        return bool(getattr(block, "context_pre_only", False))

    def self_attentions(self, block):
        return [block.attn] + ([block.attn2] if getattr(block, "attn2", None) is not None else [])

    def attention_layout(self, block, attention):
        return "image_text" if attention is block.attn else "image"

    def linear_streams(self, block):
        return classify_linears(block, text=MMDIT_TEXT_LINEARS)

    def attention_streams(self, block):
        return [(attn, "joint" if attn is block.attn else "image", "joint" if attn is block.attn else "image")
                for attn in self.self_attentions(block)]

    def patch_size(self):
        p = self.transformer.config.patch_size
        return (1, p, p)
