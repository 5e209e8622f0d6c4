"""Offline quality judges for the procedural reference models.

A small CNN trained on one family of scenes reads back every caption attribute from an image:
``dit_accel.metrics.procedural`` (shape, color, size, position, background color and style, at
64x64; the image and video models) or ``dit_accel.metrics.detail_scenes`` (two objects' shape,
color and texture, their relation, the background's color and pattern, at 128x128; the detail model).
It gives two numbers without any downloaded weights:

* caption accuracy: how often a generated sample shows what its prompt asked for
  (for videos also the motion, read from the judged positions/colors of key frames);
* reference FID: the Frechet distance between sets of samples in the judge's penultimate
  feature space, the offline stand-in for Inception FID.

Train (about 10 minutes on one CPU thread) with ``python -m dit_accel.metrics.judge --out DIR``
(``--scenes detail --out dit_accel/assets/judge_detail`` for the detail judge).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dit_accel.metrics import detail_scenes, procedural

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
JUDGE_DIR = ASSETS_DIR / "judge"
JUDGE_DIRS = {"shapes": JUDGE_DIR, "detail": ASSETS_DIR / "judge_detail"}
SCENES = {"shapes": procedural, "detail": detail_scenes}  # each: ATTRIBUTES, image_batch, scene_labels
INPUT_SIZE = {"shapes": 64, "detail": detail_scenes.IMAGE_SIZE}


class Judge(nn.Module):
    """Strided CNN -> flattened 4x4 map (keeps position) -> ``num_features`` penultimate features -> heads.

    ``forward`` takes images (B, 3, H, W) either as uint8 in [0, 255] or floats in [0, 1] and returns
    the penultimate features, so the module can be handed to torchmetrics' FID as ``feature=``.
    ``scenes`` names the scene family whose attributes the heads read (``"shapes"`` or ``"detail"``).
    """

    def __init__(self, width: int = 32, num_features: int = 128, scenes: str = "shapes"):
        super().__init__()
        self.width, self.num_features, self.scenes = width, num_features, scenes
        self.attributes = SCENES[scenes].ATTRIBUTES
        self.input_size = INPUT_SIZE[scenes]
        first_stride = self.input_size // 64  # every judge reaches a 4x4 map in five layers
        chans = [3, width, width, 2 * width, 4 * width, 4 * width]
        layers = []
        for i, (cin, cout) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv2d(cin, cout, 3, stride=first_stride if i == 0 else 2, padding=1),
                       nn.GroupNorm(8, cout), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.fc = nn.Linear(4 * width * 16, num_features)
        self.heads = nn.ModuleDict({k: nn.Linear(num_features, len(v)) for k, v in self.attributes.items()})

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        size = (self.input_size, self.input_size)
        if x.shape[-2:] != size:
            x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        return x * 2 - 1

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.silu(self.fc(self.convs(self.prepare(images)).flatten(1)))

    def classify(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute of the scene family's ``ATTRIBUTES``."""
        feats = self(images)
        return {k: head(feats) for k, head in self.heads.items()}


def load_judge(path: str | os.PathLike = JUDGE_DIR) -> Judge:
    path = Path(path)
    judge = Judge(**json.loads((path / "config.json").read_text()))
    judge.load_state_dict(load_file(path / "model.safetensors"))
    return judge.eval().requires_grad_(False)


@torch.no_grad()
def predict(judge: Judge, images: torch.Tensor, batch: int = 256) -> dict[str, torch.Tensor]:
    """Predicted class index per attribute for images (B, 3, H, W) in [0, 1] or uint8."""
    out: dict[str, list[torch.Tensor]] = {k: [] for k in judge.attributes}
    for i in range(0, len(images), batch):
        for k, logits in judge.classify(images[i:i + batch]).items():
            out[k].append(logits.argmax(-1))
    return {k: torch.cat(v) for k, v in out.items()}


