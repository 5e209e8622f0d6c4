"""The shipped reference models and the offline quality metrics (CPU, about a minute in total)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from torch import nn

from dit_accel.metrics import judge as J
from dit_accel.metrics.fid import TorchScriptFeatures, frechet_inception_distance
from dit_accel.metrics.quality import psnr, ssim
from dit_accel.metrics import procedural
from dit_accel.testing.reference import (
    REFERENCE_DIRS,
    generate,
    reference_call_kwargs,
    reference_pipeline,
)


@pytest.fixture(scope="module")
def judge():
    return J.load_judge()


@pytest.fixture(scope="module")
def image_pipe():
    pipe = reference_pipeline("image")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def video_pipe():
    pipe = reference_pipeline("video")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_procedural_is_deterministic_and_captioned():
    a, scenes = procedural.image_batch(6, seed=3)
    b, _ = procedural.image_batch(6, seed=3)
    assert torch.equal(a, b) and a.shape == (6, 3, 64, 64) and 0 <= a.min() and a.max() <= 1
    assert all(s.shape in s.caption and s.color in s.caption for s in scenes)
    v, vscenes = procedural.video_batch(2, seed=3)
    assert v.shape == (2, 3, 13, 64, 64)
    assert all(s.scene.shape in s.caption for s in vscenes)
    words = set(procedural.vocabulary())
    assert all(set(s.caption.replace(",", " ,").split()) <= words for s in scenes + vscenes)


def test_assets_are_safetensors_and_small():
    folders = (*REFERENCE_DIRS.values(), *J.JUDGE_DIRS.values())
    files = [p for d in folders for p in d.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth")]
    assert sum(p.stat().st_size for p in files) < 46e6  # the detail model's 7.8 M parameters are stored as float16


def test_image_pipeline_generates(image_pipe):
    assert type(image_pipe).__name__ == "StableDiffusion3Pipeline"
    cfg = image_pipe.transformer.config
    assert (cfg.sample_size // cfg.patch_size) ** 2 >= 256
    out = image_pipe(**reference_call_kwargs("image", num_inference_steps=4, output_type="pt",
                                             generator=torch.Generator().manual_seed(0))).images
    assert out.shape == (1, 3, 64, 64) and torch.isfinite(out).all()


def test_video_pipeline_generates(video_pipe):
    pipe = video_pipe
    assert type(pipe).__name__ == "WanPipeline"
    kwargs = reference_call_kwargs("video", num_inference_steps=3, output_type="pt",
                                   generator=torch.Generator().manual_seed(0))
    out = pipe(**kwargs).frames
    frames, size = kwargs["num_frames"], kwargs["height"]
    assert out.shape == (1, frames, 3, size, size) and torch.isfinite(out).all()
    patch_t, patch_h, patch_w = pipe.transformer.config.patch_size
    latent_frames = (frames - 1) // pipe.vae_scale_factor_temporal + 1
    latent_size = size // pipe.vae_scale_factor_spatial
    assert (latent_frames // patch_t) * (latent_size // patch_h) * (latent_size // patch_w) >= 1536


def test_generated_videos_follow_captions(video_pipe, judge):
    _, scenes = procedural.video_batch(8, seed=777)
    fake = generate(video_pipe, "video", [s.caption for s in scenes], seed=0, batch=8, num_inference_steps=10)
    acc, chance = J.video_caption_accuracy(judge, fake, scenes), J.video_chance_levels()
    for attribute in ("color", "bg_color", "motion"):
        assert acc[attribute] > 3 * chance[attribute], acc
    assert acc["all"] > 0, acc


def test_judge_reads_real_samples(judge):
    images, scenes = procedural.image_batch(200, seed=424242)
    acc = J.caption_accuracy(judge, images, scenes)
    assert min(acc[k] for k in procedural.ATTRIBUTES) > 0.9, acc
    videos, vscenes = procedural.video_batch(16, seed=424242)
    assert J.video_caption_accuracy(judge, videos, vscenes)["motion"] > 0.8


def test_generated_images_follow_captions(image_pipe, judge):
    _, scenes = procedural.image_batch(24, seed=777)
    fake = generate(image_pipe, "image", [s.caption for s in scenes], seed=0, batch=24, num_inference_steps=10)
    acc = J.caption_accuracy(judge, fake, scenes)
    chance = J.chance_levels()
    assert np.mean([acc[k] for k in ("shape", "color", "position")]) > 3 * np.mean(
        [chance[k] for k in ("shape", "color", "position")]), acc
    assert acc["all"] > 20 * chance["all"], acc


def test_reference_fid_separates_noise(judge):
    real, _ = procedural.image_batch(128, seed=1)
    real2, _ = procedural.image_batch(128, seed=2)
    same = J.reference_fid(judge, real, real2)
    assert same < J.reference_fid(judge, torch.rand_like(real), real2) / 5


class _TinyExtractor(nn.Module):
    """Stand-in for Inception: uint8 images -> 8 features."""

    num_features = 8

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.float() / 255).mean((2, 3))


def test_fid_with_injected_extractor(tmp_path):
    real, _ = procedural.image_batch(64, seed=5)
    real2, _ = procedural.image_batch(64, seed=6)
    noise = torch.rand_like(real)
    close = frechet_inception_distance(real, real2.split(16), extractor=_TinyExtractor())
    far = frechet_inception_distance(real, noise, extractor=_TinyExtractor())
    assert 0 <= close < far

    class Scripted(nn.Module):  # the clean-fid TorchScript calling convention
        def __init__(self):
            super().__init__()
            self.net = _TinyExtractor()

        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return self.net(x)

    path = tmp_path / "features.pt"
    torch.jit.script(Scripted()).save(str(path))
    scripted = frechet_inception_distance(real, real2, extractor=TorchScriptFeatures(path, num_features=8, size=64))
    assert scripted == pytest.approx(close, rel=1e-4)
    with pytest.raises(ValueError):
        frechet_inception_distance(real, real2)


def test_psnr_ssim():
    x, _ = procedural.image_batch(4, seed=0)
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    assert psnr(x, x) == float("inf") or psnr(x, x) > 80
    assert 20 < psnr(y, x) < 35 and 0.5 < ssim(y, x) < 1 and ssim(x, x) == pytest.approx(1.0)
    v = torch.stack([x, y], dim=2)  # (B, C, T, H, W)
    assert psnr(v, v) > 80 or psnr(v, v) == float("inf")
