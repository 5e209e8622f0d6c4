"""The caption suites of the reference models: the scenes each model draws, the captions it reads, and
the judge that reads its samples back. One table, so the benchmark, `tune` and the command line treat
``reference:image``, ``reference:detail`` and ``reference:video`` alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import detail_scenes, procedural
from .judge import JUDGE_DIRS, SCENES, Judge, load_judge


@dataclass(frozen=True)
class CaptionSuite:
    """One reference model's captions: ``name`` is its ``reference:`` name, ``scenes`` the judge's scene
    family, ``count`` the captions a benchmark of the suite generates, ``steps`` the model's standard
    number of sampling steps."""

    name: str
    video: bool
    scenes: str
    count: int
    steps: int

    def draw(self, n: int, seed: int) -> tuple[torch.Tensor, list]:
        """``n`` real samples, channels first (images (n, 3, H, W), videos (n, 3, T, H, W)) in [0, 1], and
        their scenes (``.caption``, ``.labels()``), deterministic under ``seed``."""
        if self.video:
            return procedural.video_batch(n, seed)
        return SCENES[self.scenes].image_batch(n, seed)

    def captions(self, n: int, seed: int) -> list[str]:
        return [scene.caption for scene in self.draw(n, seed)[1]]

    def is_caption(self, text: str) -> bool:
        """Whether the suite's model was trained on captions like ``text`` (the only ones its judge reads)."""
        if self.scenes == "detail":
            return detail_scenes.is_caption(text)
        return procedural.is_caption(text, self.video)

    def load_judge(self) -> Judge:
        return load_judge(JUDGE_DIRS[self.scenes])


#: images: 16 captions (2 batches of 8); video: 8 (a video sample costs ~3x an image one); detail runs
#: SD3's default of 28 steps
SUITES = {
    "image": CaptionSuite("image", video=False, scenes="shapes", count=16, steps=20),
    "detail": CaptionSuite("detail", video=False, scenes="detail", count=16, steps=28),
    "video": CaptionSuite("video", video=True, scenes="shapes", count=8, steps=20),
}
