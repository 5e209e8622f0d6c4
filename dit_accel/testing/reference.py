"""The embedded default models: small trained SD3 (image, detail) and Wan 2.1 (video) pipelines.

They are real diffusers pipelines with weights shipped in ``dit_accel/assets`` and trained
on :mod:`dit_accel.metrics.procedural` scenes (see ``train_reference.py``), so acceleration
methods can be judged on quality offline, not only on speed:

    pipe = reference_pipeline("image")
    image = pipe(**reference_call_kwargs("image", prompt="a small blue star at the top, red plain background"))

``python -m dit_accel.testing.reference`` regenerates the numbers and figures of
``benchmarks/REFERENCE_MODELS.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from diffusers import StableDiffusion3Pipeline, WanPipeline

from dit_accel.metrics.suites import SUITES

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
REFERENCE_IMAGE_DIR = ASSETS_DIR / "reference_image"
REFERENCE_VIDEO_DIR = ASSETS_DIR / "reference_video"
REFERENCE_DETAIL_DIR = ASSETS_DIR / "reference_detail"
REFERENCE_DIRS = {"image": REFERENCE_IMAGE_DIR, "detail": REFERENCE_DETAIL_DIR, "video": REFERENCE_VIDEO_DIR}

_DEFAULTS = {
    "image": dict(prompt="a large red circle on the left, blue plain background",
                  num_inference_steps=SUITES["image"].steps, guidance_scale=4.0, height=64, width=64,
                  max_sequence_length=16),
    "detail": dict(prompt="a red striped circle left of a blue dotted square, green grid background",
                   num_inference_steps=SUITES["detail"].steps, guidance_scale=4.0, height=128, width=128,
                   max_sequence_length=16),
    "video": dict(prompt="a large yellow square moving right, blue plain background",
                  num_inference_steps=SUITES["video"].steps, guidance_scale=4.0, height=64, width=64, num_frames=13,
                  max_sequence_length=16),
}


def reference_pipeline(kind: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                       folder: str | Path | None = None) -> StableDiffusion3Pipeline | WanPipeline:
    """Load the shipped ``"image"`` or ``"detail"`` (StableDiffusion3Pipeline) or ``"video"`` (WanPipeline)
    model offline (or a retrained one from ``folder``)."""
    if kind not in REFERENCE_DIRS:
        raise ValueError(f"kind must be one of {', '.join(REFERENCE_DIRS)}, got {kind!r}")
    cls = WanPipeline if kind == "video" else StableDiffusion3Pipeline
    return cls.from_pretrained(folder or REFERENCE_DIRS[kind], dtype=dtype).to(device)


def reference_call_kwargs(kind: str, **overrides) -> dict:
    """Default pipeline arguments (prompt, CFG 4, 16 text tokens; image: 20 steps at 64x64, detail: 28 steps
    at 128x128, video: 20 steps, 13 frames of 64x64)."""
    if kind not in _DEFAULTS:
        raise ValueError(f"kind must be one of {', '.join(_DEFAULTS)}, got {kind!r}")
    return {**_DEFAULTS[kind], **overrides}


def reference_suite(model: str | os.PathLike | None) -> str | None:
    """The reference model (``"image"``, ``"detail"``, ``"video"``) a ``reference:`` spec or a folder
    names, or None: whose caption suite, and judge, fit the model's outputs."""
    spec, _, name = str(model or "").partition(":")
    if spec == "reference":
        return name if name in REFERENCE_DIRS else None
    if model is None or ":" in str(model):
        return None
    where = Path(model).resolve()
    return next((kind for kind, folder in REFERENCE_DIRS.items() if where == folder.resolve()), None)


@torch.no_grad()
def generate(pipe, kind: str, prompts: list[str], seed: int = 0, batch: int = 16, **overrides) -> torch.Tensor:
    """Samples for ``prompts`` in [0, 1]: images (N, 3, H, W) or videos (N, 3, T, H, W)."""
    out = []
    for i in range(0, len(prompts), batch):
        kwargs = reference_call_kwargs(kind, prompt=prompts[i:i + batch], output_type="pt",
                                       generator=torch.Generator().manual_seed(seed + i), **overrides)
        result = pipe(**kwargs)
        out.append(result.frames.transpose(1, 2) if kind == "video" else result.images)
    return torch.cat(out).float().clamp(0, 1)


