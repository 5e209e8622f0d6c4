"""`dit-accel bench`: acceleration plans and their peers against dense, over batches of prompts.

    dit-accel bench --model reference:image --plan ras:sample_ratio=0.5 --plan "ras+fbcache:threshold=0.12" --peers
    python -m dit_accel.bench --model tiny:sd3 --steps 8 --plan ras --peers fbcache steps

For every batch of `--batch` prompts it runs dense, then every row in turn on the same seed (one
seed per batch), so a drift of the machine's speed hits all rows alike, after one untimed short
warm-up run of every row. Every timed row runs under a handle (dense under the measure-only
`dit_accel.measure`, plans under `dit_accel.apply`), so transformer time and FLOPs come from the
same work ledger for all of them; one more row, "dense (no hooks)", runs with no handle at all and
shows what the handle itself costs. Peers (`--peers`) are what a plan has to beat: dense with fewer
steps at the fastest plan's time, diffusers' own step caches and cache-dit's DBCache. `--equal psnr=30`
(any `dit-accel tune` target) adds a table of each plan's and each peer family's fastest setting that meets
it, each peer sweeping its knob; `--fid DIR|dense` adds FID (torchmetrics' Inception) and a CLIP score.

Writes `results.json` (machine, settings, processes, every row, the equal-quality table), `results.csv`,
`results.md` (the tables, the machine in its first line) and `pareto_psnr.png` (speedup against PSNR vs
dense, the Pareto front marked) to `--out`. Speedups compare like with like only within one run on one machine.

Under `accelerate launch` the batches are split across the processes by rank, batch i on rank
i % processes and still on seed + i, and the main process merges every process's sums into the same
rows and writes the outputs; the others write nothing:

    accelerate launch --num_processes 2 -m dit_accel.bench --model ...               # GPUs
    accelerate launch --multi_gpu --num_processes 2 -m dit_accel.bench --device cpu ...  # CPUs

(on a machine without GPUs `--multi_gpu` is what starts several processes, torchrun's launcher; accelerate's
`--cpu` starts one.)
"""

from .options import build_parser, main
from .running import bench

__all__ = ["bench", "build_parser", "main"]
