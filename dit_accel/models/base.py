"""The adapter contract: everything a technique may need to know about one transformer family.

Techniques never look at class names. They ask the adapter of the transformer they are applied to:
which blocks run in which order, where the image tokens are in each block call and in each
attention call, the token grid of the current call, how positions reach the blocks, how to gather a
subset of image tokens (rotary rows and masks included) and how to put them back, how to pool them
into groups (rotary tables at the groups' mean positions), and how the model output maps to tokens.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

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
    timestep: torch.Tensor
    latents: torch.Tensor
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


@dataclass(frozen=True)
class HeadSlices:
    """Where one attention's heads sit in its block's weights, so that whole heads can be sliced out.

    `rows`: linears whose output features are grouped by head (q, k, v and the text stream's
    projections); `norms`: normalisations spanning all heads at once (Wan's `norm_q` over
    heads * head_dim), whose linears stay at full width and whose outputs are sliced instead;
    `columns`: (linear, offset) pairs whose input features from `offset` on are the heads' outputs.
    """

    attention: nn.Module
    heads: int
    head_dim: int
    rows: tuple[nn.Linear, ...]
    norms: tuple[nn.Module, ...]
    columns: tuple[tuple[nn.Linear, int], ...]


@dataclass(frozen=True)
class ChannelSlices:
    """An MLP's hidden channels: `rows` produce them (both halves of a gated activation when `gated`),
    `columns` (linear, offset) read them; `module` maps tokens to tokens one by one (None where the
    MLP is fused with the attention output, as in single-stream blocks)."""

    hidden: int
    rows: tuple[nn.Linear, ...]
    columns: tuple[tuple[nn.Linear, int], ...]
    module: nn.Module | None
    gated: bool = False


@dataclass(frozen=True)
class WidthLayout:
    """The heads and MLP channels of one block that stage 4 may narrow."""

    attentions: tuple[HeadSlices, ...]
    mlp: ChannelSlices | None


class UnsupportedModelError(TypeError):
    """Raised for a transformer no adapter knows."""


def _flat_rows(index: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """Row numbers in a (batch * length, ...) view of the tokens `index` selects, (B, n) or (n,)."""
    offsets = torch.arange(batch, device=index.device).mul_(length).unsqueeze(1)
    return (offsets + (index if index.ndim == 2 else index.unsqueeze(0))).reshape(-1)


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Select `index` along the token dimension `dim`: (n,) shared by the batch or (B, n) per sample.

    A per-sample index on a batch-shared table (batch 1, e.g. rotary rows) gives a per-sample table.
    """
    if index.ndim == 1:
        return tokens.index_select(dim, index)
    batch, kept = index.shape
    if tokens.shape[0] != batch:
        tokens = tokens.expand(batch, *tokens.shape[1:])
    if dim == 1:
        rows = tokens.reshape(batch * tokens.shape[1], *tokens.shape[2:])
        return rows.index_select(0, _flat_rows(index, batch, tokens.shape[1])).view(batch, kept, *tokens.shape[2:])
    view = [1] * tokens.ndim
    view[0], view[dim] = batch, kept
    target = list(tokens.shape)
    target[dim] = kept
    return tokens.gather(dim, index.reshape(view).expand(target))


