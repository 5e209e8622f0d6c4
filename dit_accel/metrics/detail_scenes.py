"""Procedural captioned scenes with fine detail, for the 1,024-token reference model (``reference:detail``).

The first reference data (:mod:`procedural`) is one flat shape on a smooth background: a model
learns it so well that 7 of 20 sampling steps lose almost nothing, unlike real models. Here every
image has two textured objects in a spatial relation on a patterned background, and the detail
sits at several frequencies: fills that are striped, dotted, checked or only outlined (thin lines),
and backgrounds that are striped, checked, dotted, a thin grid or seeded noise, with random period,
angle and phase. The caption names what a judge can read back; the periods and phases it does not
name are what the sampler has to resolve, step by step.

    a red striped circle left of a blue dotted square, green grid background

Deterministic under a seed and drawn with numpy (anti-aliased signed distances), like :mod:`procedural`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .procedural import COLOR_NAMES, COLORS, SHAPES, drawn_images, labels_of, pixel_grid, shape_sdf

IMAGE_SIZE = 128
TEXTURES = ("plain", "striped", "dotted", "checked", "outlined")
RELATIONS = ("left of", "above")  # "B right of A" is "A left of B": one word per arrangement keeps captions unique
BG_PATTERNS = ("plain", "striped", "checked", "dotted", "grid", "noisy")
BG_BRIGHTNESS = 0.38
RADIUS = (0.12, 0.17)  # object radius range, as a fraction of the side
PERIOD = (0.045, 0.08)  # texture period range (6-10 pixels at 128)

# Attributes the judge reads back, in a fixed order, with their class names.
ATTRIBUTES = {
    "shape_1": SHAPES, "color_1": COLOR_NAMES, "texture_1": TEXTURES,
    "relation": RELATIONS,
    "shape_2": SHAPES, "color_2": COLOR_NAMES, "texture_2": TEXTURES,
    "bg_color": COLOR_NAMES, "bg_pattern": BG_PATTERNS,
}


@dataclass(frozen=True)
class Thing:
    """One object: what the caption names, and the pose and texture parameters it does not."""

    shape: str
    color: str
    texture: str
    x: float
    y: float
    radius: float
    angle: float
    period: float
    texture_angle: float
    phase: float

    @property
    def words(self) -> str:
        return f"{self.color} {self.texture} {self.shape}"


@dataclass(frozen=True)
class DetailScene:
    """Two objects (``first`` is left of / above ``second``) on a patterned background."""

    first: Thing
    relation: str
    second: Thing
    bg_color: str
    bg_pattern: str
    bg_period: float
    bg_angle: float
    bg_seed: int

    @property
    def caption(self) -> str:
        return f"a {self.first.words} {self.relation} a {self.second.words}, {self.bg_color} {self.bg_pattern} background"

    def labels(self) -> dict[str, int]:
        values = {"shape_1": self.first.shape, "color_1": self.first.color, "texture_1": self.first.texture,
                  "relation": self.relation, "shape_2": self.second.shape, "color_2": self.second.color,
                  "texture_2": self.second.texture, "bg_color": self.bg_color, "bg_pattern": self.bg_pattern}
        return {name: classes.index(values[name]) for name, classes in ATTRIBUTES.items()}


def is_caption(text: str) -> bool:
    """Whether ``text`` is a caption as :attr:`DetailScene.caption` writes it (the prompts the judge can read)."""
    words = str(text).strip().replace(",", " ,").split()
    relation = 2 if words[4:6] == ["left", "of"] else 1  # words the relation takes
    if len(words) != 12 + relation or words[0] != "a" or words[4 + relation] != "a" or words[-4] != ",":
        return False
    thing = lambda w: w[0] in COLORS and w[1] in TEXTURES and w[2] in SHAPES  # noqa: E731
    return (thing(words[1:4]) and " ".join(words[4:4 + relation]) in RELATIONS and thing(words[5 + relation:8 + relation])
            and words[-3] in COLORS and words[-2] in BG_PATTERNS and words[-1] == "background")


def _thing(rng: np.random.Generator, color: str, x: float, y: float) -> Thing:
    return Thing(shape=SHAPES[rng.integers(len(SHAPES))], color=color, texture=TEXTURES[rng.integers(len(TEXTURES))],
                 x=x, y=y, radius=float(rng.uniform(*RADIUS)), angle=float(rng.uniform(0, 2 * np.pi)),
                 period=float(rng.uniform(*PERIOD)), texture_angle=float(rng.uniform(0, np.pi)),
                 phase=float(rng.uniform(0, 1)))


def random_scene(rng: np.random.Generator) -> DetailScene:
    c1, c2, bg = (COLOR_NAMES[i] for i in rng.choice(len(COLOR_NAMES), size=3, replace=False))
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    near, far = rng.uniform(0.22, 0.34), rng.uniform(0.66, 0.78)  # along the relation's axis
    across = rng.uniform(0.3, 0.7, size=2)  # across it
    if relation == "left of":
        p1, p2 = (near, across[0]), (far, across[1])
    else:
        p1, p2 = (across[0], near), (across[1], far)
    first, second = _thing(rng, c1, *p1), _thing(rng, c2, *p2)
    return DetailScene(first=first, relation=relation, second=second, bg_color=bg,
                       bg_pattern=BG_PATTERNS[rng.integers(len(BG_PATTERNS))],
                       bg_period=float(rng.uniform(0.04, 0.1)), bg_angle=float(rng.uniform(0, np.pi)),
                       bg_seed=int(rng.integers(2**31)))


def _smooth_step(d: np.ndarray, size: int) -> np.ndarray:
    """Anti-aliased coverage of ``d < 0`` (d in image fractions) at ``size`` pixels."""
    return np.clip(0.5 - d * size, 0.0, 1.0)


def _pattern(kind: str, u: np.ndarray, v: np.ndarray, period: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] of a pattern's marks at coordinates (u, v) (already rotated and shifted)."""
    fu, fv = u / period, v / period
    square = lambda w: np.clip(np.sin(2 * np.pi * w / period) * period * size / np.pi, -1, 1)  # noqa: E731
    if kind == "striped":
        return 0.5 + 0.5 * square(u)
    if kind == "checked":
        return 0.5 + 0.5 * square(u) * square(v)
    if kind == "dotted":
        du, dv = (fu - np.round(fu)) * period, (fv - np.round(fv)) * period
        return _smooth_step(np.sqrt(du**2 + dv**2) - 0.28 * period, size)
    if kind == "grid":  # thin lines, about 1.5 pixels at 128
        du, dv = np.abs(fu - np.round(fu)) * period, np.abs(fv - np.round(fv)) * period
        return _smooth_step(np.minimum(du, dv) - 0.75 / IMAGE_SIZE, size)
    raise ValueError(f"unknown pattern {kind!r}")


