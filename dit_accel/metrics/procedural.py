"""Procedural captioned images and videos of simple shapes (no downloads).

The reference models (``train_reference.py``) and the quality judge (``dit_accel.metrics.judge``)
are trained on this data, so generated samples can be scored offline: every caption is a
tuple of discrete attributes that a small classifier can read back from pixels.

Everything is drawn with numpy from signed distance functions (anti-aliased edges) and is
deterministic under a seed: ``image_batch(n, seed)`` always returns the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch

SHAPES = ("circle", "square", "triangle", "star", "ring")
COLORS = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.20),
    "blue": (0.15, 0.35, 0.98),
    "yellow": (0.97, 0.90, 0.10),
    "purple": (0.65, 0.20, 0.90),
    "white": (0.96, 0.96, 0.96),
}
COLOR_NAMES = tuple(COLORS)
SIZES = {"small": 0.11, "large": 0.2}  # shape radius as a fraction of the image side
SIZE_NAMES = tuple(SIZES)
POSITIONS = {
    "left": (0.27, 0.5),
    "right": (0.73, 0.5),
    "top": (0.5, 0.27),
    "bottom": (0.5, 0.73),
    "center": (0.5, 0.5),
}
POSITION_NAMES = tuple(POSITIONS)
BG_STYLES = ("plain", "gradient", "striped")
MOTIONS = ("moving left", "moving right", "moving up", "moving down", "bouncing", "spinning", "turning")
BG_BRIGHTNESS = 0.38  # backgrounds are dark versions of the palette so the object always stands out
JITTER = 0.04

# Attributes read back by the judge, in a fixed order, with their class names.
ATTRIBUTES = {
    "shape": SHAPES,
    "color": COLOR_NAMES,
    "size": SIZE_NAMES,
    "position": POSITION_NAMES,
    "bg_color": COLOR_NAMES,
    "bg_style": BG_STYLES,
}

_POS_PHRASE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "center": "in the center"}


@dataclass(frozen=True)
class Scene:
    """One shape on a background; ``x``, ``y`` (fractions) and ``angle`` (radians) are the exact pose."""

    shape: str
    color: str
    size: str
    position: str
    bg_color: str
    bg_style: str
    x: float
    y: float
    angle: float
    bg_param: tuple[float, float, float]  # gradient/stripe direction, stripe frequency, stripe phase

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.color} {self.shape} {_POS_PHRASE[self.position]}, "
                f"{self.bg_color} {self.bg_style} background")

    def labels(self) -> dict[str, int]:
        return {name: classes.index(getattr(self, name)) for name, classes in ATTRIBUTES.items()}


@dataclass(frozen=True)
class VideoScene:
    """A scene plus a motion; ``to_color`` is the final color for the "turning" motion."""

    scene: Scene
    motion: str
    to_color: str

    @property
    def caption(self) -> str:
        s = self.scene
        motion = f"turning {self.to_color}" if self.motion == "turning" else self.motion
        return f"a {s.size} {s.color} {s.shape} {motion}, {s.bg_color} {s.bg_style} background"

    def frame_scene(self, t: float) -> tuple[Scene, tuple[float, float, float]]:
        """The scene and RGB object color at time ``t`` in [0, 1]."""
        s, m = self.scene, self.motion
        x, y, angle = 0.5, 0.5, s.angle
        lo, hi = POSITIONS["left"][0], POSITIONS["right"][0]
        if m == "moving right":
            x = lo + (hi - lo) * t
        elif m == "moving left":
            x = hi - (hi - lo) * t
        elif m == "moving down":
            y = lo + (hi - lo) * t
        elif m == "moving up":
            y = hi - (hi - lo) * t
        elif m == "bouncing":  # bottom -> top -> bottom -> top -> bottom
            y = hi - (hi - lo) * abs(np.sin(2 * np.pi * t))
        elif m == "spinning":
            angle = s.angle + 2 * np.pi / _symmetry(s.shape) * t
        rgb = np.asarray(COLORS[s.color])
        if m == "turning":
            rgb = (1 - t) * rgb + t * np.asarray(COLORS[self.to_color])
        return replace(s, x=x, y=y, angle=angle, position=nearest_position(x, y)), tuple(rgb)


def is_caption(text: str, video: bool = False) -> bool:
    """Whether `text` is a caption of the procedural scenes (videos: with a motion), as `Scene.caption` and
    `VideoScene.caption` write them: the only prompts whose samples the judge can read."""
    words = str(text).strip().replace(",", " ,").split()
    if len(words) < 9 or words[0] != "a" or words[1] not in SIZES or words[2] not in COLORS or words[3] not in SHAPES:
        return False
    where, rest = words[4:-4], words[-4:]
    if video:
        placed = " ".join(where) in MOTIONS or (where[:1] == ["turning"] and len(where) == 2 and where[1] in COLORS)
    else:
        placed = " ".join(where) in _POS_PHRASE.values()
    return placed and rest[0] == "," and rest[1] in COLORS and rest[2] in BG_STYLES and rest[3] == "background"


def _symmetry(shape: str) -> int:
    return {"square": 4, "triangle": 3, "star": 5}.get(shape, 1)


def nearest_position(x: float, y: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def random_scene(rng: np.random.Generator) -> Scene:
    color, bg_color = rng.choice(len(COLORS), size=2, replace=False)
    position = POSITION_NAMES[rng.integers(len(POSITIONS))]
    px, py = POSITIONS[position]
    jx, jy = rng.uniform(-JITTER, JITTER, size=2)
    return Scene(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=COLOR_NAMES[color],
        size=SIZE_NAMES[rng.integers(len(SIZES))],
        position=position,
        bg_color=COLOR_NAMES[bg_color],
        bg_style=BG_STYLES[rng.integers(len(BG_STYLES))],
        x=px + jx,
        y=py + jy,
        angle=float(rng.uniform(0, 2 * np.pi)),
        bg_param=(float(rng.uniform(0, 2 * np.pi)), float(rng.uniform(3, 6)), float(rng.uniform(0, 2 * np.pi))),
    )


def random_video_scene(rng: np.random.Generator) -> VideoScene:
    scene = random_scene(rng)
    motions = MOTIONS if scene.shape not in ("circle", "ring") else tuple(m for m in MOTIONS if m != "spinning")
    motion = motions[rng.integers(len(motions))]
    others = [c for c in COLOR_NAMES if c not in (scene.color, scene.bg_color)]
    to_color = others[rng.integers(len(others))] if motion == "turning" else scene.color
    return VideoScene(scene=scene, motion=motion, to_color=to_color)


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel centers as (x, y) fractions of the side, each (size, size)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="xy")


def _polygon_sdf(px: np.ndarray, py: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Signed distance to a closed polygon (negative inside), after Inigo Quilez's sdPolygon."""
    d = (px - verts[0, 0]) ** 2 + (py - verts[0, 1]) ** 2
    sign = np.ones_like(px)
    for i in range(len(verts)):
        vi, vj = verts[i], verts[i - 1]
        ex, ey = vj[0] - vi[0], vj[1] - vi[1]
        wx, wy = px - vi[0], py - vi[1]
        h = np.clip((wx * ex + wy * ey) / (ex * ex + ey * ey), 0.0, 1.0)
        d = np.minimum(d, (wx - ex * h) ** 2 + (wy - ey * h) ** 2)
        c1, c2, c3 = py >= vi[1], py < vj[1], ex * wy > ey * wx
        flip = (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
        sign = np.where(flip, -sign, sign)
    return sign * np.sqrt(d)


def _regular(n: int, radius: float, angle: float, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular n-gon, or of an n-pointed star when ``inner`` (radius ratio) is given."""
    k = 2 * n if inner else n
    a = angle + np.arange(k) * 2 * np.pi / k
    r = np.full(k, radius)
    if inner:
        r[1::2] *= inner
    return np.stack([r * np.cos(a), r * np.sin(a)], axis=1)


def shape_sdf(shape: str, px: np.ndarray, py: np.ndarray, radius: float, angle: float) -> np.ndarray:
    """Signed distance (in image fractions) to a shape centered at the origin."""
    if shape == "circle":
        return np.sqrt(px**2 + py**2) - radius
    if shape == "ring":
        return np.abs(np.sqrt(px**2 + py**2) - 0.72 * radius) - 0.28 * radius
    if shape == "square":
        return _polygon_sdf(px, py, _regular(4, radius * 1.05, angle))
    if shape == "triangle":
        return _polygon_sdf(px, py, _regular(3, radius * 1.15, angle))
    if shape == "star":
        return _polygon_sdf(px, py, _regular(5, radius * 1.15, angle, inner=0.45))
    raise ValueError(f"unknown shape {shape!r}")


def _background(scene: Scene, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    direction, freq, phase = scene.bg_param
    u = (gx - 0.5) * np.cos(direction) + (gy - 0.5) * np.sin(direction)
    if scene.bg_style == "plain":
        level = np.ones_like(gx)
    elif scene.bg_style == "gradient":
        level = 0.35 + 1.3 * (u + 0.71) / 1.42
    else:
        level = 1.0 + 0.45 * np.sign(np.sin(2 * np.pi * freq * u + phase))
    return BG_BRIGHTNESS * level[..., None] * np.asarray(COLORS[scene.bg_color], dtype=np.float32)


def render(scene: Scene, size: int = 64, rgb: tuple[float, float, float] | None = None) -> np.ndarray:
    """Draw a scene as float32 (H, W, 3) in [0, 1]; ``rgb`` overrides the object color."""
    gx, gy = pixel_grid(size)
    bg = _background(scene, gx, gy)
    sdf = shape_sdf(scene.shape, gx - scene.x, gy - scene.y, SIZES[scene.size], scene.angle)
    alpha = np.clip(0.5 - sdf * size, 0.0, 1.0)[..., None]
    fg = np.asarray(rgb if rgb is not None else COLORS[scene.color], dtype=np.float32)
    return np.clip(alpha * fg + (1 - alpha) * bg, 0.0, 1.0).astype(np.float32)


def render_video(video: VideoScene, num_frames: int = 13, size: int = 64) -> np.ndarray:
    """Draw a video as float32 (T, H, W, 3) in [0, 1]; the motion spans t = 0..1 over the frames."""
    frames = []
    for i in range(num_frames):
        scene, rgb = video.frame_scene(i / max(num_frames - 1, 1))
        frames.append(render(scene, size, rgb))
    return np.stack(frames)


def drawn_images(draw: Callable, paint: Callable, n: int, seed: int, size: int) -> tuple[torch.Tensor, list]:
    """``n`` scenes drawn by ``draw(rng)`` and painted by ``paint(scene, size)``: (n, 3, H, W) floats in [0, 1]
    and the scenes. Shared by every scene family."""
    rng = np.random.default_rng(seed)
    scenes = [draw(rng) for _ in range(n)]
    images = torch.from_numpy(np.stack([paint(s, size) for s in scenes])).permute(0, 3, 1, 2).contiguous()
    return images, scenes


def labels_of(scenes: list, attributes: dict) -> dict[str, torch.Tensor]:
    """Integer class labels of scenes (their ``labels()``) per attribute."""
    return {k: torch.tensor([s.labels()[k] for s in scenes]) for k in attributes}


def image_batch(n: int, seed: int, size: int = 64) -> tuple[torch.Tensor, list[Scene]]:
    """``n`` images as (n, 3, H, W) floats in [0, 1] and their scenes (captions, labels)."""
    return drawn_images(random_scene, render, n, seed, size)


def scene_labels(scenes: list[Scene]) -> dict[str, torch.Tensor]:
    """Integer class labels per attribute of :data:`ATTRIBUTES`."""
    return labels_of(scenes, ATTRIBUTES)


def video_batch(n: int, seed: int, num_frames: int = 13, size: int = 64) -> tuple[torch.Tensor, list[VideoScene]]:
    """``n`` videos as (n, 3, T, H, W) floats in [0, 1] (the diffusers video layout) and their scenes."""
    rng = np.random.default_rng(seed)
    videos = [random_video_scene(rng) for _ in range(n)]
    pixels = np.stack([render_video(v, num_frames, size) for v in videos])
    return torch.from_numpy(pixels).permute(0, 4, 1, 2, 3).contiguous(), videos


def vocabulary() -> list[str]:
    """Every word a caption can contain, in a fixed order (the tokenizers are built from it)."""
    words = ["a", ",", "on", "the", "at", "in", "background", "moving", "bouncing", "spinning", "turning",
             "left", "right", "top", "bottom", "center", "up", "down"]
    words += list(SHAPES) + list(COLOR_NAMES) + list(SIZE_NAMES) + list(BG_STYLES)
    return list(dict.fromkeys(words))
