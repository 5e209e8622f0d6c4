"""FID and CLIP score as users report them on their own models, and FID with a feature extractor the
user supplies.

`load_inception` is torchmetrics' own FID Inception (torch-fidelity's weights, the `[metrics]` extra)
and `ClipScore.load` open_clip's ViT-B-32; both raise `WeightsUnavailable`, saying why, where the
package or its weights are missing (no downloads here), so a caller can refuse before any generation.
``FrechetInceptionDistance(feature=module)`` accepts any ``nn.Module`` instead, so
`frechet_inception_distance` takes either that module or a local TorchScript file, e.g. the
``inception-2015-12-05.pt`` that clean-fid uses (StyleGAN's FID Inception, called as
``model(x, return_features=True)`` on float images in [0, 255]). Without such weights,
:func:`dit_accel.metrics.judge.reference_fid` is an offline stand-in on the procedural scenes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

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


class WeightsUnavailable(RuntimeError):
    """A feature network whose package or weights cannot be loaded here."""


def _why(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"[:300]


def load_inception() -> nn.Module:
    """torchmetrics' FID Inception (torch-fidelity's `inception-v3-compat` weights, 2048 features of uint8
    images (B, 3, H, W), resized inside), or `WeightsUnavailable` saying why not."""
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3

        return NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"]).eval()
    except Exception as error:  # no torch-fidelity, or its weights cannot be downloaded
        raise WeightsUnavailable(f"torchmetrics' Inception feature extractor cannot be loaded ({_why(error)}): "
                                 "pip install 'dit-accel[metrics]', and fetch its torch-fidelity weights once "
                                 "where downloads work") from error


@torch.no_grad()
def features_of(extractor: nn.Module, images: torch.Tensor | list[torch.Tensor], batch: int = 64) -> torch.Tensor:
    """The extractor's features (N, D), float64, of images (N, 3, H, W) or a list of (3, H, W) of any sizes
    (each size its own batches; FID does not depend on the order), uint8 or floats in [0, 1]."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for image in images:
        groups.setdefault(tuple(image.shape), []).append(image)
    found = [extractor(to_uint8(torch.stack(same[i:i + batch]))).double().reshape(len(same[i:i + batch]), -1)
             for same in groups.values() for i in range(0, len(same), batch)]
    return torch.cat(found)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_images(folder: str | os.PathLike) -> list[torch.Tensor]:
    """Every image file directly in `folder` (png, jpg, webp, bmp), RGB uint8 (3, H, W), by file name."""
    from PIL import Image

    images = []
    for path in sorted(Path(folder).iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as picture:
                pixels = torch.frombuffer(bytearray(picture.convert("RGB").tobytes()), dtype=torch.uint8)
                images.append(pixels.reshape(picture.height, picture.width, 3).permute(2, 0, 1).contiguous())
    return images


class ClipScore:
    """CLIP score, torchmetrics' definition: 100 x the cosine of image and prompt embeddings, at least 0,
    averaged over the images. `load()` builds it from open_clip's ViT-B-32 (LAION-2B weights); tests give
    their own encoders."""

    MODEL, WEIGHTS = "ViT-B-32", "laion2b_s34b_b79k"

    def __init__(self, encode_image: Callable[[torch.Tensor], torch.Tensor],
                 encode_text: Callable[[list[str]], torch.Tensor], name: str):
        self.encode_image, self.encode_text, self.name = encode_image, encode_text, name

    @classmethod
    def load(cls) -> "ClipScore":
        """open_clip's ViT-B-32, or `WeightsUnavailable` saying why not."""
        try:
            import open_clip

            model, _, _ = open_clip.create_model_and_transforms(cls.MODEL, pretrained=cls.WEIGHTS)
            tokenizer = open_clip.get_tokenizer(cls.MODEL)
        except Exception as error:  # no open_clip, or its weights cannot be downloaded
            raise WeightsUnavailable(f"open_clip {cls.MODEL} ({cls.WEIGHTS}) cannot be loaded ({_why(error)})") from error
        model.eval()
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

        def encode_image(images: torch.Tensor) -> torch.Tensor:
            x = F.interpolate(images.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            return model.encode_image((x.clamp(0, 1) - mean) / std)

        return cls(encode_image, lambda texts: model.encode_text(tokenizer(texts)),
                   f"CLIP score (open_clip {cls.MODEL}, {cls.WEIGHTS})")

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, texts: list[str]) -> float:
        """The mean CLIP score of images (N, 3, H, W) in [0, 1] against their prompts (one per image)."""
        image = F.normalize(self.encode_image(images).float(), dim=-1)
        text = F.normalize(self.encode_text(list(texts)).float(), dim=-1)
        return float((100 * (image * text).sum(-1)).clamp(min=0).mean())
