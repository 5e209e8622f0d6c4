"""The attention kernels under stages 5-6, one interface per kind of attention, one implementation per
device family, chosen once per technique and device (never per call by `device.type`).

A technique plans on the device (clusters, windows, pooled groups: `attention/kmeans.py`,
`attention/pooling.py`, the techniques' own planners) and hands the plan to a kernel of its kind:

- `dense` (dense attention with an optional per-key bias, and attention with its log-sum-exp),
- `clusters` (SVG2's cluster-block-sparse attention over permuted tokens),
- `windows` (proxy attention's local windows plus proxies).

Implementations: `torch` (plain torch ops; CPU's best where flex is not), `flex` (one compiled
`torch.nn.attention.flex_attention` call per attention, its `BlockMask` built from the plan),
`flashinfer` (optional; where the package and a CUDA device are present). A config's `kernel` field
names one, or `auto` for the kind's choice on the device.
"""

from __future__ import annotations

from typing import Literal

#: what a config's `kernel` field takes
KernelName = Literal["auto", "torch", "flex", "flashinfer"]
KERNEL_NAMES: tuple[str, ...] = ("auto", "torch", "flex", "flashinfer")
