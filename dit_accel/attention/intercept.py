"""Run stages 5 and 6 in place of SDPA inside any diffusers attention processor.

diffusers processors project, normalise and rotate q/k/v themselves and then call
`torch.nn.functional.scaled_dot_product_attention`, directly or through the native backends of
`dispatch_attention_fn` (which look the function up on `torch.nn.functional` at call time). While one
of our attention modules runs, `routed_sdpa` points that attribute at a router that hands the ready
q/k/v (B, H, S, D) to the plan's handler, in the calling thread only (other threads reach the real
SDPA), and puts the attribute back afterwards. No processor code is copied; every family whose
processor ends in SDPA is covered, at the cost of one Python call per attention. The handler's own
dense attention calls `dense_attention`, which runs the real SDPA under whatever kernel context the
processor's backend opened (`_native_math`, `_native_flash`, ...; `kernels/dense.py`). Under
`torch.compile` the router is traced: a routed call becomes one `dit_accel::routed_attention` custom op
(the handler runs eagerly inside it), so a compiled block has no graph break at its attention.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..models.base import AttentionLayout
from .kernels import dense
from .kernels.dense import mask_bias as mask_bias  # re-exported: stage 5-6 code reads it here

_SDPA = F.scaled_dot_product_attention
_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_local = threading.local()
_lock = threading.Lock()
_routers = 0

#: handler(query, key, value, **sdpa_kwargs) -> output, in place of one SDPA call
Handler = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class AttentionCall:
    """Which attention is running, and where its text tokens sit."""

    layout: AttentionLayout
    text_tokens: int
    block_index: int
    #: position of this attention among its block's self-attentions
    attention_index: int

    def image_slice(self, length: int) -> slice:
        """Slice of the image tokens in a q/k/v sequence of `length` tokens."""
        if self.layout == "text_image":
            return slice(self.text_tokens, length)
        if self.layout == "image_text":
            return slice(0, length - self.text_tokens)
        return slice(0, length)


def _route(query, key, value, **kwargs) -> torch.Tensor:
    handler = getattr(_local, "handler", None)
    if handler is None:
        return _SDPA(query, key, value, **kwargs)
    _local.calls[0] += 1
    return handler(query, key, value, **kwargs)


def borrowed_inputs() -> bool:
    """Whether the q/k/v of the SDPA call being routed belong to a compiled graph, which may reuse their memory
    once the call returns: a stage that keeps one past the call (RAS's K/V cache) keeps a copy."""
    return getattr(_local, "borrowed", False)


@torch.library.custom_op("dit_accel::routed_attention", mutates_args=())
def routed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None,
                     dropout_p: float, is_causal: bool, scale: float | None, enable_gqa: bool) -> torch.Tensor:
    """One SDPA call handed to this thread's handler, as one opaque node of a compiled graph: the plan's
    stages 5-6 (Python that plans, caches and picks kernels) run eagerly inside it. Its output is
    contiguous, as the compiled graph expects of an opaque op."""
    _local.borrowed = True
    try:
        return _route(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                      scale=scale, enable_gqa=enable_gqa).contiguous()
    finally:
        _local.borrowed = False


@routed_attention.register_fake
def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    return query.new_empty((*query.shape[:-1], value.shape[-1]))


def _router(query, key, value, *args, **kwargs):
    """What `F.scaled_dot_product_attention` is while a routed block runs: traceable by dynamo (a compiled
    block records one `routed_attention` node); eager calls go to the handler directly (and keep autograd)."""
    kwargs.update(zip(_SDPA_ARGS, args))
    if torch.compiler.is_compiling():
        return routed_attention(query, key, value, kwargs.get("attn_mask"), kwargs.get("dropout_p", 0.0),
                                kwargs.get("is_causal", False), kwargs.get("scale"), kwargs.get("enable_gqa", False))
    return _route(query, key, value, **kwargs)


@contextlib.contextmanager
def routed_sdpa(handler: Handler) -> Iterator[list[int]]:
    """Within the block (an attention module, or a whole transformer block), this thread's SDPA calls go to
    `handler` (other threads reach the real SDPA through the same function); yields `[number of calls routed]`."""
    global _routers
    with _lock:
        _routers += 1
        F.scaled_dot_product_attention = _router
    outer = getattr(_local, "handler", None), getattr(_local, "calls", None)
    _local.handler, _local.calls = handler, [0]
    try:
        yield _local.calls
    finally:
        _local.handler, _local.calls = outer
        with _lock:
            _routers -= 1
            if _routers == 0:
                F.scaled_dot_product_attention = _SDPA


def per_key(mask: torch.Tensor | None) -> bool:
    """Whether an attention mask is the same for every query (e.g. text padding), so that it can travel
    with the keys when they are pooled, permuted or windowed."""
    return mask is None or mask.ndim < 2 or mask.shape[-2] == 1


def resize_key_mask(mask: torch.Tensor | None, keys: int, image: slice, image_keys: int) -> torch.Tensor | None:
    """A per-key mask over `keys` keys for a key set whose image part `image` now holds `image_keys`
    keys (cached or pooled ones); the image keys keep the mask's value for the first image key."""
    if mask is None or mask.shape[-1] != keys:
        return mask
    columns = mask[..., image][..., :1].expand(*mask.shape[:-1], image_keys)
    return torch.cat([mask[..., : image.start], columns, mask[..., image.stop:]], -1)


def dense_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None,
                    **sdpa_kwargs) -> torch.Tensor:
    """Dense SDPA; `bias` (broadcastable to (B, H, 1, K)) is added to every query's logits for its key,
    e.g. log(count) for a key that stands for `count` pooled keys (`kernels.dense.attention`)."""
    return dense.attention(query, key, value, bias, **sdpa_kwargs)
