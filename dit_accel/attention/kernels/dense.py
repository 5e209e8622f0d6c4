"""Dense attention with an optional per-key bias, and attention with its log-sum-exp.

`attention` is what every dense part of stages 5-6 runs: torch's SDPA under whatever kernel context
the processor's backend opened. A per-key bias (stage 5's log counts) reaches SDPA as an additive
mask, which CUDA's flash kernel refuses: where the open context allows no kernel that takes one
(diffusers' `_native_flash`), the call widens it by the memory-efficient and math kernels, and SDPA's
own dispatcher picks (on CPU flash takes masks and is still picked). A bias with one column is the
same for every key and cancels in the softmax, so it is dropped and flash stays usable.

`with_lse` returns each query's log-sum-exp beside its output, for the exact merges of partial
attentions (`merge.merge`). Its implementations, chosen once per device (`lse_kernel`), never per call:
`fused_cpu` (torch's fused CPU kernel, which returns the LSE and takes masks), `efficient` (CUDA's
memory-efficient kernel with `compute_log_sumexp`; its LSE is padded past the queries and sliced
back) and `chunked` (plain ops, the logits materialised a chunk of queries at a time, the chunk sized
by batch x heads x rows x keys).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, _cur_sdpa_kernel_backends, sdpa_kernel

from ..merge import attention_with_lse

#: torch's own SDPA, captured before any routing replaces the attribute
_SDPA = F.scaled_dot_product_attention
#: SDPA kernels that take an additive mask on every device
_BIAS_KERNELS = (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
#: elements of one chunk's logits in `chunked` (batch x heads x rows x keys): 64 MiB of fp32
CHUNK_ELEMENTS = 1 << 24

LseName = Literal["fused_cpu", "efficient", "chunked"]
#: with_lse(query, key, value, bias=None, scale=None, every_query_has_keys=False) -> (output, lse)
LseKernel = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def mask_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as additive logits: a bool mask (True = attend) becomes 0 / -inf."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def flash_only() -> bool:
    """Whether the open SDPA context allows no kernel that takes an additive mask on every device."""
    return not any(backend in _BIAS_KERNELS for backend in _cur_sdpa_kernel_backends())


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None,
              **sdpa_kwargs) -> torch.Tensor:
    """Dense SDPA; `bias` (broadcastable to (B, H, 1, K)) is added to every query's logits for its key,
    e.g. log(count) for a key that stands for `count` pooled keys."""
    if bias is None or bias.shape[-1] == 1:  # the same for every key: cancels in the softmax
        return _SDPA(query, key, value, **sdpa_kwargs)
    mask = sdpa_kwargs.pop("attn_mask", None)
    bias = bias.to(query.dtype)
    sdpa_kwargs["attn_mask"] = bias if mask is None else mask_bias(mask, query.dtype) + bias
    if not flash_only():
        return _SDPA(query, key, value, **sdpa_kwargs)
    with sdpa_kernel([*_cur_sdpa_kernel_backends(), *_BIAS_KERNELS]):
        return _SDPA(query, key, value, **sdpa_kwargs)


def _without_dead_rows(out: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor | None,
                       every_query_has_keys: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """lse -inf and output 0 for a query whose keys the bias removes all of (fused kernels report
    another lse there, which a merge would weigh); no host sync."""
    if bias is None or every_query_has_keys:
        return out, lse
    alive = (bias > float("-inf")).any(-1).expand_as(lse)
    return out.masked_fill(~alive.unsqueeze(-1), 0.0), lse.masked_fill(~alive, float("-inf"))


def fused_cpu(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None,
              scale: float | None = None, every_query_has_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(output (B, H, Q, D), lse (B, H, Q) fp32) through torch's fused CPU kernel, which takes 4-D inputs in
    fp32/bf16/fp16 and an fp32 additive `bias` (-inf removes a key) whatever the inputs' dtype."""
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return chunked(query, key, value, bias, scale, every_query_has_keys)
    if bias is not None and bias.dtype not in (torch.float32, query.dtype):
        bias = bias.float()
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                         attn_mask=bias, scale=scale)
    return _without_dead_rows(out, lse, bias, every_query_has_keys)


def efficient(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None,
              scale: float | None = None, every_query_has_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The same through CUDA's memory-efficient kernel, which takes an additive bias in the inputs' dtype
    with its last dimension's storage aligned to 8 elements, and pads its LSE past the queries."""
    batch, heads, queries, _ = query.shape
    keys = key.shape[2]
    if bias is not None:
        bias = bias.to(query.dtype)
        if keys % 8:  # the kernel reads whole aligned rows: pad the storage, keep the view
            bias = F.pad(bias, (0, 8 - keys % 8))[..., :keys]
        bias = bias.expand(batch, heads, queries, keys)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0, False,
                                                                      scale=scale)[:2]
    return _without_dead_rows(out, lse[..., :queries], bias, every_query_has_keys)


def chunked(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor | None = None,
            scale: float | None = None, every_query_has_keys: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The same from materialised fp32 logits (`merge.attention_with_lse`), a chunk of query rows at a
    time so that one chunk's logits hold at most `CHUNK_ELEMENTS` (batch x heads x rows x keys)."""
    batch, heads, queries, _ = query.shape
    rows = max(1, CHUNK_ELEMENTS // (batch * heads * key.shape[2]))
    parts = []
    for start in range(0, queries, rows):
        rows_bias = bias if bias is None or bias.shape[-2] == 1 else bias[..., start:start + rows, :]
        parts.append(attention_with_lse(query[:, :, start:start + rows], key, value, rows_bias, scale=scale))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([out for out, _ in parts], 2), torch.cat([lse for _, lse in parts], 2)


_LSE: dict[str, LseKernel] = {"fused_cpu": fused_cpu, "efficient": efficient, "chunked": chunked}


def lse_kernel(device: torch.device, name: LseName | None = None) -> LseKernel:
    """The `with_lse` implementation for `device` (or the one named): once per technique and device."""
    if name is None:
        name = {"cpu": "fused_cpu", "cuda": "efficient"}.get(torch.device(device).type, "chunked")
    return _LSE[name]
