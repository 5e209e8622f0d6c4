"""`--fid DIR|dense`: FID and CLIP score as users report them on their own models. FID compares
torchmetrics' Inception features (torch-fidelity's weights, the `[metrics]` extra) of every image or frame
of a row with those of a folder of real images, or of the dense outputs of the same prompts (as caching
papers report); the CLIP score reads every sample against its prompt where open_clip's weights load.
Both load before any generation: FID's weights missing is refused by name, CLIP's is said in the notes.
On the reference suites the judge's features (reference FID) stay the offline stand-in beside them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..loading import UsageError
from ..metrics import fid as fid_metrics

DENSE = "dense"


@dataclasses.dataclass
class ContentScoring:
    """The feature extractor, the real set's features (None: dense's, once it ran), and the CLIP scorer."""

    extractor: nn.Module
    reference: torch.Tensor | None
    #: `DENSE` or the folder of real images
    source: str
    clip: fid_metrics.ClipScore | None
    #: why there is no CLIP score, where there is none
    clip_missing: str | None

    def features(self, frames: torch.Tensor) -> torch.Tensor:
        return fid_metrics.features_of(self.extractor, frames)

    def notes(self, samples: int) -> list[str]:
        against = ("the dense outputs of the same prompts and seeds (dense itself scores 0)" if self.reference is None
                   else f"{len(self.reference)} real images in {self.source}")
        said = [f"FID: torchmetrics' Inception (torch-fidelity weights) features of every image or frame against "
                f"{against}; over {samples} samples a row's FID is noisy: compare rows of one run"]
        said.append(self.clip.name + ": 100 x the cosine of each image or frame and its prompt, at least 0"
                    if self.clip is not None else f"no CLIP score: {self.clip_missing}")
        return said


def content_scoring(fid: str | Path | None) -> ContentScoring | None:
    """What `--fid` asks for, loaded (and the real images' features taken) before any model loads; refused
    by name where the Inception weights cannot be loaded or the folder holds fewer than 2 images."""
    if fid is None:
        return None
    try:
        extractor = fid_metrics.load_inception()
    except fid_metrics.WeightsUnavailable as error:
        raise UsageError(f"--fid {fid}: {error}") from None
    reference = None
    if str(fid) != DENSE:
        images = fid_metrics.read_images(fid)
        if len(images) < 2:
            raise UsageError(f"--fid {fid}: FID needs at least 2 real images ({', '.join(fid_metrics.IMAGE_SUFFIXES)}), "
                             f"found {len(images)}")
        reference = fid_metrics.features_of(extractor, images)
    try:
        clip, missing = fid_metrics.ClipScore.load(), None
    except fid_metrics.WeightsUnavailable as error:
        clip, missing = None, str(error)
    return ContentScoring(extractor, reference, str(fid), clip, missing)


def clip_texts(call: dict[str, Any]) -> list[str] | None:
    """The prompts of a batch's call, where it has text prompts (a class-conditional model has none)."""
    prompt = call.get("prompt")
    return [prompt] if isinstance(prompt, str) else list(prompt) if prompt else None
