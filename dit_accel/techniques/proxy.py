"""Training-free proxy-token attention (after Qihoo-T2X / PT-DiT, arXiv 2409.04005), stage 6.

PT-DiT trains new proxy attention modules; this keeps a pretrained model's queries, keys and values
and changes only which keys each query sees: every image query attends exactly to its local
(frames, rows, cols) window and to all text tokens, and to the rest of the grid through one proxy
per `proxy_window` (the mean key and value of that window, logit biased by log(its size)). The
parts merge by log-sum-exp (`attention.proxy_kernel`). Windows can shift by half on every other block
(Swin), so window borders do not stay fixed. Text queries attend densely; cross-attention is
untouched. With RAS the queries are the tokens RAS computes and the keys its full-length cache.

The window kernel (`attention/kernels/windows.py`) is chosen once per device from `kernel`: "auto" is
`flex` (one compiled FlexAttention call) on CUDA and `torch` (a batched SDPA over the windows plus
one fused SDPA over the proxies, merged by LSE) on CPU, where it measured faster at every size tried
(medium:wan's layer, 4,096 tokens: 2.64x over dense against flex's 1.81x; 16,384 tokens: 3.47x
against 2.26x; docs/BENCHMARKS.md). FlashInfer has no kernel for windows plus biased proxies: refused by name.

A layer where windows cannot save runs dense, decided from the grid before any window is placed
(`why_no_saving`): one local window holds the whole grid, or the padded windows, proxies and text
would attend more than 1 - `MIN_SAVING` (90%) of the dense pairs. `report()` counts those layers per call
(`dense_layers`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..attention import proxy_kernel
from ..attention.intercept import dense_attention
from ..attention.kernels import KernelName
from ..attention.kernels.dense import lse_kernel
from ..attention.kernels.windows import FlexWindows, TorchWindows, WindowPlan, window_kernel
from ..config import AccelerationConfig, ConfigError, Stage, param
from ..runtime.call_state import CallState
from ..runtime.registry import register_technique
from ..runtime.search_space import every_preset
from .sparse_attention import MIN_SAVING, SparseAttention


@dataclass(frozen=True)
class ProxyAttentionConfig(AccelerationConfig):
    """Exact local-window attention plus one pooled proxy per other window, merged by LSE."""

    local_window: tuple[int, int, int] = param((1, 8, 8), "(frames, rows, cols) window each query attends "
                                                          "exactly; clipped to the grid", low=1)
    proxy_window: tuple[int, int, int] = param((1, 2, 2), "(frames, rows, cols) tokens one proxy stands for; "
                                                          "divides local_window; (1, 1, 1) is dense", low=1)
    shift_windows: bool = param(False, "shift windows by half a local window on every other block (Swin)")
    dense_first_blocks: float = param(0.03, "fraction of blocks (from the first) kept dense", low=0.0, high=1.0)
    dense_warmup: float = param(0.2, "fraction of steps (from the first) kept dense", low=0.0, high=1.0)
    plan_every_layer: bool = param(False, "run windows and proxies on every layer, also where that cannot save "
                                          "(too few tokens, density near 1); False runs those dense at no overhead")
    kernel: KernelName = param("auto", "window-attention kernel: auto (flex on CUDA, torch on CPU), torch, flex; "
                                       "flashinfer has none for proxies")

    name = "proxy"
    #: measured on the reference video model (4 captions, CFG 4, 20 steps): PSNR vs dense about
    #: 32 / 29 / 27 dB; its first block and early steps are where windows cost most quality
    presets = {
        "quality": dict(dense_warmup=0.5, dense_first_blocks=0.25),
        "balanced": dict(dense_warmup=0.4, dense_first_blocks=0.25),
        "fast": dict(dense_warmup=0.3, dense_first_blocks=0.25),
    }

    def validate(self) -> None:
        if self.kernel == "flashinfer":
            raise ConfigError("ProxyAttentionConfig.kernel 'flashinfer': FlashInfer has no kernel for local windows plus "
                              "log-size-biased proxies; use 'auto', 'torch' or 'flex'")
        if any(w % p for w, p in zip(self.local_window, self.proxy_window)):
            raise ConfigError(f"ProxyAttentionConfig.local_window {self.local_window} must be a whole number of "
                              f"proxy windows {self.proxy_window} in every dimension")

    def stages(self) -> frozenset[Stage]:
        return frozenset({Stage.ATTENTION_KERNEL})

    @classmethod
    def keep_all(cls) -> "ProxyAttentionConfig":
        """Proxies of one token from the first step and block on: windows, the local and proxy
        attentions and their LSE merge all run, and the result is dense attention."""
        return cls(proxy_window=(1, 1, 1), dense_first_blocks=0.0, dense_warmup=0.0, plan_every_layer=True)


def _split(x: torch.Tensor, part: slice, dim: int = 2) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(image tokens, text tokens or None) of a sequence along `dim`."""
    text = [x.narrow(dim, 0, part.start), x.narrow(dim, part.stop, x.shape[dim] - part.stop)]
    text = [t for t in text if t.shape[dim]]
    return x.narrow(dim, part.start, part.stop - part.start), torch.cat(text, dim) if text else None


