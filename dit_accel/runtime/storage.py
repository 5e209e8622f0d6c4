"""Big state a technique keeps between calls (RAS's K/V cache, DyDiT's MLP token cache), in the form
its config asks for, and what that form costs in bytes before anything runs.

- "device": the model's dtype on the model's device (exact);
- "fp8": float8 e4m3 with an fp32 scale per slice (`scale_dims` are reduced: per (sample, head) for
  a (B, H, S, D) cache, per token row for a (B, N, C) one), half the bytes of bf16;
- "host": the model's dtype in host memory (pinned on CUDA), copied back to the device on a side
  stream ahead of use (`prefetch`), so a cache read in block order never waits on the copy.

A stored tensor is loaded as a device tensor in the model's dtype, written in, and saved back; in
"device" form the loaded tensor is the stored one itself (no copy).
"""

from __future__ import annotations

from typing import Literal

import torch

StateStorage = Literal["device", "fp8", "host"]
STORAGES: tuple[str, ...] = ("device", "fp8", "host")

_FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(_FP8).max


#: the end of an estimate's kind whose bytes sit in host memory ("kv_cache@host")
_IN_HOST_MEMORY = "@host"


def in_host_memory(kind: str) -> bool:
    """Whether an estimate's `kind` (`Technique.estimate_bytes`) names bytes held in host memory."""
    return kind.endswith(_IN_HOST_MEMORY)


def stored_bytes(kind: str, numel: int, itemsize: int, storage: StateStorage, scales: int = 0) -> tuple[str, int]:
    """(the estimate's kind, bytes) of a tensor of `numel` elements (`itemsize` bytes each in the model's
    dtype) held as `kind` in `storage`: the kind marked as in host memory in "host" form; `scales`: how
    many fp32 scales its fp8 form keeps."""
    if storage == "fp8":
        return kind, numel + 4 * scales
    return (kind + _IN_HOST_MEMORY if storage == "host" else kind), numel * itemsize


class StoredTensor:
    """One tensor in `storage` form; `load()` gives it back in the model's dtype on the device."""

    def __init__(self, tensor: torch.Tensor, storage: StateStorage, scale_dims: tuple[int, ...] = (-1,)):
        self.storage, self.scale_dims = storage, scale_dims
        self._held: torch.Tensor | None = None
        self._scale: torch.Tensor | None = None
        #: "host": the device copy a `prefetch` started, and the event that says it arrived
        self._fetched: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self.save(tensor)

    def save(self, tensor: torch.Tensor) -> None:
        """Keep `tensor` (the model's dtype, on the device) as the stored value; it may differ in shape from
        the last one (DyDiT's next head bucket)."""
        self.dtype, self.device, self.shape = tensor.dtype, tensor.device, tensor.shape
        if self.storage == "device":
            self._held = tensor
        elif self.storage == "fp8":
            scale = tensor.detach().abs().amax(dim=self.scale_dims, keepdim=True).float().clamp(min=1e-12) / _FP8_MAX
            self._held, self._scale = (tensor.float() / scale).to(_FP8), scale
        else:
            self._held = _to_host(tensor, self._held)
        self._fetched = None

    def load(self) -> torch.Tensor:
        """The stored value in the model's dtype on the device (the held tensor itself in "device" form)."""
        if self.storage == "device":
            return self._held
        if self.storage == "fp8":
            return (self._held.float() * self._scale).to(self.dtype)
        if self._fetched is None:
            self.prefetch()
        fetched, arrived = self._fetched
        self._fetched = None
        if arrived is not None:
            torch.cuda.current_stream(self.device).wait_event(arrived)
            fetched.record_stream(torch.cuda.current_stream(self.device))
        return fetched

    def prefetch(self) -> None:
        """"host": start copying the value back to the device on a side stream (nothing in other forms)."""
        if self.storage != "host" or self._fetched is not None:
            return
        if self.device.type != "cuda":
            self._fetched = (self._held.to(self.device, copy=True), None)
            return
        stream = _side_stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            fetched = self._held.to(self.device, non_blocking=True)
            arrived = torch.cuda.Event()
            arrived.record(stream)
        self._fetched = (fetched, arrived)

    def nbytes(self) -> int:
        held = 0 if self._held is None else self._held.numel() * self._held.element_size()
        return held + (0 if self._scale is None else self._scale.numel() * 4)


def _to_host(tensor: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """`tensor` copied to host memory (into `previous` where it fits): pinned and asynchronous from CUDA,
    the copy ordered after the work that wrote it on a side stream."""
    if tensor.device.type != "cuda":
        return tensor.detach().to("cpu", copy=True)
    host = previous if previous is not None and previous.shape == tensor.shape and previous.dtype == tensor.dtype \
        else torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    stream = _side_stream(tensor.device)
    stream.wait_stream(torch.cuda.current_stream(tensor.device))
    with torch.cuda.stream(stream):
        host.copy_(tensor, non_blocking=True)
    tensor.record_stream(stream)
    return host


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _STREAMS:
        _STREAMS[device] = torch.cuda.Stream(device)
    return _STREAMS[device]