def chance_levels(scenes: str = "shapes") -> dict[str, float]:
    """Accuracy of uniform guessing per attribute and for a whole caption (their product)."""
    chance = {k: 1.0 / len(v) for k, v in SCENES[scenes].ATTRIBUTES.items()}
    chance["all"] = float(np.prod(list(chance.values())))
    return chance


def caption_accuracy(judge: Judge, images: torch.Tensor, scenes: list) -> dict[str, float]:
    """Fraction of images whose judged attributes match their scene, per attribute and all at once."""
    pred, labels = predict(judge, images), procedural.labels_of(scenes, judge.attributes)
    hits = {k: pred[k] == labels[k] for k in judge.attributes}
    acc = {k: v.float().mean().item() for k, v in hits.items()}
    acc["all"] = torch.stack(list(hits.values())).all(0).float().mean().item()
    return acc


VIDEO_ATTRIBUTES = ("shape", "color", "size", "bg_color", "bg_style", "motion")


def judge_motion(first: str, quarter: str, last: str, color_first: str, color_last: str) -> str:
    """Motion implied by judged positions at t = 0, 1/4, 1 and colors at t = 0, 1 (see VideoScene)."""
    moves = {("left", "right"): "moving right", ("right", "left"): "moving left",
             ("bottom", "top"): "moving up", ("top", "bottom"): "moving down"}
    if (first, last) in moves:
        return moves[first, last]
    if first == last == "bottom" and quarter == "top":
        return "bouncing"
    if first == last == quarter == "center":
        return "turning" if color_first != color_last else "spinning"
    return "unknown"


def image_readings(judge: Judge, images: torch.Tensor) -> list[dict[str, str]]:
    """What the judge reads in each image (B, 3, H, W): every caption attribute, by name."""
    pred = predict(judge, images)
    names = judge.attributes
    return [{k: names[k][int(pred[k][b])] for k in names} for b in range(len(images))]


def video_readings(judge: Judge, videos: torch.Tensor) -> list[dict[str, str]]:
    """What the judge reads in each video (B, 3, T, H, W): the appearance on the first frame and the motion
    implied by the key frames ("turning" with the final color, "turning red", as a caption says it)."""
    t = videos.shape[2]
    keys = [0, round((t - 1) / 4), t - 1]
    preds = [predict(judge, videos[:, :, i]) for i in keys]
    names = procedural.ATTRIBUTES
    found = []
    for b in range(len(videos)):
        first = {k: names[k][int(preds[0][k][b])] for k in names}
        pos = [procedural.POSITION_NAMES[int(p["position"][b])] for p in preds]
        color_last = procedural.COLOR_NAMES[int(preds[2]["color"][b])]
        motion = judge_motion(pos[0], pos[1], pos[2], first["color"], color_last)
        found.append({**{k: first[k] for k in VIDEO_ATTRIBUTES[:-1]},
                      "motion": f"turning {color_last}" if motion == "turning" else motion})
    return found


def readings(judge: Judge, samples: torch.Tensor) -> list[dict[str, str]]:
    """`image_readings` of images (B, 3, H, W), `video_readings` of videos (B, 3, T, H, W)."""
    return video_readings(judge, samples) if samples.ndim == 5 else image_readings(judge, samples)


def agreement(ours: list[dict[str, str]], theirs: list[dict[str, str]]) -> tuple[int, int]:
    """(readings that agree, readings compared) of two sets of readings of the same seeds: how much of what
    the judge sees in accelerated samples it also sees in the dense ones, whether or not either matches
    its caption (a caption's accuracy over a few samples is mostly noise; agreement with dense is not)."""
    if len(ours) != len(theirs):
        raise ValueError(f"readings of {len(ours)} samples against {len(theirs)}")
    pairs = [(a[k], b[k]) for a, b in zip(ours, theirs) for k in a]
    return sum(a == b for a, b in pairs), len(pairs)


