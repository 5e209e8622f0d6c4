"""The detail reference model (``reference:detail``), its scenes and its judge, offline."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

from dit_accel.cli import main
from dit_accel.metrics import detail_scenes as D
from dit_accel.metrics import judge as J
from dit_accel.metrics.suites import SUITES
from dit_accel.testing.reference import REFERENCE_DETAIL_DIR, generate, reference_call_kwargs, reference_pipeline
from dit_accel.tuning.target import judge_refusal


@pytest.fixture(scope="module")
def judge():
    return SUITES["detail"].load_judge()


@pytest.fixture(scope="module")
def pipe():
    pipe = reference_pipeline("detail")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_scenes_are_deterministic_detailed_and_captioned():
    a, scenes = D.image_batch(8, seed=5)
    b, _ = D.image_batch(8, seed=5)
    assert torch.equal(a, b) and a.shape == (8, 3, 128, 128) and 0 <= a.min() and a.max() <= 1
    assert all(D.is_caption(s.caption) for s in scenes)
    assert not D.is_caption("a large red circle on the left, blue plain background")
    assert not D.is_caption("a red plain star below a blue dotted ring, green grid background")
    words = set(D.vocabulary())
    assert all(set(s.caption.replace(",", " ,").split()) <= words for s in scenes)
    # fine detail: a textured image keeps much of its energy above what a 2x-blurred copy holds
    blurred = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(a, 4), scale_factor=4, mode="bilinear")
    assert (a - blurred).square().mean() > 0.003
    # the first object is left of / above the second, as the caption says
    for s in scenes:
        axis = "x" if s.relation == "left of" else "y"
        assert getattr(s.first, axis) < getattr(s.second, axis)


def test_the_model_has_1024_image_tokens_and_generates(pipe):
    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    call = reference_call_kwargs("detail", num_inference_steps=2, output_type="pt",
                                 generator=torch.Generator().manual_seed(0))
    assert call["num_inference_steps"] == 2 and reference_call_kwargs("detail")["num_inference_steps"] == 28
    latent = call["height"] // pipe.vae_scale_factor
    assert (latent // pipe.transformer.config.patch_size) ** 2 == 1024
    out = pipe(**call).images
    assert out.shape == (1, 3, 128, 128) and torch.isfinite(out).all()
    assert all(p.suffix not in (".bin", ".pt", ".pth") for p in REFERENCE_DETAIL_DIR.rglob("*"))


def test_the_judge_reads_real_scenes(judge):
    images, scenes = D.image_batch(200, seed=424242)
    acc = J.caption_accuracy(judge, images, scenes)
    assert min(acc[k] for k in D.ATTRIBUTES) > 0.75, acc  # held out at training: shapes 0.82-0.84, the rest > 0.85
    assert acc["all"] > 100 * J.chance_levels("detail")["all"], acc


def test_generated_images_follow_their_captions_above_chance(pipe, judge):
    _, scenes = D.image_batch(8, seed=777)
    fake = generate(pipe, "detail", [s.caption for s in scenes], seed=0, batch=8, num_inference_steps=12)
    acc, chance = J.caption_accuracy(judge, fake, scenes), J.chance_levels("detail")
    assert np.mean([acc[k] for k in D.ATTRIBUTES]) > 2 * np.mean([chance[k] for k in D.ATTRIBUTES]), acc


def test_the_detail_suite_is_benched_and_judged_by_its_own_judge(tmp_path):
    assert judge_refusal("reference:detail", SUITES["detail"].captions(2, 0), video=False) is None
    assert "is not one" in judge_refusal("reference:detail", SUITES["image"].captions(1, 0), video=False)
    out = tmp_path / "detail"
    assert main(["bench", "--suite", "detail", "--count", "2", "--batch", "2", "--steps", "3", "--plan",
                 "steps:count=2", "--equal", "judge=0.5", "--threads", "2", "--out", str(out), "--quiet"]) == 0
    results = json.loads((out / "results.json").read_text())
    rows = {row["label"]: row for row in results["rows"]}
    assert results["model"] == "reference:detail" and rows["dense"]["judge_agreement"] == 1.0
    assert 0 <= rows["steps:count=2"]["judge_agreement"] <= 1


def test_tune_runs_on_the_detail_model_with_its_judge(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    assert main(["tune", "--model", "reference:detail", "--count", "2", "--batch", "2", "--steps", "3",
                 "--target", "psnr=10,judge=0.5", "--budget", "20gen", "--threads", "2", "--out", str(plan),
                 "--quiet"]) == 0
    search = json.loads(plan.with_name("plan.search.json").read_text())
    tried = [c for c in search["candidates"] if c.get("judge") is not None]
    assert search["model"] == "reference:detail" and tried and all(0 <= c["judge"] <= 1 for c in tried)
