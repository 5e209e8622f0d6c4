"""HunyuanVideo: image tokens FIRST, then text, in one attention; dual- then single-stream blocks.

The processor concatenates [image, text] (the single-stream blocks too), contrary to Flux. The
rotary table (cos, sin) has one (N, head_dim) row per image token and no text rows; diffusers'
`apply_rotary_emb` indexes it as `cos[None, :, None, :]`, which only works for a 2-D table, so a
token subset must be shared by the batch (`per_sample_positions = False`). The model builds a
boolean `attention_mask` (B, 1, 1, N + T) over image then text keys (text padding masked out); its
image columns are gathered with the tokens (pooled: a group passes where any member does) and its
text columns kept. The token refiner works on text only and is not among `blocks()`.

Image-to-video with `image_condition_type="token_replace"` modulates the first `num_tokens` image
tokens (the first latent frame) differently; a gathered subset passes the number of kept
first-frame tokens, which must come first in the index (a sorted index does); a pooled block, the
number of groups whose first token is in the first frame.
"""

from __future__ import annotations

import torch
from diffusers import HunyuanVideoTransformer3DModel

from ..tokens import gather_tokens, pool_key_mask
from .base import BlockSignature
from .dual_stream import DualStreamAdapter
from .registry import register_adapter


@register_adapter
class HunyuanVideoAdapter(DualStreamAdapter):
    family = "hunyuan_video"
    transformer_class = HunyuanVideoTransformer3DModel
    text_placement = "image_first"
    positions = "rotary"
    per_sample_positions = False
    output_layout = "BCFHW"
    default_text_tokens = 256
    guidance_by_default = False

    def block_signature(self, block):
        rotary = "image_rotary_emb" if self._is_single(block) else "freqs_cis"
        return BlockSignature(rotary_arg=rotary, mask_arg="attention_mask", output_hidden_index=0)

    def attention_layout(self, block, attention):
        return "image_text"

    def patch_size(self):
        config = self.transformer.config
        return (config.patch_size_t, config.patch_size, config.patch_size)

    def gather_mask(self, mask, index, text_tokens):
        image = mask.shape[-1] - text_tokens
        kept = gather_tokens(mask[..., :image], index, dim=mask.ndim - 1)
        return torch.cat([kept, mask[..., image:]], dim=-1)

    def gather_block_inputs(self, block, bound, index, text_tokens, gather_hidden):
        bound = super().gather_block_inputs(block, bound, index, text_tokens, gather_hidden)
        first_frame = bound.get("num_tokens")
        if first_frame is not None:  # token_replace blocks (image-to-video)
            if index.ndim != 1:
                raise ValueError("HunyuanVideo token subsets must be shared by the batch")
            bound["num_tokens"] = _first_frame_count(index, first_frame, "the kept first-frame tokens first in "
                                                     "the gathered subset (use a sorted index)")
        return bound

    def gather_rotary(self, rotary, index, text_tokens):
        return self.gather_shared_rotary(rotary, index)

    def pool_mask(self, mask, groups, count, text_tokens):
        image = mask.shape[-1] - text_tokens
        return torch.cat([pool_key_mask(mask[..., :image], groups, count), mask[..., image:]], dim=-1)

    def pool_rotary(self, rotary, groups, count, text_tokens):
        return self.pool_shared_rotary(rotary, groups, count)

    def pool_block_inputs(self, block, bound, groups, count, text_tokens):
        bound = super().pool_block_inputs(block, bound, groups, count, text_tokens)
        first_frame = bound.get("num_tokens")
        if first_frame is not None:  # token_replace blocks: a group is first-frame when its first token is
            members = torch.arange(groups.shape[-1], device=groups.device)
            first = members.new_full((count,), groups.shape[-1]).scatter_reduce_(0, groups, members, "amin")
            bound["num_tokens"] = _first_frame_count(first, first_frame, "the first-frame groups first (number "
                                                     "the groups by their first token)")
        return bound


def _first_frame_count(positions: torch.Tensor, first_frame: int, order: str) -> int:
    """How many of the tokens at `positions` (grid positions, in sequence order) lie in the first
    frame, which token_replace blocks take as a leading run of that length."""
    is_first = positions < first_frame
    kept = int(is_first.sum())
    if not bool(is_first[:kept].all()):
        raise ValueError(f"HunyuanVideo token_replace blocks need {order}")
    return kept
