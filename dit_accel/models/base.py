"""The adapter contract: everything a technique may need to know about one transformer family.

Techniques never look at class names. They ask the adapter of the transformer they are applied to:
which blocks run in which order, where the image tokens are in each block call and in each
attention call, the token grid of the current call, how positions reach the blocks, how to gather a
subset of image tokens (rotary rows and masks included) and how to put them back, how to pool them
into groups (rotary tables at the groups' mean positions), and how the model output maps to tokens.

This file holds the data types of that contract and the `ModelAdapter` base with its shared
behaviour; the registry is in `registry.py`, the width layout (stage 4) in `width.py`, the token
tensor operations in `dit_accel/tokens.py`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..tokens import gather_tokens, pool_rotation, pool_tokens
from .width import WidthLayout, feed_forward_slices, head_slices

TextPlacement = Literal["image_first", "text_first", "cross_attention"]
PositionKind = Literal["absolute", "rotary"]
AttentionLayout = Literal["image_text", "text_image", "image", "cross"]
TokenStream = Literal["image", "text", "joint", "pooled"]


@dataclass(frozen=True)
class TokenGrid:
    """Image/video tokens of one transformer call after patching: frames x rows x cols."""

    frames: int
    rows: int
    cols: int

    @property
    def num_tokens(self) -> int:
        return self.frames * self.rows * self.cols


@dataclass(frozen=True)
class CallInfo:
    """What an adapter reads from one transformer call's arguments."""

    grid: TokenGrid
    batch_size: int
    text_tokens: int
    #: the call's own tensors; None in a finished call's record (`StepContext.without_tensors`)
    timestep: torch.Tensor | None
    latents: torch.Tensor | None
    #: blocks this call does not run (SD3's `skip_layers` for skip-layer guidance): nothing computes
    #: them, so neither the ledger nor the dense baseline counts them
    skipped_blocks: frozenset[int] = frozenset()


@dataclass(frozen=True)
class BlockSignature:
    """Where a block finds its inputs and puts its outputs.

    `hidden_arg` names the image-token argument, `text_arg` the text-token argument (None when the
    block has none), `rotary_arg` the rotary table argument (None for absolute positions), `mask_arg`
    an attention-mask argument whose last dimension spans image tokens. `output_hidden_index` is the
    position of the image tokens in the output tuple, None when the block returns a single tensor.
    """

    hidden_arg: str = "hidden_states"
    text_arg: str | None = "encoder_hidden_states"
    rotary_arg: str | None = None
    mask_arg: str | None = None
    output_hidden_index: int | None = None