def _rotated(gx: np.ndarray, gy: np.ndarray, angle: float, phase: float, period: float) -> tuple[np.ndarray, np.ndarray]:
    c, s = np.cos(angle), np.sin(angle)
    return gx * c + gy * s + phase * period, -gx * s + gy * c + phase * period


def _noise(seed: int, cells: int, size: int) -> np.ndarray:
    """Seeded value noise: a random ``cells`` x ``cells`` lattice, bicubically smooth, in [0, 1]."""
    lattice = np.random.default_rng(seed).random((cells + 3, cells + 3)).astype(np.float32)
    t = torch.from_numpy(lattice)[None, None]
    up = torch.nn.functional.interpolate(t, size=(size + 3 * size // cells,) * 2, mode="bicubic", align_corners=False)
    off = size // cells
    return up[0, 0, off:off + size, off:off + size].clamp(0, 1).numpy()


def _background(scene: DetailScene, gx: np.ndarray, gy: np.ndarray, size: int) -> np.ndarray:
    level = np.ones_like(gx)
    if scene.bg_pattern == "noisy":
        level = 0.45 + 1.1 * _noise(scene.bg_seed, max(4, round(1 / scene.bg_period)), size)
    elif scene.bg_pattern != "plain":
        u, v = _rotated(gx, gy, scene.bg_angle, (scene.bg_seed % 997) / 997, scene.bg_period)
        boost = 1.0 if scene.bg_pattern == "grid" else 0.6
        level = 0.7 + boost * _pattern(scene.bg_pattern, u, v, scene.bg_period, size)
    return BG_BRIGHTNESS * level[..., None] * np.asarray(COLORS[scene.bg_color], dtype=np.float32)


def _paint(canvas: np.ndarray, thing: Thing, gx: np.ndarray, gy: np.ndarray, size: int) -> np.ndarray:
    sdf = shape_sdf(thing.shape, gx - thing.x, gy - thing.y, thing.radius, thing.angle)
    rgb = np.asarray(COLORS[thing.color], dtype=np.float32)
    if thing.texture == "outlined":  # a thin outline (about 2.5 pixels at 128), the background shows inside
        alpha = _smooth_step(np.abs(sdf + 1.25 / IMAGE_SIZE) - 1.25 / IMAGE_SIZE, size)
        return alpha[..., None] * rgb + (1 - alpha[..., None]) * canvas
    alpha = _smooth_step(sdf, size)[..., None]
    fill = np.broadcast_to(rgb, canvas.shape)
    if thing.texture != "plain":
        u, v = _rotated(gx - thing.x, gy - thing.y, thing.texture_angle, thing.phase, thing.period)
        marks = _pattern(thing.texture, u, v, thing.period, size)[..., None]
        fill = rgb * (1 - 0.6 * marks)  # darker marks on the object's color
    return alpha * fill + (1 - alpha) * canvas


def render(scene: DetailScene, size: int = IMAGE_SIZE) -> np.ndarray:
    """Draw a scene as float32 (H, W, 3) in [0, 1]."""
    gx, gy = pixel_grid(size)
    canvas = _background(scene, gx, gy, size)
    for thing in (scene.first, scene.second):
        canvas = _paint(canvas, thing, gx, gy, size)
    return np.clip(canvas, 0.0, 1.0).astype(np.float32)


def image_batch(n: int, seed: int, size: int = IMAGE_SIZE) -> tuple[torch.Tensor, list[DetailScene]]:
    """``n`` images as (n, 3, H, W) floats in [0, 1] and their scenes (captions, labels)."""
    return drawn_images(random_scene, render, n, seed, size)


def scene_labels(scenes: list[DetailScene]) -> dict[str, torch.Tensor]:
    """Integer class labels per attribute of :data:`ATTRIBUTES`."""
    return labels_of(scenes, ATTRIBUTES)


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the detail model's tokenizer is built from it)."""
    words = ["a", ",", "background", "left", "of", "above"]
    words += list(SHAPES) + list(COLOR_NAMES) + list(TEXTURES) + list(BG_PATTERNS)
    return list(dict.fromkeys(words))
