"""Run a technique's attention in place of SDPA inside any diffusers attention processor.

diffusers processors project, normalise and rotate q/k/v themselves and then call
`torch.nn.functional.scaled_dot_product_attention`, directly or through the "native" backend of
`dispatch_attention_fn`. A `TorchFunctionMode` active only while one attention module runs catches
that call and hands the ready q/k/v (B, H, S, D) to an `AttentionCore`. No processor code is copied,
and every family whose processor ends in SDPA is covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..models.base import AttentionLayout


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


SDPA = Callable[..., torch.Tensor]


class AttentionCore(Protocol):
    """A replacement for SDPA. `next_sdpa` is the rest of the chain (dense SDPA at its end)."""

    def __call__(self, call: AttentionCall, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 next_sdpa: SDPA, **sdpa_kwargs) -> torch.Tensor: ...


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _SDPAInterceptor(TorchFunctionMode):
    def __init__(self, handler: SDPA):
        super().__init__()
        self.handler = handler
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            self.calls += 1
            named = dict(zip(_SDPA_ARGS, args))
            named.update(kwargs)
            return self.handler(named.pop("query"), named.pop("key"), named.pop("value"), **named)
        return func(*args, **kwargs)


def run_with_cores(forward: Callable, cores: list[AttentionCore], call: AttentionCall, *args, **kwargs):
    """Run `forward(*args, **kwargs)` with its SDPA call routed through `cores` (first core outermost)."""

    def chain(position: int) -> SDPA:
        if position == len(cores):
            return F.scaled_dot_product_attention

        def sdpa(query, key, value, **sdpa_kwargs):
            return cores[position](call, query, key, value, chain(position + 1), **sdpa_kwargs)

        return sdpa

    interceptor = _SDPAInterceptor(chain(0))
    with interceptor:
        output = forward(*args, **kwargs)
    if interceptor.calls == 0:
        raise RuntimeError(
            "dit-accel attention techniques need the attention processor to call "
            "torch.nn.functional.scaled_dot_product_attention (diffusers' 'native' attention backend); "
            "this attention module used another kernel. Call `transformer.reset_attention_backend()`."
        )
    return output