def _save_grid(rows: list[torch.Tensor], path: Path) -> None:
    """Stack rows of images (N, 3, H, W) into one PNG with a 2-pixel gray gutter."""
    from PIL import Image

    pad = lambda x: torch.nn.functional.pad(x, (1, 1, 1, 1), value=0.5)  # noqa: E731
    grid = torch.cat([torch.cat(list(pad(r)), dim=2) for r in rows], dim=1)
    Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)


@torch.no_grad()
def evaluate(kind: str, out_dir: Path, samples: int, seed: int, folder: Path | None = None) -> dict:
    """Caption accuracy, reference FID and VAE PSNR of one model, plus its sample figure.

    The numbers are merged into ``out_dir/reference_eval.json`` and returned.
    """
    from dit_accel.metrics import judge as J
    from dit_accel.metrics.quality import psnr

    suite = SUITES[kind]
    judge = suite.load_judge()
    pipe = reference_pipeline(kind, folder=folder)
    pipe.set_progress_bar_config(disable=True)
    real, scenes = suite.draw(samples, seed)
    real2, _ = suite.draw(samples, seed + 1)
    t0 = time.time()
    fake = generate(pipe, kind, [s.caption for s in scenes], seed=seed, batch=4 if suite.video else 16)
    seconds = (time.time() - t0) / samples
    recon = pipe.vae.decode(pipe.vae.encode(real[:16] * 2 - 1).latent_dist.mode()).sample.add(1).div(2).clamp(0, 1)
    if not suite.video:
        flat = lambda x: x  # noqa: E731
        accuracy, chance = J.caption_accuracy, J.chance_levels(suite.scenes)
        rows = [r for k in range(4) for r in (real[8 * k:8 * k + 8], fake[8 * k:8 * k + 8])]
        shown = 32
    else:  # videos are judged frame by frame for FID, and shown as one frame strip per video
        flat = lambda v: v.transpose(1, 2).flatten(0, 1)  # noqa: E731
        accuracy, chance = J.video_caption_accuracy, J.video_chance_levels()
        rows = [r for k in range(4) for r in (flat(real[k:k + 1]), flat(fake[k:k + 1]))]
        shown = 4
    result = {
        "samples": samples, "seconds_per_sample": seconds, "vae_psnr_db": psnr(recon, real[:16]),
        "caption_accuracy": accuracy(judge, fake, scenes),
        "real_caption_accuracy": accuracy(judge, real, scenes),
        "chance": chance,
        "fid_generated_vs_real": J.reference_fid(judge, flat(fake), flat(real2)),
        "fid_real_vs_real": J.reference_fid(judge, flat(real), flat(real2)),
        "fid_noise_vs_real": J.reference_fid(judge, torch.rand_like(flat(real)), flat(real2)),
        "grid_captions": [s.caption for s in scenes[:shown]],
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    _save_grid(rows, out_dir / ("reference_video_frames.png" if suite.video else f"reference_{kind}_samples.png"))
    path = out_dir / "reference_eval.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged[kind] = result
    path.write_text(json.dumps(merged, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Evaluate the shipped reference models.")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/figures"))
    parser.add_argument("--kind", choices=list(REFERENCE_DIRS), nargs="+", default=list(REFERENCE_DIRS))
    parser.add_argument("--samples", type=int, default=256, help="generated images")
    parser.add_argument("--video-samples", type=int, default=48, help="generated videos")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folder", type=Path, help="evaluate a retrained pipeline folder instead of the shipped one")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for kind in args.kind:
        n = args.video_samples if kind == "video" else args.samples
        print(kind, json.dumps(evaluate(kind, args.out, n, args.seed, args.folder), indent=2))


if __name__ == "__main__":
    main()
