"""Flux.1: text tokens first; double-stream blocks then single-stream blocks; rotary tables.

Both block kinds take image and text tokens as separate arguments and return (text, image). The
rotary table covers text rows then image rows and is shared by the batch, so a gathered subset of
image tokens must be shared by the batch too (`per_sample_positions = False`).

IP-Adapter image tokens never enter the joint sequence: `FluxIPAdapterAttnProcessor` runs the joint
attention, then a second SDPA call of the image queries against the IP tokens alone (the "cross" calls
of `sdpa_call_layout`), whose output the block adds to the image stream. So a token subset or pooled
tokens carry their IP attention with them, and stages 5-6 leave that call dense.
"""

from __future__ import annotations

from diffusers import FluxTransformer2DModel

from .base import BlockSignature, CallInfo, TokenGrid
from .dual_stream import DualStreamAdapter
from .registry import register_adapter


@register_adapter
class FluxAdapter(DualStreamAdapter):
    family = "flux"
    transformer_class = FluxTransformer2DModel
    text_placement = "text_first"
    positions = "rotary"
    per_sample_positions = False
    output_layout = "BNC"
    default_text_tokens = 512
    guidance_by_default = False
    latent_packing = 2

    def block_signature(self, block):
        return BlockSignature(rotary_arg="image_rotary_emb", output_hidden_index=1)

    def attention_layout(self, block, attention):
        return "text_image"

    def patch_size(self):
        return (1, 1, 1)

    def call_info(self, args, kwargs):
        bound = self.bind(self.transformer, args, kwargs)
        latents = bound["hidden_states"]
        img_ids = bound["img_ids"]
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        rows, cols = int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1
        if rows * cols != latents.shape[1]:
            raise ValueError(
                f"Flux call with {latents.shape[1]} image tokens is not one {rows}x{cols} grid "
                "(reference-image conditioning is not supported)"
            )
        return CallInfo(TokenGrid(1, rows, cols), latents.shape[0], bound["encoder_hidden_states"].shape[1],
                        bound["timestep"], latents)

    def gather_rotary(self, rotary, index, text_tokens):
        return self.gather_shared_rotary(rotary, index, text_rows=text_tokens)

    def pool_rotary(self, rotary, groups, count, text_tokens):
        return self.pool_shared_rotary(rotary, groups, count, text_rows=text_tokens)
