"""PSNR and SSIM of accelerated outputs against a baseline, via bare torchmetrics.

These are torchmetrics' exact implementations (``peak_signal_noise_ratio`` and the Gaussian
11x11, sigma 1.5 ``structural_similarity_index_measure``), which need neither torchvision
nor downloads. Inputs are images (B, 3, H, W) or videos (B, C, T, H, W) in [0, 1]; videos
are scored frame by frame and averaged.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def channels_first(output: torch.Tensor) -> torch.Tensor:
    """Pipelines give videos as (B, T, C, H, W); these metrics and the judge take (B, C, T, H, W)."""
    return output.transpose(1, 2) if output.ndim == 5 else output


def _frames(x: torch.Tensor) -> torch.Tensor:
    x = x.float()
    if x.dim() == 5:
        x = x.transpose(1, 2).flatten(0, 1)
    if x.dim() != 4:
        raise ValueError(f"expected (B, C, H, W) or (B, C, T, H, W), got shape {tuple(x.shape)}")
    return x


#: per-frame PSNRs are capped here before they are averaged (float32 rounding alone gives ~150 dB)
PSNR_CAP_DB = 100.0


def frames(output: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) or pipeline videos (B, T, 3, H, W) as frames (N, 3, H, W)."""
    return output.reshape(-1, *output.shape[-3:])


def psnr_frames(output: torch.Tensor, reference: torch.Tensor) -> list[float]:
    """PSNR in dB of every image or video frame against the reference's (inf where identical): averaged
    per frame, one bad sample cannot hide behind a batch-wide MSE."""
    ours, theirs = frames(output), frames(reference)
    return [psnr(ours[i:i + 1], theirs[i:i + 1]) for i in range(len(ours))]


def ssim_frames(output: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean SSIM over images or video frames."""
    return ssim(frames(output), frames(reference))


def mean_db(values: list[float]) -> float | None:
    """The mean of per-frame PSNRs, each capped at `PSNR_CAP_DB` first: a frame equal up to float rounding
    (150 dB and more) or bit for bit (inf) would otherwise outweigh every other frame of the row. inf
    when every frame is identical, None when there is none. The sum is exact (`math.fsum`), so the frames'
    order (processes merged by rank) does not change the mean."""
    if not values:
        return None
    if all(value == math.inf for value in values):
        return math.inf
    return math.fsum(min(value, PSNR_CAP_DB) for value in values) / len(values)  # exact: any order, one mean


def psnr(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB over the whole batch (one MSE over all pixels)."""
    return float(peak_signal_noise_ratio(_frames(output), _frames(reference), data_range=data_range))


def ssim(output: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Mean SSIM over images (or video frames)."""
    return float(structural_similarity_index_measure(_frames(output), _frames(reference), data_range=data_range))


class PerceptualDistance:
    """A perceptual distance of outputs from a baseline, per image or frame, averaged (0: the same).

    LPIPS (torchmetrics, AlexNet) where torchvision and its pretrained weights are present; else, stated
    in `name`, the distance of the offline judge's penultimate features (unit-normalised, squared L2, in
    [0, 4]): pretrained on the procedural scenes only, so a stand-in, comparable between rows of one run.
    """

    def __init__(self):
        self._lpips = _lpips()
        if self._lpips is not None:
            self.name = "LPIPS (AlexNet, torchmetrics)"
        else:
            from .judge import load_judge

            self._judge = load_judge()
            self.name = "judge feature distance (offline stand-in for LPIPS: no torchvision weights here)"

    @torch.no_grad()
    def __call__(self, output: torch.Tensor, reference: torch.Tensor) -> float:
        """The mean distance over the images (or frames) of `output` against `reference`'s."""
        ours, theirs = _frames(output).clamp(0, 1), _frames(reference).clamp(0, 1)
        if self._lpips is not None:
            return float(self._lpips(ours, theirs))
        a, b = (torch.nn.functional.normalize(self._judge(x).double(), dim=1) for x in (ours, theirs))
        return float((a - b).square().sum(1).mean())


def _lpips():
    """torchmetrics' LPIPS when it can be built offline (it needs torchvision's AlexNet weights), else None."""
    try:
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        return LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True).eval()
    except Exception:  # no torchvision, or no weights offline: the caller says which distance it used
        return None
