"""Count the aten ops a block of code dispatches, and the host syncs among them.

A GPU runs what the host queues ahead of it; every op is a kernel launch the host pays for, and a host
sync (`.item()`, `int(t)`, `.tolist()`, `nonzero`, `bincount`, a data-dependent output shape, a blocking
copy to the host) drains that queue. Both are counted by a `TorchDispatchMode` on any device, and the
counts do not depend on it: this is how GPU-shaped code is checked on a CPU.

    with count_dispatches() as count:
        out = attention(q, k, v)
    print(count.report())

What is counted: every op that reaches torch's Python dispatch key, i.e. after composite ops have
decomposed (`F.linear` counts as `aten.t` + `aten.addmm`), once per call (ops an op calls inside its own
kernel are not seen). Views (no kernel) are counted apart. A region compiled by `torch.compile` is opaque
(its fused kernels run outside the dispatcher): only what it dispatches at run time is seen, so compiled
code counts low. Higher-order ops (flex attention) count as one op each.

Host syncs: ops tagged `data_dependent_output` (`_local_scalar_dense`: `.item()`, `int()`, `float()`,
`bool()` of a tensor; `equal`, `allclose`) or `dynamic_output_shape` where the shape really depends on
data (`nonzero`, `masked_select`, `unique`, `bincount`, `repeat_interleave` without `output_size`,
`one_hot` without `num_classes`, indexing with a boolean mask); a blocking copy between host and
device memory, either way (`.cpu()`, `.tolist()`, `.to(device)` of a host tensor: CUDA synchronises
the stream after a copy that is not `non_blocking`), seen where one side is a device; and, caught at
the torch-function level because they dispatch nothing on a CPU, `.cpu()` of a host tensor and
`.tolist()` / `.numpy()` of any tensor: no work here, a sync wherever the tensor lives on a device
in a GPU run (steady-state GPU code has no business calling them; on a GPU a `.cpu()` of a tensor
that never left the host counts too). `.to(device)` of a host tensor is not counted on a CPU: there
it cannot be told from `.to(the compute device)`.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

#: `dynamic_output_shape` ops whose shape depends on data only in some calls: (op name, does this call sync)
_SOMETIMES_DYNAMIC = {
    "aten.index": lambda args, kwargs: _has_mask_index(args[1] if len(args) > 1 else kwargs.get("indices")),
    "aten.repeat_interleave": lambda args, kwargs: kwargs.get("output_size") is None,
    "aten.one_hot": lambda args, kwargs: (args[1] if len(args) > 1 else kwargs.get("num_classes", -1)) == -1,
}
#: ops not tagged dynamic that take boolean-mask indices (which need `nonzero` inside the kernel)
_MASK_INDEXED = ("aten.index_put", "aten.index_put_", "aten._index_put_impl", "aten._index_put_impl_")
_COPIES = ("aten._to_copy", "aten.copy_")
#: tensor methods that read a tensor's data on the host
_HOST_READS = {torch.Tensor.tolist: "Tensor.tolist", torch.Tensor.numpy: "Tensor.numpy"}


def _has_mask_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _host_device_copy(name: str, args: tuple, kwargs: dict) -> bool:
    """A blocking copy between host and device memory, either way."""
    if kwargs.get("non_blocking") or (len(args) > 2 and args[2] is True):
        return False
    if name == "aten._to_copy":
        source, target = args[0].device, kwargs.get("device")
        target = source if target is None else torch.device(target)
    else:
        if not isinstance(args[1], torch.Tensor):
            return False
        target, source = args[0].device, args[1].device
    return (source.type == "cpu") != (target.type == "cpu")


def _is_sync(func: Any, name: str, args: tuple, kwargs: dict) -> bool:
    tags = getattr(func, "tags", ())
    if torch.Tag.data_dependent_output in tags:
        return True
    if torch.Tag.dynamic_output_shape in tags:
        check = _SOMETIMES_DYNAMIC.get(name)
        return check is None or check(args, kwargs)
    if name in _MASK_INDEXED:
        return _has_mask_index(args[1] if len(args) > 1 else kwargs.get("indices"))
    return name in _COPIES and _host_device_copy(name, args, kwargs)


@dataclass
class DispatchCount:
    """What one block of code dispatched: ops by name, the views among them, the host syncs by name."""

    ops: Counter = field(default_factory=Counter)
    views: int = 0
    syncs: Counter = field(default_factory=Counter)

    @property
    def total(self) -> int:
        """Every op dispatched, views included."""
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        """Ops that launch work (every op but views)."""
        return self.total - self.views

    @property
    def sync_total(self) -> int:
        return sum(self.syncs.values())

    def report(self, top: int = 10) -> str:
        """One line of totals, the syncs by op, and the most frequent ops."""
        syncs = ", ".join(f"{name} x{n}" for name, n in self.syncs.most_common()) or "none"
        common = ", ".join(f"{name} x{n}" for name, n in self.ops.most_common(top))
        return (f"{self.total} ops ({self.kernels} launching work, {self.views} views), {self.sync_total} host syncs\n"
                f"  syncs: {syncs}\n  most frequent: {common}")


class _OpCounter(TorchDispatchMode):
    #: let flex attention and other higher-order ops through (each counted as one op)
    supports_higher_order_operators = True

    def __init__(self, count: DispatchCount):
        super().__init__()
        self.count = count

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        # compiled regions run as compiled (torch.compile refuses to trace under a user dispatch mode, and
        # flex attention's eager path compiles with fullgraph=True): count what they dispatch at run time
        return True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = getattr(func, "overloadpacket", None)
        name = str(packet) if packet is not None else f"hop.{func.name()}"
        self.count.ops[name] += 1
        if getattr(func, "is_view", False):
            self.count.views += 1
        if packet is not None and _is_sync(func, name, args, kwargs):
            self.count.syncs[name] += 1
        return func(*args, **kwargs)


class _HostReadCounter(TorchFunctionMode):
    def __init__(self, count: DispatchCount):
        super().__init__()
        self.count = count

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _HOST_READS.get(func)
        if func is torch.Tensor.cpu and args[0].device.type == "cpu":
            name = "Tensor.cpu"
        if name is not None:
            self.count.syncs[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_dispatches() -> Iterator[DispatchCount]:
    """Within the block, count the ops dispatched and the host syncs among them (this thread only)."""
    count = DispatchCount()
    with _HostReadCounter(count), _OpCounter(count):
        yield count


@contextlib.contextmanager
def count_module_calls(module: nn.Module) -> Iterator[list[DispatchCount]]:
    """Within the block, one `DispatchCount` per forward call of `module` (its hooks and whatever replaced
    its forward included), appended as each call starts."""
    counts: list[DispatchCount] = []
    active: list[contextlib.ExitStack] = []

    def start(_module, _args):
        stack = contextlib.ExitStack()
        counts.append(stack.enter_context(count_dispatches()))
        active.append(stack)

    def stop(_module, _args, _output):
        active.pop().close()

    handles = [module.register_forward_pre_hook(start), module.register_forward_hook(stop, always_call=True)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
        while active:
            active.pop().close()
