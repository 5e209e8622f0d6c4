"""Real FID through torchmetrics with a feature extractor the user supplies.

No Inception weights can be downloaded here, and torchmetrics' built-in extractor needs
torch-fidelity (which pulls torchvision). ``FrechetInceptionDistance(feature=module)`` accepts
any ``nn.Module`` instead, so this module takes either that module or a local TorchScript
file, e.g. the ``inception-2015-12-05.pt`` that clean-fid uses (StyleGAN's FID Inception,
called as ``model(x, return_features=True)`` on float images in [0, 255]). Without such
weights, use :func:`dit_accel.metrics.judge.reference_fid` for an offline stand-in.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance


class TorchScriptFeatures(nn.Module):
    """Wraps a TorchScript feature network: uint8 (B, 3, H, W) -> float features (B, num_features)."""

    def __init__(self, path: str | os.PathLike, num_features: int = 2048, size: int = 299,
                 return_features: bool = True):
        super().__init__()
        self.model = torch.jit.load(str(path), map_location="cpu").eval()
        self.num_features, self.size, self.return_features = num_features, size, return_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        out = self.model(x, return_features=True) if self.return_features else self.model(x)
        return out.reshape(len(x), self.num_features)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) as uint8; floats are read as [0, 1]."""
    if images.dtype == torch.uint8:
        return images
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def frechet_inception_distance(
    real: torch.Tensor | Iterable[torch.Tensor],
    fake: torch.Tensor | Iterable[torch.Tensor],
    extractor: nn.Module | None = None,
    weights_path: str | os.PathLike | None = None,
) -> float:
    """FID between two image sets (tensors or iterables of batches, (B, 3, H, W), uint8 or [0, 1] floats).

    Give exactly one of ``extractor`` (an ``nn.Module`` taking uint8 images, with an int
    ``num_features`` attribute) or ``weights_path`` (a TorchScript feature network, see
    :class:`TorchScriptFeatures`).
    """
    if (extractor is None) == (weights_path is None):
        raise ValueError("pass exactly one of `extractor` or `weights_path`")
    feature = extractor if extractor is not None else TorchScriptFeatures(weights_path)
    metric = FrechetInceptionDistance(feature=feature, reset_real_features=True)
    with torch.no_grad():
        for is_real, images in ((True, real), (False, fake)):
            for batch in [images] if isinstance(images, torch.Tensor) else images:
                metric.update(to_uint8(batch), real=is_real)
        return float(metric.compute())