def scatter_tokens(full: torch.Tensor, index: torch.Tensor, part: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Return a copy of `full` whose rows `index` along `dim` are replaced by `part`."""
    part = part.to(full.dtype)
    if index.ndim == 1:
        return full.index_copy(dim, index, part)
    if dim == 1:
        batch, length = full.shape[:2]
        rows = full.clone(memory_format=torch.contiguous_format).view(batch * length, *full.shape[2:])
        rows.index_copy_(0, _flat_rows(index, batch, length), part.reshape(-1, *full.shape[2:]))
        return rows.view(full.shape)
    view = [1] * full.ndim
    view[0], view[dim] = index.shape[0], index.shape[1]
    return full.scatter(dim, index.reshape(view).expand_as(part), part)


def pool_tokens(tokens: torch.Tensor, groups: torch.Tensor, count: int, dim: int = 1) -> torch.Tensor:
    """The mean token of each of `count` groups along `dim`; `groups` gives every token's group, (n,)
    shared by the batch or (B, n) per sample (on a batch-shared table, batch 1, a per-sample table).
    Every group must have a member. Index-adds, not `scatter_reduce` (10x slower on CPU)."""
    if groups.ndim == 1:
        total = tokens.new_zeros(*tokens.shape[:dim], count, *tokens.shape[dim + 1:]).index_add_(dim, groups, tokens)
        sizes = torch.bincount(groups, minlength=count).view(count, *[1] * (tokens.ndim - dim - 1))
        return total / sizes.to(tokens.dtype)
    if dim != 1:
        raise ValueError("per-sample groups pool along the token dimension 1")
    batch, length = groups.shape
    if tokens.shape[0] != batch:
        tokens = tokens.expand(batch, *tokens.shape[1:])
    rows = _flat_rows(groups, batch, count)
    rest = tokens.shape[2:]
    total = tokens.new_zeros(batch * count, *rest).index_add_(0, rows, tokens.reshape(batch * length, *rest))
    sizes = torch.bincount(rows, minlength=batch * count).view(-1, *[1] * len(rest))
    return (total / sizes.to(tokens.dtype)).view(batch, count, *rest)


def pool_rotation(cos: torch.Tensor, sin: torch.Tensor, groups: torch.Tensor, count: int,
                  dim: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) tables at each group's mean angle: every column's (cos, sin) pair averaged over the
    group and made unit length again, so the rotation stays a rotation. For positions symmetric about
    their mean (spread below a quarter turn) this is exactly the rotation at the mean position; a
    column whose angles cancel stays unrotated."""
    cos, sin = pool_tokens(cos, groups, count, dim), pool_tokens(sin, groups, count, dim)
    norm = torch.hypot(cos, sin)
    cancelled = norm < 1e-6
    norm = norm.clamp(min=1e-6)
    return torch.where(cancelled, 1.0, cos / norm), torch.where(cancelled, 0.0, sin / norm)


def pool_key_mask(mask: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    """A mask over image keys (last dimension; bool or additive) pooled by group: a group may be
    attended where any of its members may (the largest value)."""
    if groups.ndim == 2 and mask.shape[0] != groups.shape[0]:
        mask = mask.expand(groups.shape[0], *mask.shape[1:])
    view = [1] * mask.ndim
    view[-1] = groups.shape[-1]
    if groups.ndim == 2:
        view[0] = groups.shape[0]
    index = groups.reshape(view).expand_as(mask)
    return mask.new_zeros(*mask.shape[:-1], count).scatter_reduce_(-1, index, mask, "amax", include_self=False)


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


def _spans_heads(norm: nn.Module | None, inner_dim: int) -> bool:
    """Whether `norm` normalises all heads together (its shape is heads * head_dim, not head_dim)."""
    if norm is None:
        return False
    shape = getattr(norm, "normalized_shape", None) or getattr(norm, "dim", None)  # torch's norms, diffusers' RMSNorm
    if shape is None:
        weight = getattr(norm, "weight", None)
        return weight is not None and weight.numel() == inner_dim
    return math.prod(shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)) == inner_dim


def head_slices(attention: nn.Module, columns: tuple[tuple[nn.Linear, int], ...] | None = None) -> HeadSlices:
    """The head layout of a diffusers `Attention`; `columns` for one without its own `to_out`."""
    heads = attention.heads
    inner_dim = attention.to_q.out_features
    rows, norms = [], []
    for projection, norm in (("to_q", "norm_q"), ("to_k", "norm_k"), ("to_v", None),
                             ("add_q_proj", "norm_added_q"), ("add_k_proj", "norm_added_k"), ("add_v_proj", None)):
        linear = getattr(attention, projection, None)
        if linear is None:
            continue
        norm_module = getattr(attention, norm, None) if norm else None
        if _spans_heads(norm_module, inner_dim):
            norms.append(norm_module)
        else:
            rows.append(linear)
    if columns is None:
        columns = tuple((linear, 0) for linear in (attention.to_out[0], getattr(attention, "to_add_out", None))
                        if linear is not None)
    return HeadSlices(attention, heads, inner_dim // heads, tuple(rows), tuple(norms), columns)


def feed_forward_slices(ff: nn.Module) -> ChannelSlices:
    """A diffusers `FeedForward`: `net[0].proj` makes the hidden channels, its last linear reads them."""
    produce = ff.net[0].proj
    read = [m for m in ff.net if isinstance(m, nn.Linear)][-1]
    gated = produce.out_features == 2 * read.in_features
    return ChannelSlices(read.in_features, (produce,), ((read, 0),), ff, gated)


_REGISTRY: dict[type[nn.Module], type[ModelAdapter]] = {}


def _unwrap(module: nn.Module) -> nn.Module:
    """The model under `torch.compile`'s wrapper (hooks go on the real modules)."""
    return getattr(module, "_orig_mod", module)


def pipeline_transformers(target: Any) -> tuple[list[nn.Module], Any | None]:
    """The transformers of a diffusers pipeline (`transformer`, and Wan 2.2's `transformer_2`) and the
    pipeline, or a bare transformer and None; `torch.compile`'s wrappers unwrapped."""
    if isinstance(target, nn.Module):
        return [_unwrap(target)], None
    if not hasattr(target, "components"):
        raise TypeError(f"dit_accel.apply expects a diffusers pipeline or a transformer model, got {type(target).__name__}")
    transformer = getattr(target, "transformer", None)
    if transformer is None:
        raise TypeError(
            f"{type(target).__name__} has no `transformer` component: dit-accel accelerates diffusion-transformer "
            "pipelines (SD3, Flux, PixArt, DiT, Wan, HunyuanVideo, CogVideoX), not UNet ones"
        )
    second = getattr(target, "transformer_2", None)
    return [_unwrap(transformer)] + ([_unwrap(second)] if second is not None else []), target


def register_adapter(adapter_cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make `adapter_cls` the adapter of its `transformer_class`."""
    _REGISTRY[adapter_cls.transformer_class] = adapter_cls
    return adapter_cls


def supported_families() -> list[str]:
    return sorted({cls.family for cls in _REGISTRY.values()})


def adapter_for(transformer: nn.Module) -> ModelAdapter:
    """The adapter of `transformer`, found by its class (subclasses included)."""
    for klass in type(transformer).__mro__:
        if klass in _REGISTRY:
            return _REGISTRY[klass](transformer)
    names = ", ".join(f"{cls.transformer_class.__name__} ({cls.family})" for cls in _REGISTRY.values())
    raise UnsupportedModelError(
        f"dit-accel has no adapter for {type(transformer).__name__}. Supported transformers: {names}."
    )


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