def video_caption_accuracy(judge: Judge, videos: torch.Tensor, scenes: list[procedural.VideoScene]) -> dict[str, float]:
    """Caption accuracy for videos (B, 3, T, H, W) in [0, 1]: appearance from the first frame, motion
    (and the final color of "turning") from the judged key frames."""
    hits = {k: [] for k in VIDEO_ATTRIBUTES}
    for read, vs in zip(video_readings(judge, videos), scenes):
        for k in VIDEO_ATTRIBUTES[:-1]:
            hits[k].append(read[k] == getattr(vs.scene, k))
        hits["motion"].append(read["motion"] == (f"turning {vs.to_color}" if vs.motion == "turning" else vs.motion))
    acc = {k: float(np.mean(v)) for k, v in hits.items()}
    acc["all"] = float(np.mean(np.all([hits[k] for k in VIDEO_ATTRIBUTES], axis=0)))
    return acc


def video_chance_levels() -> dict[str, float]:
    chance = {k: v for k, v in chance_levels().items() if k in VIDEO_ATTRIBUTES}
    chance["motion"] = 1.0 / len(procedural.MOTIONS)
    chance["all"] = float(np.prod(list(chance.values())))
    return chance


@torch.no_grad()
def features(judge: Judge, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([judge(images[i:i + batch]) for i in range(0, len(images), batch)]).double()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D), in float64."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    vals, vecs = torch.linalg.eigh(cov_a)
    sqrt_a = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def reference_fid(judge: Judge, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance in judge feature space between two image sets (B, 3, H, W); video frames
    can be passed flattened into the batch dimension."""
    return frechet_distance(features(judge, images_a), features(judge, images_b))


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur and noise so the judge is robust to VAE-decoded (soft, slightly noisy) samples."""
    blur = torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5
    x = torch.where(blur, F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False), x)
    x = x + 0.03 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)
    return x.clamp(0, 1)


def train_judge(minutes: float, seed: int, max_steps: int | None = None, batch: int = 64,
                scenes: str = "shapes") -> tuple[Judge, dict]:
    """Cosine LR over a wall-clock budget, or over ``max_steps`` when given (bit-exact reruns)."""
    torch.manual_seed(seed)
    judge = Judge(scenes=scenes)
    family = SCENES[scenes]
    opt = torch.optim.AdamW(judge.parameters(), lr=2e-3, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(seed)
    start, step, budget = time.time(), 0, minutes * 60
    while (progress := (time.time() - start) / budget if max_steps is None else step / max_steps) < 1:
        for g in opt.param_groups:
            g["lr"] = 2e-3 * 0.5 * (1 + np.cos(np.pi * progress))
        x, drawn = family.image_batch(batch, seed * 1_000_003 + step)
        labels = family.scene_labels(drawn)
        logits = judge.classify(_augment(x, gen))
        loss = sum(F.cross_entropy(logits[k], labels[k]) for k in logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step % 100 == 0:
            print(f"[judge] step {step} loss {loss.item():.4f} {time.time() - start:.0f}s", flush=True)
    judge.eval().requires_grad_(False)
    x, drawn = family.image_batch(1000, seed + 10_000_000)
    return judge, {"scenes": scenes, "steps": step, "seconds": time.time() - start, "batch": batch,
                   "heldout_accuracy": caption_accuracy(judge, x, drawn)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a procedural-scene judge.")
    parser.add_argument("--scenes", choices=sorted(SCENES), default="shapes")
    parser.add_argument("--out", type=Path, help="default: the shipped judge's folder for --scenes")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--steps", type=int, help="fixed step count instead of the wall-clock budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    judge, log = train_judge(args.minutes, args.seed, args.steps, scenes=args.scenes)
    out = args.out or JUDGE_DIRS[args.scenes]
    out.mkdir(parents=True, exist_ok=True)
    save_file(judge.state_dict(), out / "model.safetensors")
    config = {"width": judge.width, "num_features": judge.num_features, "scenes": judge.scenes}
    (out / "config.json").write_text(json.dumps(config) + "\n")
    (out / "train_log.json").write_text(json.dumps(log, indent=2) + "\n")
    print(json.dumps(log, indent=2))


if __name__ == "__main__":
    main()
