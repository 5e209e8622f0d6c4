"""The offline judge on a caption suite: whole-caption accuracy, agreement with dense's readings and the
reference FID of the samples against real procedural images."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ..metrics import judge as judges
from ..metrics.suites import SUITES
from ..metrics.quality import channels_first, frames
from .prompts import SUITE_SEED, Prompts


@dataclasses.dataclass
class Judging:
    """The offline judge and the real procedural images a suite's samples are compared with."""

    judge: Any
    video: bool
    real_features: torch.Tensor
    real: dict[str, float]


def judging(prompts: Prompts, video: bool) -> Judging | None:
    """The judge when the prompts are a suite of this model's kind (image captions for images, video
    captions for videos); also the real images' own scores, for scale."""
    if prompts.suite is None or SUITES[prompts.suite].video != video:
        return None
    suite = SUITES[prompts.suite]
    judge = suite.load_judge()
    real, _ = suite.draw(len(prompts.texts), SUITE_SEED)
    others, _ = suite.draw(len(prompts.texts), SUITE_SEED + 1)
    real, others = (real.transpose(1, 2), others.transpose(1, 2)) if video else (real, others)  # pipeline layout
    real_features = judge_features(judge, others)
    score = {"caption_accuracy": caption_accuracy(judge, real, prompts.scenes, video),
             "reference_fid": judges.frechet_distance(judge_features(judge, real), real_features)}
    return Judging(judge, video, real_features, score)


def caption_accuracy(judge: Any, output: torch.Tensor, scenes: list, video: bool) -> float:
    """The judge's whole-caption accuracy (videos: appearance and motion)."""
    if video:
        return judges.video_caption_accuracy(judge, channels_first(output), scenes)["all"]
    return judges.caption_accuracy(judge, output, scenes)["all"]


def judge_readings(judged: Judging, output: torch.Tensor) -> list[dict[str, str]]:
    """The judge's attribute readings of every sample of a pipeline's output (images or videos)."""
    return judges.readings(judged.judge, channels_first(output))


def judge_features(judge: Any, output: torch.Tensor) -> torch.Tensor:
    """The judge's features of every image or frame: what the reference FID compares."""
    return judges.features(judge, frames(output))


def reference_fid(features: torch.Tensor, real_features: torch.Tensor) -> float:
    """`judge.reference_fid` on features gathered batch by batch (the samples need not be kept)."""
    return judges.frechet_distance(features, real_features)
