"""DyDiT's memory on this machine: what its MLP token skipping holds and costs with the cached MLP
outputs on the device, in fp8 or in host memory, against the cache it replaced, in one run.

(a) medium:sd3 (4 blocks, 6 heads of 64: hidden 384) at 256 x 256 (1,024 tokens), CFG 4 (2 samples a
    call), 6 steps, fp32, preset `balanced` (width 1.0, token_ratio 0.25). Rounds run in turn (dense,
    then every setting); per setting the median transformer seconds, the speedup over dense, the FLOPs
    ratio, the bytes DyDiT held at its peak (`report()["state_bytes"]`) and what `estimate_bytes` said
    before the run, and PSNR against the "device" form and against dense. "full-input decision" runs
    the cache this replaced (each token's MLP input beside its output, the tests' reference); the code
    before also copied every weight it slices at width 1.0, stated under the table.
(b) Wan 2.1 14B at 480p (81 frames: 21 x 30 x 52 tokens, CFG: 2 samples, bf16): `estimate_bytes` of
    each preset and token cache form, from one random-weight block scaled to the 40 blocks, beside what
    the code before this change held.

    python -m benchmarks.dydit_memory --threads 2 [--rounds 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path

import torch

import dit_accel
from dit_accel.bench.common import markdown_table, start
from dit_accel.metrics.quality import psnr
from dit_accel.models import adapter_for
from dit_accel.models.base import TokenGrid
from dit_accel.runtime.estimate import CallShapes
from dit_accel.techniques.dydit.tokens import MLPTokens
from dit_accel.testing import medium_call_kwargs, medium_pipeline, release_transformer

MiB, GiB = 2 ** 20, 2 ** 30
SIZE, STEPS, SEED = 256, 6, 0
FULL_INPUT = "balanced, full-input decision"
WAN_14B_BLOCKS = 40
WAN_480P = CallShapes(samples=2, grid=TokenGrid(21, 30, 52), text_tokens=512, itemsize=2, hidden=5120,
                      output_channels=64)


@contextlib.contextmanager
def _full_input_decision():
    """The cache before the sketch: each token's MLP input itself stands in for its sketch."""
    sketch = MLPTokens._sketch
    MLPTokens._sketch = lambda self, hidden: hidden.float()
    try:
        yield
    finally:
        MLPTokens._sketch = sketch


def _before(transformer: torch.nn.Module, shapes: CallShapes) -> dict[str, int]:
    """What the code before this change held at a preset with max_width_ratio 1 and token_ratio < 1: a
    whole copy of every linear it slices (the width-1.0 bucket copied too) and, per branch and block,
    each token's MLP input beside its output in the model's dtype."""
    adapter = adapter_for(transformer)
    linears, cache = set(), 0
    for block in adapter.blocks():
        layout = adapter.width_layout(block)
        mlp = [layout.mlp] if layout.mlp is not None else []
        for slices in (*layout.attentions, *mlp):
            linears.update(slices.rows)
            linears.update(linear for linear, _ in slices.columns)
        if mlp and layout.mlp.module is not None:
            widths = layout.mlp.rows[0].in_features + layout.mlp.columns[0][0].out_features
            cache += shapes.samples * shapes.tokens * widths * shapes.itemsize
    copies = sum(p.numel() for linear in linears for p in linear.parameters()) * shapes.itemsize
    return {"slice_copies": copies, "token_cache": cache}