class ModelAdapter:
    """Base adapter. Subclasses describe one transformer family; see `dit_accel/models/*.py`."""

    family: ClassVar[str]
    transformer_class: ClassVar[type[nn.Module]]
    text_placement: ClassVar[TextPlacement]
    positions: ClassVar[PositionKind]
    #: True when gathered rotary tables may differ per sample (the processor broadcasts over batch).
    per_sample_positions: ClassVar[bool] = True
    #: Layout of the model output: "BCHW", "BCFHW", "BFCHW" (channels/frames order) or "BNC" (tokens).
    output_layout: ClassVar[str]
    #: what the family's pipelines feed the transformer by default, for estimates before a call: text
    #: tokens, whether it runs an unconditional branch too (CFG), and latent pixels packed per token
    #: side beyond the patch (Flux packs 2 x 2 latents into one token)
    default_text_tokens: ClassVar[int] = 0
    guidance_by_default: ClassVar[bool] = True
    latent_packing: ClassVar[int] = 1

    def __init__(self, transformer: nn.Module):
        self.transformer = transformer
        self._signatures: dict[int, inspect.Signature] = {}

    # -- structure ---------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """The transformer blocks that process image tokens, in execution order."""
        raise NotImplementedError

    def block_signature(self, block: nn.Module) -> BlockSignature:
        raise NotImplementedError

    def self_attentions(self, block: nn.Module) -> list[nn.Module]:
        """The attention modules of `block` whose queries include the image tokens."""
        raise NotImplementedError

    def attention_layout(self, block: nn.Module, attention: nn.Module) -> AttentionLayout:
        """Order of image and text tokens in the sequence that `attention` hands to SDPA."""
        raise NotImplementedError

    def sdpa_call_layout(self, layout: AttentionLayout, call_index: int) -> AttentionLayout:
        """Layout of the `call_index`-th SDPA call of one forward of a self-attention whose own call has
        `layout`. Processors that add conditioning tokens (IP-Adapter image tokens in Flux and SD3) first
        run the attention itself, then attend its image queries to those tokens alone: "cross", which the
        techniques leave dense (and the ledger out, as the dense model does)."""
        return layout if call_index == 0 else "cross"

    def linear_streams(self, block: nn.Module) -> dict[str, TokenStream]:
        """Token stream each nn.Linear of `block` (by qualified name) applies to, for FLOPs."""
        raise NotImplementedError

    def attention_streams(self, block: nn.Module) -> list[tuple[nn.Module, TokenStream, TokenStream]]:
        """(attention, query stream, key stream) for every attention module of `block`, for FLOPs."""
        raise NotImplementedError

    def patch_size(self) -> tuple[int, int, int]:
        """(frames, rows, cols) patch size."""
        raise NotImplementedError

    def grid_for(self, height: int, width: int, num_frames: int = 1, spatial: int = 8, temporal: int = 4) -> TokenGrid:
        """The token grid of a pipeline call at `height` x `width` pixels (and `num_frames` for video),
        for a VAE that shrinks `spatial` times per side and `temporal` times in time."""
        pt, ph, pw = self.patch_size()
        side = spatial * self.latent_packing
        frames = (num_frames - 1) // temporal + 1 if self.output_layout in ("BCFHW", "BFCHW") else 1
        return TokenGrid(max(1, frames // pt), height // side // ph, width // side // pw)

    def hidden_size(self) -> int:
        """Width of the image tokens between blocks."""
        return self.self_attentions(self.blocks()[0])[0].to_q.in_features

    def activation_itemsize(self) -> int:
        """Bytes per element of the blocks' activations: their linears' dtype (some modules stay in fp32)."""
        return self.self_attentions(self.blocks()[0])[0].to_q.weight.element_size()

    def output_channels(self) -> int:
        """Width of one token of the model output (`output_to_tokens`)."""
        config = self.transformer.config
        return (getattr(config, "out_channels", None) or config.in_channels) * math.prod(self.patch_size())

    # -- one call ----------------------------------------------------------------------------
    def _signature(self, module: nn.Module) -> inspect.Signature:
        """The class's own `forward` signature, without `self`: an instance `forward` that another
        library swapped in (cache-dit, hook chains) may not say what the call's arguments are."""
        key = id(module)
        if key not in self._signatures:
            signature = inspect.signature(type(module).forward)
            self._signatures[key] = signature.replace(parameters=list(signature.parameters.values())[1:])
        return self._signatures[key]

    def bind(self, module: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Name every argument of a call of `module` (blocks are called positionally in some families)."""
        return dict(self._signature(module).bind(*args, **kwargs).arguments)

    def unbind(self, module: nn.Module, arguments: dict[str, Any]) -> tuple[tuple, dict]:
        """Inverse of `bind`: (args, kwargs) for calling `module`, `*args`/`**kwargs` included."""
        bound = inspect.BoundArguments(self._signature(module), arguments)
        return bound.args, bound.kwargs

    def latent_grid(self, latents: torch.Tensor) -> TokenGrid:
        """Token grid of latents laid out like the model output (`output_layout`), after patching."""
        pt, ph, pw = self.patch_size()
        if self.output_layout == "BCHW":
            return TokenGrid(1, latents.shape[-2] // ph, latents.shape[-1] // pw)
        frames = latents.shape[2] if self.output_layout == "BCFHW" else latents.shape[1]
        return TokenGrid(frames // pt, latents.shape[-2] // ph, latents.shape[-1] // pw)

    def call_info(self, args: tuple, kwargs: dict) -> CallInfo:
        """For transformers called with `hidden_states` latents, `timestep` and optional text."""
        bound = self.bind(self.transformer, args, kwargs)
        latents = bound["hidden_states"]
        text = bound.get("encoder_hidden_states")
        return CallInfo(self.latent_grid(latents), latents.shape[0], 0 if text is None else text.shape[1],
                        torch.as_tensor(bound["timestep"]), latents, self.skipped_blocks(bound))

    def skipped_blocks(self, arguments: dict[str, Any]) -> frozenset[int]:
        """Blocks a transformer call with these (bound) arguments does not run."""
        return frozenset()

    # -- gathering image tokens ----------------------------------------------------------------
    def gather_rotary(self, rotary: Any, index: torch.Tensor, text_tokens: int) -> Any:
        """Rows of the rotary table for the kept image tokens (text rows kept as they are)."""
        raise NotImplementedError

    def gather_shared_rotary(self, rotary: tuple[torch.Tensor, ...], index: torch.Tensor,
                             text_rows: int = 0) -> tuple[torch.Tensor, ...]:
        """Rows of (S, D) tables shared by the batch: `text_rows` leading text rows, then the kept
        image rows. Such tables cannot follow a per-sample index (`per_sample_positions = False`)."""
        if index.ndim != 1:
            raise ValueError(f"{self.family} rotary tables are shared by the batch: gather with one index for all samples")
        rows = index + text_rows
        if text_rows:
            rows = torch.cat([torch.arange(text_rows, device=index.device), rows])
        return tuple(table.index_select(0, rows) for table in rotary)

    def gather_mask(self, mask: torch.Tensor, index: torch.Tensor, text_tokens: int) -> torch.Tensor:
        raise NotImplementedError(f"{self.family} blocks take no attention mask over image tokens")

    def gather_block_inputs(self, block: nn.Module, bound: dict[str, Any], index: torch.Tensor,
                            text_tokens: int, gather_hidden: bool) -> dict[str, Any]:
        """Replace the block's inputs by those of the kept image tokens."""
        sig = self.block_signature(block)
        bound = dict(bound)
        if gather_hidden:
            bound[sig.hidden_arg] = gather_tokens(bound[sig.hidden_arg], index)
        if sig.rotary_arg is not None and bound.get(sig.rotary_arg) is not None:
            bound[sig.rotary_arg] = self.gather_rotary(bound[sig.rotary_arg], index, text_tokens)
        if sig.mask_arg is not None and bound.get(sig.mask_arg) is not None:
            bound[sig.mask_arg] = self.gather_mask(bound[sig.mask_arg], index, text_tokens)
        return bound

    # -- pooling image tokens (stage 3) --------------------------------------------------------------
    def pool_rotary(self, rotary: Any, groups: torch.Tensor, count: int, text_tokens: int) -> Any:
        """The rotary table of the pooled image tokens, at each group's mean position (`pool_rotation`;
        text rows kept as they are)."""
        raise NotImplementedError

    def pool_shared_rotary(self, rotary: tuple[torch.Tensor, torch.Tensor], groups: torch.Tensor, count: int,
                           text_rows: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) (S, D) tables shared by the batch, `text_rows` leading text rows then image rows,
        pooled over the image rows; such tables take only batch-shared groups."""
        if groups.ndim != 1:
            raise ValueError(f"{self.family} rotary tables are shared by the batch: pool with one grouping for all samples")
        cos, sin = rotary
        image = pool_rotation(cos[text_rows:], sin[text_rows:], groups, count, dim=0)
        return tuple(torch.cat([table[:text_rows], pooled]) for table, pooled in zip(rotary, image))

    def pool_mask(self, mask: torch.Tensor, groups: torch.Tensor, count: int, text_tokens: int) -> torch.Tensor:
        raise NotImplementedError(f"{self.family} blocks take no attention mask over image tokens")

    def pool_block_inputs(self, block: nn.Module, bound: dict[str, Any], groups: torch.Tensor, count: int,
                          text_tokens: int) -> dict[str, Any]:
        """Replace the block's image-token inputs by those of `count` groups of them (`groups`: every
        token's group, (n,) shared or (B, n) per sample): mean tokens, rotary tables at the groups'
        mean positions, masks that let a group through where any member passes. Absolute positions
        are in the hidden states already and are pooled with them."""
        sig = self.block_signature(block)
        bound = dict(bound)
        bound[sig.hidden_arg] = pool_tokens(bound[sig.hidden_arg], groups, count)
        if sig.rotary_arg is not None and bound.get(sig.rotary_arg) is not None:
            bound[sig.rotary_arg] = self.pool_rotary(bound[sig.rotary_arg], groups, count, text_tokens)
        if sig.mask_arg is not None and bound.get(sig.mask_arg) is not None:
            bound[sig.mask_arg] = self.pool_mask(bound[sig.mask_arg], groups, count, text_tokens)
        return bound

    # -- width (stage 4) ---------------------------------------------------------------------------
    def width_layout(self, block: nn.Module) -> WidthLayout:
        """Heads of each self-attention (diffusers' `Attention`: to_q/k/v, to_out, the text stream's
        add_*_proj/to_add_out) and the image MLP (`mlp_module`)."""
        attentions = tuple(head_slices(attention) for attention in self.self_attentions(block))
        mlp = self.mlp_module(block)
        return WidthLayout(attentions, None if mlp is None else feed_forward_slices(mlp))

    def mlp_module(self, block: nn.Module) -> nn.Module | None:
        """The block's token-wise MLP over image tokens (a diffusers `FeedForward`), None if it has none."""
        return getattr(block, "ff", None)

    def drops_text_output(self, block: nn.Module) -> bool:
        """Whether `block` returns None instead of text tokens (nothing after it reads them)."""
        return False

    def block_hidden_output(self, block: nn.Module, output: Any) -> torch.Tensor:
        index = self.block_signature(block).output_hidden_index
        return output if index is None else output[index]

    def replace_block_hidden_output(self, block: nn.Module, output: Any, hidden: torch.Tensor) -> Any:
        index = self.block_signature(block).output_hidden_index
        if index is None:
            return hidden
        output = list(output)
        output[index] = hidden
        return tuple(output)

    # -- model output <-> tokens -----------------------------------------------------------------
    def output_to_tokens(self, output: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """(B, N, C') per-token view of the transformer output, tokens in block order."""
        pt, ph, pw = self.patch_size()
        f, h, w = grid.frames, grid.rows, grid.cols
        layout = self.output_layout
        if layout == "BNC":
            return output
        if layout == "BCHW":
            b, c = output.shape[:2]
            x = output.reshape(b, c, h, ph, w, pw).permute(0, 2, 4, 3, 5, 1)
            return x.reshape(b, h * w, ph * pw * c)
        if layout in ("BCFHW", "BFCHW"):
            if layout == "BFCHW":
                output = output.transpose(1, 2)
            b, c = output.shape[:2]
            x = output.reshape(b, c, f, pt, h, ph, w, pw).permute(0, 2, 4, 6, 3, 5, 7, 1)
            return x.reshape(b, f * h * w, pt * ph * pw * c)
        raise ValueError(f"unknown output layout {layout!r}")

    def tokens_to_output(self, tokens: torch.Tensor, grid: TokenGrid) -> torch.Tensor:
        """Inverse of `output_to_tokens`."""
        pt, ph, pw = self.patch_size()
        f, h, w = grid.frames, grid.rows, grid.cols
        layout = self.output_layout
        b = tokens.shape[0]
        if layout == "BNC":
            return tokens
        if layout == "BCHW":
            c = tokens.shape[-1] // (ph * pw)
            x = tokens.reshape(b, h, w, ph, pw, c).permute(0, 5, 1, 3, 2, 4)
            return x.reshape(b, c, h * ph, w * pw)
        c = tokens.shape[-1] // (pt * ph * pw)
        x = tokens.reshape(b, f, h, w, pt, ph, pw, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        x = x.reshape(b, c, f * pt, h * ph, w * pw)
        return x.transpose(1, 2) if layout == "BFCHW" else x


def classify_linears(block: nn.Module, text: tuple[str, ...] = (), joint: tuple[str, ...] = ()) -> dict[str, TokenStream]:
    """Stream of every nn.Linear in `block` by name prefix.

    Modulation layers (inside a module whose name starts with "norm") see one vector per sample;
    names starting with a `text` prefix see text tokens, `joint` prefixes see text and image tokens,
    everything else sees image tokens. An attention processor's own linears (IP-Adapter's `to_k_ip`)
    project conditioning tokens outside the dense model and are left out, as their attention is.
    """
    streams: dict[str, TokenStream] = {}
    for name, module in block.named_modules():
        if not isinstance(module, nn.Linear) or ".processor." in f".{name}":
            continue
        if name.split(".")[0].startswith("norm"):
            streams[name] = "pooled"
        elif name.startswith(text):
            streams[name] = "text"
        elif name.startswith(joint):
            streams[name] = "joint"
        else:
            streams[name] = "image"
    return streams


#: Linears of an MMDiT joint block that run on the text stream (SD3, Flux and HunyuanVideo double blocks).
MMDIT_TEXT_LINEARS = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out", "ff_context")
