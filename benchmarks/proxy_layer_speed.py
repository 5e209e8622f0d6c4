"""One proxy-attention layer on this machine: dense SDPA against the window kernels, side by side.

Shapes are medium:wan's self-attention (6 heads of 64, a 32 x 32 token frame), at 4 frames (4,096
tokens, what `dit-accel bench --model medium:wan` runs) and 16 frames (16,384), with
`ProxyAttentionConfig()`'s windows: local (1, 8, 8), proxies (1, 2, 2). Random q/k/v: the kernels'
time does not depend on the values. Each row gives the density computed (the kernel's pairs over
dense's), the time, the speedup over dense and its fraction of the ideal 1/density. Rounds run in turn
(dense, torch, flex, dense, ...) and each time is the median over the rounds; the compiled flex
kernel's first call (its compile) is reported apart. What `kernel="auto"` picks on CPU rests on this.

    python -m benchmarks.proxy_layer_speed --threads 2 [--frames 4 16] [--dtype float32] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dit_accel.attention import proxy_kernel
from dit_accel.attention.kernels.dense import lse_kernel
from dit_accel.attention.kernels.windows import WindowPlan, window_kernel
from dit_accel.bench.common import median_seconds_in_turn, seconds
from dit_accel.machine import machine

HEADS, DIM, ROWS, COLS = 6, 64, 32, 32
LOCAL, PROXY = (1, 8, 8), (1, 2, 2)


def layer(frames: int, dtype: torch.dtype, rounds: int) -> dict:
    extent = (frames, ROWS, COLS)
    grid = torch.stack(torch.meshgrid(*[torch.arange(e) for e in extent], indexing="ij"), -1).reshape(1, -1, 3)
    tokens = grid.shape[1]
    generator = torch.Generator().manual_seed(frames)
    query, key, value = (torch.randn(1, HEADS, tokens, DIM, generator=generator).to(dtype) for _ in range(3))
    plan = WindowPlan.of(proxy_kernel.place(grid, grid, extent, LOCAL, PROXY))
    device = torch.device("cpu")
    kernels = {name: window_kernel(name, device, lse_kernel(device)) for name in ("torch", "flex")}
    compile_seconds = seconds(lambda: kernels["flex"](query, key, value, plan))
    runs = {"dense": lambda: F.scaled_dot_product_attention(query, key, value),
            **{name: (lambda k=k: k(query, key, value, plan)) for name, k in kernels.items()}}
    for run in runs.values():  # warm
        run()
    median = median_seconds_in_turn(runs, rounds)
    density = plan.pairs(0) / tokens ** 2
    row = {"tokens": tokens, "dtype": str(dtype).removeprefix("torch."), "density": density,
           "dense_s": median["dense"], "flex_compile_s": compile_seconds}
    for name in kernels:
        speedup = median["dense"] / median[name]
        row.update({f"{name}_s": median[name], f"{name}_speedup": speedup, f"{name}_of_ideal": speedup * density})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--frames", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [layer(frames, getattr(torch, args.dtype), args.rounds) for frames in args.frames]
    where = f"{machine('cpu')['name']}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    print(f"{where}\n")
    print("| tokens | dtype | density | dense (s) | torch (s) | speedup | of ideal | flex compiled (s) | speedup "
          "| of ideal | flex compile (s) |\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tokens']:,} | {r['dtype']} | {r['density']:.3f} | {r['dense_s']:.3f} | {r['torch_s']:.3f} | "
              f"{r['torch_speedup']:.2f}x | {r['torch_of_ideal']:.2f} | {r['flex_s']:.3f} | {r['flex_speedup']:.2f}x "
              f"| {r['flex_of_ideal']:.2f} | {r['flex_compile_s']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"machine": where, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