def medium_sd3(rounds: int) -> tuple[list[dict], dict[str, int]]:
    pipe = medium_pipeline("sd3")
    pipe.set_progress_bar_config(disable=True)
    call = medium_call_kwargs("sd3", height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=4.0)
    config = pipe.transformer.config
    side = SIZE // pipe.vae_scale_factor // config.patch_size
    shapes = CallShapes(samples=2, grid=TokenGrid(1, side, side), text_tokens=call["max_sequence_length"] + 77,
                        itemsize=4, hidden=config.num_attention_heads * config.attention_head_dim,
                        output_channels=config.out_channels * config.patch_size ** 2)  # T5 tokens, then CLIP's 77
    balanced = dit_accel.DyDiTConfig.preset
    settings = {"dense": ([], contextlib.nullcontext),
                **{f"balanced, {form}": ([balanced("balanced", token_cache=form)], contextlib.nullcontext)
                   for form in ("device", "fp8", "host")},
                FULL_INPUT: ([balanced("balanced")], _full_input_decision)}
    seconds = {label: [] for label in settings}
    rows = {label: {"setting": label} for label in settings}
    outputs = {}
    for _ in range(rounds):
        for label, (configs, context) in settings.items():
            with context(), dit_accel.apply(pipe, *configs) as handle:
                if configs:
                    rows[label]["estimate"] = sum(handle.sessions[0].techniques[0].estimate_bytes(shapes).values())
                outputs[label] = pipe(**{**call, "generator": torch.Generator().manual_seed(SEED)}).images
                report = handle.report()
            seconds[label].append(report["transformer_seconds"])
            rows[label].update(flops_ratio=report["flops_ratio"], state=sum(report["state_bytes"].values()))
    rows[FULL_INPUT]["estimate"] = _before(pipe.transformer, shapes)["token_cache"]
    dense = statistics.median(seconds["dense"])
    for label, row in rows.items():
        row["seconds"] = statistics.median(seconds[label])
        row["speedup"] = dense / row["seconds"]
        row["state_mib"] = row.pop("state") / MiB
        row["estimate_mib"] = row.pop("estimate", 0) / MiB
        if label != "dense":
            row["psnr_device"] = psnr(outputs[label], outputs["balanced, device"]) if label != "balanced, device" \
                else None
            row["psnr_dense"] = psnr(outputs[label], outputs["dense"])
    return list(rows.values()), _before(pipe.transformer, shapes)


def wan_14b() -> list[dict]:
    block = release_transformer("wan2.1-14b", num_layers=1, dtype=torch.bfloat16)
    before = {kind: WAN_14B_BLOCKS * held for kind, held in _before(block, WAN_480P).items()}
    rows = [{"setting": "any preset, before this change", **{kind: held / GiB for kind, held in before.items()}}]
    for preset in dit_accel.DyDiTConfig.presets:
        for form in ("device", "fp8", "host"):
            with dit_accel.apply(block, dit_accel.DyDiTConfig.preset(preset, token_cache=form)) as handle:
                estimate = handle.sessions[0].techniques[0].estimate_bytes(WAN_480P)
            rows.append({"setting": f"{preset}, {form}",
                         **{kind: WAN_14B_BLOCKS * held / GiB for kind, held in estimate.items()}})
    for row in rows:
        row["device"] = sum(row.get(kind, 0.0) for kind in ("slice_copies", "token_cache"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    machine = start(args.threads)
    print(machine + "\n", flush=True)
    medium, before = medium_sd3(args.rounds)
    print(f"## (a) medium:sd3, {SIZE} x {SIZE} (1,024 tokens), CFG 4, {STEPS} steps, medians of {args.rounds}\n\n"
          + markdown_table(medium, [
              ("setting", "setting", ""), ("seconds", "transformer (s)", ".2f"), ("speedup", "speedup", ".2f"),
              ("flops_ratio", "FLOPs ratio", ".3f"), ("state_mib", "held (MiB)", ".2f"),
              ("estimate_mib", "estimated (MiB)", ".2f"), ("psnr_device", "PSNR vs device (dB)", ".1f"),
              ("psnr_dense", "PSNR vs dense (dB)", ".1f")])
          + f"\n\nBefore this change the `balanced` preset also held {before['slice_copies'] / MiB:.2f} MiB of "
            "whole-weight copies (width 1.0 copied every linear it slices).\n", flush=True)
    wan = wan_14b()
    print(f"## (b) Wan 2.1 14B at 480p, 81 frames, CFG, bf16: estimate_bytes (GiB), {WAN_14B_BLOCKS} x one block\n\n"
          + markdown_table(wan, [
              ("setting", "setting", ""), ("slice_copies", "slice copies", ".2f"), ("token_cache", "token cache", ".2f"),
              ("token_cache@host", "token cache on host", ".2f"), ("device", "on the GPU", ".2f")]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "medium_sd3": medium, "wan_14b": wan},
                                        indent=1) + "\n")


if __name__ == "__main__":
    main()
