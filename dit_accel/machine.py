"""Which machine measured a number: benchmark tables and tuned plan files name it, since speedups hold
only on the machine (and thread count) they were measured on."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what `platform` knows."""
    try:
        found = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        found = None
    return found.group(1).strip() if found else (platform.processor() or platform.machine())


def machine(device: Any) -> dict[str, Any]:
    """The machine the numbers belong to: the GPU (when used), the CPU's model name, cores, OS."""
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None
    name = gpu or f"{cpu}, {os.cpu_count()} cores"
    return {"name": name, "cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "platform": platform.platform(),
            "python": platform.python_version()}