@register_technique(ProxyAttentionConfig, "proxy-token attention: exact local windows, one proxy per other window",
                    search_space=every_preset(ProxyAttentionConfig))
class ProxyAttention(SparseAttention):
    def __init__(self, config: ProxyAttentionConfig, session):
        super().__init__(config, session)
        #: window plans: of the whole grid across calls, of a call's token set for that call
        self._layouts: dict[tuple, WindowPlan] = {}
        #: the window kernel per device, chosen at its first call there
        self._kernels: dict[torch.device, TorchWindows | FlexWindows] = {}

    def begin_call(self, call_state: CallState) -> None:
        super().begin_call(call_state)
        self._layouts = {k: v for k, v in self._layouts.items() if k[0] == "grid"}

    def end_run(self) -> None:
        self._layouts.clear()

    @staticmethod
    def _coordinates(call_state: CallState, count: int) -> tuple[tuple, torch.Tensor] | None:
        """(cache key, (S, count, 3) coordinates) of `count` image tokens, or None if they cannot be placed."""
        placed = call_state.placed(count)
        if placed is None:
            return None
        key, tokens = placed
        coordinates = tokens.coordinates()
        return key, coordinates.unsqueeze(0) if tokens.shared else coordinates

    def _plan(self, call_state: CallState, call, queries: int, keys: int, device) -> WindowPlan | None:
        q_place, k_place = self._coordinates(call_state, queries), self._coordinates(call_state, keys)
        if q_place is None or k_place is None:
            return None
        shifted = self.config.shift_windows and call.block_index % 2 == 1
        cache_key = ("grid" if q_place[0][0] == k_place[0][0] == "grid" else "call", q_place[0], k_place[0],
                     shifted, device)
        plan = self._layouts.get(cache_key)
        if plan is None:
            grid = call_state.grid
            windows = proxy_kernel.place(q_place[1].to(device), k_place[1].to(device),
                                         (grid.frames, grid.rows, grid.cols), self.config.local_window,
                                         self.config.proxy_window, shifted)
            plan = self._layouts[cache_key] = WindowPlan.of(windows)
        return plan

    def _kernel(self, device: torch.device) -> TorchWindows | FlexWindows:
        kernel = self._kernels.get(device)
        if kernel is None:
            kernel = self._kernels[device] = window_kernel(self.config.kernel, device, lse_kernel(device))
        return kernel

    def why_no_saving(self, call_state, call, queries, keys):
        """The pairs the window kernel computes, from the grid alone: the padded local windows, every
        image query against every proxy and text key, the text queries against everything."""
        grid = call_state.grid
        extent = (grid.frames, grid.rows, grid.cols)
        local = [min(w, e) for w, e in zip(self.config.local_window, extent)]
        proxy_size = [min(p, w) for p, w in zip(self.config.proxy_window, local)]
        shifted = self.config.shift_windows and call.block_index % 2 == 1
        shift = [(w // 2 // p) * p if shifted and w < e else 0 for w, p, e in zip(local, proxy_size, extent)]
        local_windows = math.prod((e - 1 + s) // w + 1 for e, s, w in zip(extent, shift, local))
        if local_windows == 1:
            return "too few tokens"  # one local window holds the grid: its exact part is dense attention
        q_image, k_image = call.image_slice(queries), call.image_slice(keys)
        image_q, image_k = q_image.stop - q_image.start, k_image.stop - k_image.start
        width = math.prod(local)  # a full local window: the padded layout's width on the whole grid
        exact = local_windows * width * width * (image_q / grid.num_tokens) * (image_k / grid.num_tokens)
        proxies = math.prod(-(-e // p) for e, p in zip(extent, proxy_size))
        pairs = exact + image_q * (proxies + keys - image_k) + (queries - image_q) * keys
        return f"saves under {MIN_SAVING:.0%} of the pairs" if pairs > (1 - MIN_SAVING) * queries * keys else None

    def sparse(self, call_state, call, query, key, value, key_bias, scale):
        q_part, k_part = call.image_slice(query.shape[2]), call.image_slice(key.shape[2])
        image_q, text_q = _split(query, q_part)
        image_k, text_k = _split(key, k_part)
        image_v, text_v = _split(value, k_part)
        plan = self._plan(call_state, call, image_q.shape[2], image_k.shape[2], query.device)
        if plan is None:
            return None
        image_bias = text_bias = None
        if key_bias is not None:
            image_bias, text_bias = _split(key_bias, k_part, dim=-1)
        out, pairs = self._kernel(query.device)(image_q, image_k, image_v, plan, image_bias, text_k, text_v, text_bias,
                                                scale)
        if text_q is None:
            return out, pairs
        text_out = dense_attention(text_q, key, value, key_bias, scale=scale)
        before = q_part.start
        out = torch.cat([text_out[:, :, :before], out, text_out[:, :, before:]], 2)
        return out, pairs + text_q.shape[2] * key.shape[2]
