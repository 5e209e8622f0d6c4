"""What each plan holds at the shapes users run, from `dit_accel.estimate` on the real configs (meta device,
no weights): Wan 2.1 14B 480p x 81 frames (CFG in two calls), HunyuanVideo 720p x 129 frames and
Flux.1-dev 1024² (guidance-distilled: one call a step), batch 1, bf16.

Per model and plan: the GiB the plan keeps on the GPU and in host memory, the total with the weights,
and whether that fits an 80 GB GPU with room left for activations and VAE decoding (at most 70 GiB:
`dit_accel.cli.FITS_80GB`). A plan that does not fit is followed by its smaller forms.

    python -m benchmarks.memory_estimates [--json FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import dit_accel
from dit_accel.bench.common import markdown_table
from dit_accel.cli import FITS_80GB
from dit_accel.plan_spec import parse_plan
from dit_accel.testing import release_transformer

MODELS = {"Wan 2.1 14B 480p x 81": ("wan2.1-14b", dict(height=480, width=832, num_frames=81)),
          "HunyuanVideo 720p x 129": ("hunyuanvideo", dict(height=720, width=1280, num_frames=129)),
          "Flux.1-dev 1024²": ("flux.1-dev", dict(height=1024, width=1024))}
PLANS = ["ras", "ras:kv_cache=fp8", "ras:kv_cache=host", "ras+fbcache:threshold=0.1",
         "ras:kv_cache=fp8+fbcache:threshold=0.1", "dydit:preset=quality", "dydit:preset=balanced",
         "dydit:preset=fast", "dydit:preset=fast,token_cache=fp8", "dydit:preset=fast,token_cache=host",
         "flexdit", "svg2", "proxy", "magcache", "ras:kv_cache=fp8+dydit:preset=balanced,token_cache=fp8"]


def rows() -> list[dict]:
    table = []
    for label, (release, sizes) in MODELS.items():
        transformer = release_transformer(release, device="meta", dtype=torch.bfloat16)
        for spec in PLANS:
            try:
                configs = parse_plan(spec)
            except dit_accel.ConfigError as error:  # a member this model's family cannot take
                table.append({"model": label, "plan": spec, "note": str(error)})
                continue
            held = dit_accel.estimate(transformer, *configs, **sizes)
            total = held["weights_bytes"] + held["device_bytes"]
            table.append({"model": label, "plan": spec, "device_gib": held["device_bytes"] / 2**30,
                          "host_gib": held["host_bytes"] / 2**30, "total_gib": total / 2**30,
                          "fits": "yes" if total <= FITS_80GB else "no",
                          "kinds": ", ".join(f"{k} {v / 2**30:.1f}" for k, v in held["by_kind"].items() if v >= 2**27),
                          "weights_gib": held["weights_bytes"] / 2**30, "tokens": held["shapes"]["tokens"]})
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    table = rows()
    print(markdown_table(table, [("model", "model", ""), ("plan", "plan", ""),
                                 ("device_gib", "on the GPU (GiB)", ".1f"), ("kinds", "by kind (GiB)", ""),
                                 ("host_gib", "host (GiB)", ".1f"), ("total_gib", "with weights (GiB)", ".1f"),
                                 ("fits", "fits 80 GB", "")]))
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
