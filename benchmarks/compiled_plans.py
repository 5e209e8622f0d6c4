"""Plans on compiled blocks against the same plans eager, side by side on this machine.

medium:wan (4 blocks, 6 heads of 64, 4 x 32 x 32 = 4,096 video tokens, 64 text tokens, batch 1, no CFG,
fp32), `steps` steps. Two copies of the same pipeline: one eager, one whose blocks went through
`compile_repeated_blocks(fullgraph=True)`; every plan runs once on each (compiling, not timed), then
`rounds` rounds run everything in turn. Per plan: the median transformer seconds eager and compiled,
compiled / eager, the FLOPs ratio, and how the compiled plan compares with compiled dense times the
FLOPs ratio (the speed its saving is worth; >= 0.85 is the target).

    python -m benchmarks.compiled_plans --threads 2 [--steps 10] [--rounds 2] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

import dit_accel
from dit_accel.bench.common import markdown_table, start
from dit_accel.testing import medium_call_kwargs, medium_pipeline


def plans(steps: int) -> dict[str, list]:
    return {"dense": [],
            "ras 0.5": [dit_accel.RASConfig.for_steps(steps, sample_ratio=0.5)],
            "proxy": [dit_accel.ProxyAttentionConfig()],
            "flexdit": [dit_accel.FlexDiTConfig()],
            "dydit fast": [dit_accel.DyDiTConfig.preset("fast")]}


def transformer_seconds(pipe, call: dict, configs: list) -> tuple[float, float]:
    """One generation under `configs` (none: dense, counted by the light ledger): seconds, FLOPs ratio."""
    with dit_accel.apply(pipe, *configs) as handle:
        pipe(**{**call, "generator": torch.Generator().manual_seed(0)})
        report = handle.report()
    return report["transformer_seconds"], report["flops_ratio"]


def run(steps: int, rounds: int) -> list[dict]:
    call = medium_call_kwargs("wan", num_inference_steps=steps, output_type="latent")
    pipes = {"eager": medium_pipeline("wan"), "compiled": medium_pipeline("wan")}
    pipes["compiled"].transformer.compile_repeated_blocks(fullgraph=True)
    members = plans(steps)
    for pipe in pipes.values():
        for configs in members.values():
            transformer_seconds(pipe, call, configs)  # compiles (on the compiled pipeline), not timed
    seconds = {(name, mode): [] for name in members for mode in pipes}
    flops = {}
    for _ in range(rounds):
        for name, configs in members.items():
            for mode, pipe in pipes.items():
                spent, flops[name] = transformer_seconds(pipe, call, configs)
                seconds[(name, mode)].append(spent)
    median = {key: statistics.median(values) for key, values in seconds.items()}
    dense = median[("dense", "compiled")]
    return [{"plan": name, "flops_ratio": flops[name], "eager_s": median[(name, "eager")],
             "compiled_s": median[(name, "compiled")],
             "compile_gain": median[(name, "eager")] / median[(name, "compiled")],
             "of_ideal": dense * flops[name] / median[(name, "compiled")]} for name in members]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(start(args.threads))
    rows = run(args.steps, args.rounds)
    print(markdown_table(rows, [("plan", "plan", ""), ("flops_ratio", "FLOPs ratio", ".3f"),
                                ("eager_s", "eager (s)", ".2f"), ("compiled_s", "compiled (s)", ".2f"),
                                ("compile_gain", "eager / compiled", ".2f"),
                                ("of_ideal", "compiled dense x FLOPs / compiled", ".2f")]))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
